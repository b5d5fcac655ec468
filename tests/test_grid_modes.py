"""Batch grids with img2img, inpainting and ControlNet inputs (studio.grid_inputs): each item renders the image
``Studio.compose`` renders from the same files; input files go through the grid's path policy and enter the item
ids by their SHA-256; a missing, disallowed or unusable input is a GridError naming file and line, before any
image renders."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from batch_support import EXAMPLE_LORAS
from PIL import Image

from pipelines.tiny import build_tiny_sdxl, build_tiny_sdxl_controlnet
from studio import Recipe, Studio
from studio.batch import BatchOptions, run_batch
from studio.grid import GridError, load_grid
from studio.manifest import MANIFEST, read_lines

PROMPTS = ["a zorb in a garden, inkwash painting", "a zorb on a beach, inkwash painting"]


def write_inputs(folder: Path) -> dict[str, Path]:
    """A seeded RGB image, a grayscale mask (white square = repaint) and a control image, as PNG files."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    paths = {"image": folder / "room.png", "mask": folder / "mask.png", "control": folder / "edges.png"}
    Image.fromarray((rng.rand(64, 64, 3) * 255).astype("uint8")).save(paths["image"])
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    mask.save(paths["mask"])
    Image.fromarray((rng.rand(64, 64, 3) * 255).astype("uint8")).save(paths["control"])
    return paths


def grid_text(body: str, *, prompts: str | None = None, axes: str = "") -> str:
    prompt_tables = prompts if prompts is not None else "\n".join(f'[[prompts]]\ntext = "{t}"\n' for t in PROMPTS)
    return f"""model = "tiny-sdxl-random"
steps = 2
guidance = 5.0
loras = [
  {{ source = "{EXAMPLE_LORAS / 'random-subject.safetensors'}", name = "subject", weight = 0.9 }},
  {{ source = "{EXAMPLE_LORAS / 'random-style.safetensors'}", name = "style", weight = 0.7 }},
]
{body}
{prompt_tables}
[axes]
strategy = ["merge"]
{axes}
"""


def write(folder: Path, text: str, name: str = "grid.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def studio() -> Studio:
    return Studio("tiny-sdxl-random")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory, studio):
    """img2img (prompt 1) and inpainting (prompt 2, its own mask) over a strength axis, rendered once."""
    folder = tmp_path_factory.mktemp("grid-modes")
    write_inputs(folder / "inputs")
    prompts = (f'[[prompts]]\ntext = "{PROMPTS[0]}"\n\n'
               f'[[prompts]]\ntext = "{PROMPTS[1]}"\nmask = "inputs/mask.png"\n')
    grid = write(folder, grid_text('image = "inputs/room.png"', prompts=prompts, axes="strength = [0.5, 1.0]"))
    items, _ = load_grid(grid, allow=[EXAMPLE_LORAS])
    summary = run_batch(items, folder / "out", BatchOptions(score=False, report=False), studio=studio)
    return folder, grid, items, summary


def test_grid_mode_items_equal_studio_compose(rendered, studio):
    folder, _, items, summary = rendered
    assert (summary.planned, summary.rendered, summary.failed) == (4, 4, 0)
    assert [(i.prompt_index, i.strength, i.column) for i in items] == \
        [(0, 0.5, "strength 0.5"), (0, 1.0, "strength 1"), (1, 0.5, "strength 0.5"), (1, 1.0, "strength 1")]
    room, mask = folder / "inputs" / "room.png", folder / "inputs" / "mask.png"
    for item in items:
        inputs = {"image": room, **({"mask_image": mask} if item.prompt_index == 1 else {})}
        expected = studio.compose(item.prompt, item.loras, "merge", seed=item.seed, steps=2, guidance=5.0,
                                  strength=item.strength, **inputs)
        saved = folder / "out" / item.file
        assert np.array_equal(np.asarray(Image.open(saved).convert("RGB")), np.asarray(expected.image))
        recipe = Recipe.from_png(saved)
        assert recipe.mode == ("inpaint" if item.prompt_index == 1 else "img2img") and recipe.strength == item.strength
        assert recipe.inputs == {role: {"source": str(path.resolve()),
                                        "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
                                 for role, path in inputs.items()}
    # the strength axis matters, and inpainting keeps the unmasked area closer to the input than img2img
    a, b = (np.asarray(Image.open(folder / "out" / items[k].file), dtype=np.float32) for k in (0, 1))
    assert np.abs(a - b).max() > 1


def test_resume_and_ids_follow_the_input_content(rendered, studio, tmp_path):
    folder, grid, items, _ = rendered
    again = run_batch(items, folder / "out", BatchOptions(score=False, report=False), studio=studio)
    assert (again.rendered, again.done_before) == (0, 4)
    assert len(read_lines(folder / "out" / MANIFEST)) == 4
    # the same grid read again plans the same ids; an edited mask changes only the inpainting items' ids
    same, _ = load_grid(grid, allow=[EXAMPLE_LORAS])
    assert [i.id for i in same] == [i.id for i in items]
    copy = tmp_path / "copy"
    write_inputs(copy / "inputs")
    moved = write(copy, grid.read_text())
    assert [i.id for i in load_grid(moved, allow=[EXAMPLE_LORAS])[0]] == [i.id for i in items]  # content, not place
    edited = Image.open(copy / "inputs" / "mask.png")
    edited.paste(255, (0, 0, 8, 8))
    edited.save(copy / "inputs" / "mask.png")
    changed = load_grid(moved, allow=[EXAMPLE_LORAS])[0]
    assert [a.id == b.id for a, b in zip(changed, items)] == [True, True, False, False]


def test_controlnet_grid_item_equals_studio_compose(tmp_path, studio):
    paths = write_inputs(tmp_path / "inputs")
    build_tiny_sdxl_controlnet(build_tiny_sdxl().unet).save_pretrained(tmp_path / "controlnets" / "tiny")
    grid = write(tmp_path, grid_text('control_image = "inputs/edges.png"\ncontrolnet = "controlnets/tiny"',
                                     prompts=f'[[prompts]]\ntext = "{PROMPTS[0]}"\n',
                                     axes="controlnet_scale = [0.0, 0.7]"))
    items, _ = load_grid(grid, allow=[EXAMPLE_LORAS])
    assert [i.controlnet_scale for i in items] == [0.0, 0.7]
    run_batch(items, tmp_path / "out", BatchOptions(score=False, report=False), studio=studio)
    images = []
    for item in items:
        expected = studio.compose(item.prompt, item.loras, "merge", seed=0, steps=2, guidance=5.0,
                                  control_image=paths["control"], controlnet=tmp_path / "controlnets" / "tiny",
                                  controlnet_conditioning_scale=item.controlnet_scale)
        saved = np.asarray(Image.open(tmp_path / "out" / item.file).convert("RGB"))
        assert np.array_equal(saved, np.asarray(expected.image))
        recipe = Recipe.from_png(tmp_path / "out" / item.file)
        assert (recipe.mode, recipe.controlnet_conditioning_scale) == ("controlnet", item.controlnet_scale)
        images.append(saved.astype(np.float32))
    assert np.abs(images[0] - images[1]).max() > 1  # the ControlNet scale axis changes the image


@pytest.mark.parametrize("body, axes, message, needle", [
    ('image = "inputs/nothere.png"', "", r"image inputs/nothere\.png not found in the folders the grid grid\.toml may read",
     "image ="),
    ('image = "../elsewhere/room.png"', "", r"image \.\./elsewhere/room\.png is outside the folders", "image ="),
    ('image = "inputs/room.png"\nmask = "inputs/room.png"', "", r"mask inputs/room\.png: a mask must be single-channel",
     "mask ="),
    ('image = "inputs/room.png"\nmask = "inputs/black.png"', "", r"the mask is empty", "mask ="),
    ('mask = "inputs/mask.png"', "", r"a mask needs the image it masks", "mask ="),
    ("", "strength = [0.5]", r"'strength' applies to img2img and inpainting", "strength ="),
    ('image = "inputs/room.png"', "strength = [0.5, 1.5]", r"'strength': strength must be in \(0, 1\]", "strength ="),
    ('control_image = "inputs/edges.png"\ncontrolnet = "./nowhere"', "", r"controlnet \./nowhere is neither",
     "controlnet ="),
    ('control_image = "inputs/edges.png"\ncontrolnet = "inputs"', "", (r"controlnet inputs: a ControlNet is a "
                                                                       r"diffusers folder with config\.json"),
     "controlnet ="),
    ('image = "inputs/room.png"', "controlnet_scale = [0.5]", r"'controlnet_scale' needs a control image",
     "controlnet_scale ="),
    ('image = "inputs/notes.txt"', "", r"image inputs/notes\.txt: .*cannot read the image as an image", "image ="),
])
def test_bad_mode_inputs_fail_before_rendering(tmp_path, body, axes, message, needle):
    write_inputs(tmp_path / "grid" / "inputs")
    Image.new("L", (64, 64), 0).save(tmp_path / "grid" / "inputs" / "black.png")
    (tmp_path / "grid" / "inputs" / "notes.txt").write_text("not an image")
    write_inputs(tmp_path / "elsewhere")
    grid = write(tmp_path / "grid", grid_text(body, axes=axes))
    with pytest.raises(GridError, match=message) as info:
        load_grid(grid, allow=[EXAMPLE_LORAS])
    assert info.value.origin == str(grid)
    assert grid.read_text().splitlines()[info.value.line - 1].startswith(needle)  # the line that says it


def test_outside_input_is_allowed_by_allow_path_and_refused_per_prompt(tmp_path):
    write_inputs(tmp_path / "elsewhere")
    outside = tmp_path / "elsewhere" / "room.png"
    prompts = f'[[prompts]]\ntext = "{PROMPTS[0]}"\nimage = "{outside}"\n'
    (tmp_path / "grid-folder").mkdir()
    grid = write(tmp_path / "grid-folder", grid_text("", prompts=prompts))
    with pytest.raises(GridError, match=r"is outside the folders .* --allow-path") as info:
        load_grid(grid, allow=[EXAMPLE_LORAS])
    assert grid.read_text().splitlines()[info.value.line - 1].startswith("image =")  # the prompt's own line
    items, _ = load_grid(grid, allow=[EXAMPLE_LORAS, tmp_path / "elsewhere"])
    assert items[0].mode_kwargs()["image"] == str(outside.resolve())
    assert json.dumps(items[0].report_fields())  # the manifest can hold it


def test_cli_dry_run_plans_mode_items_and_refuses_outside_inputs(tmp_path):
    from typer.testing import CliRunner

    from studio.cli import app

    write_inputs(tmp_path / "elsewhere")
    (tmp_path / "grid").mkdir()
    grid = write(tmp_path / "grid", grid_text(f'image = "{tmp_path / "elsewhere" / "room.png"}"',
                                              axes="strength = [0.3, 0.6]"))
    refused = CliRunner().invoke(app, ["batch", str(grid), "--out", str(tmp_path / "out"), "--dry-run",
                                       "--allow-path", str(EXAMPLE_LORAS)])
    assert refused.exit_code == 2 and "is outside the folders" in refused.output and "room.png" in refused.output
    planned = CliRunner().invoke(app, ["batch", str(grid), "--out", str(tmp_path / "out"), "--dry-run",
                                       "--allow-path", str(EXAMPLE_LORAS), "--allow-path", str(tmp_path / "elsewhere")])
    assert planned.exit_code == 0, planned.output
    assert planned.output.count("todo") == 4 and not (tmp_path / "out").exists()  # 2 prompts x 2 strengths
