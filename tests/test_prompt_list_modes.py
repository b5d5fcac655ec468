"""Prompt lists (.txt/.csv/.jsonl) with mode inputs: ``--image``/``--mask``/``--control-image``/``--controlnet``/
``--strength``/``--controlnet-scale`` for every row, and a row's own ``image``/``mask``/``control_image`` column or
key. Each item renders the image ``Studio.compose`` renders from the same files; input files go through the list's
path policy; bad input stops before anything renders, naming the row's line or the option."""

from __future__ import annotations

import json

import numpy as np
import pytest
from batch_support import EXAMPLE_LORAS
from PIL import Image
from typer.testing import CliRunner

from pipelines.tiny import build_tiny_sdxl, build_tiny_sdxl_controlnet
from studio import Recipe, Studio
from studio.batch import BatchOptions, run_batch
from studio.cli import app
from studio.grid import GridError
from studio.prompt_list import load_prompt_list
from test_grid_modes import PROMPTS, write_inputs

LORAS = [f"{EXAMPLE_LORAS / 'random-subject.safetensors'}:0.9"]


@pytest.fixture(scope="module")
def studio() -> Studio:
    return Studio("tiny-sdxl-random")


def load(path, **kwargs):
    return load_prompt_list(path, model="tiny-sdxl-random", loras=LORAS, steps=[2], guidance=[5.0], **kwargs)


def test_csv_rows_with_their_own_images_equal_studio_compose(tmp_path, studio):
    """Row 1 img2img from --image; row 2 inpainting with its own mask column; --strength for both."""
    paths = write_inputs(tmp_path / "inputs")
    csv = tmp_path / "prompts.csv"
    csv.write_text(f'prompt,mask\n"{PROMPTS[0]}",\n"{PROMPTS[1]}",inputs/mask.png\n')
    items = load(csv, image="inputs/room.png", strength=0.6)
    assert [(i.prompt_index, i.strength) for i in items] == [(0, 0.6), (1, 0.6)]
    run_batch(items, tmp_path / "out", BatchOptions(score=False, report=False), studio=studio)
    for item in items:
        inputs = {"image": paths["image"], **({"mask_image": paths["mask"]} if item.prompt_index == 1 else {})}
        expected = studio.compose(item.prompt, item.loras, "merge", seed=0, steps=2, guidance=5.0, strength=0.6,
                                  **inputs)
        saved = tmp_path / "out" / item.file
        assert np.array_equal(np.asarray(Image.open(saved).convert("RGB")), np.asarray(expected.image))
        assert Recipe.from_png(saved).mode == ("inpaint" if item.prompt_index == 1 else "img2img")
    # ids follow the input content: without the mask column the second row's id changes, the first's does not
    csv.write_text(f'prompt\n"{PROMPTS[0]}"\n"{PROMPTS[1]}"\n')
    again = load(csv, image="inputs/room.png", strength=0.6)
    assert [a.id == b.id for a, b in zip(again, items)] == [True, False]


def test_jsonl_controlnet_from_the_cli_equals_studio_compose(tmp_path, studio):
    paths = write_inputs(tmp_path / "inputs")
    build_tiny_sdxl_controlnet(build_tiny_sdxl().unet).save_pretrained(tmp_path / "cn")
    listing = tmp_path / "prompts.jsonl"
    listing.write_text(json.dumps({"prompt": PROMPTS[0], "control_image": "inputs/edges.png"}) + "\n")
    done = CliRunner().invoke(app, ["batch", str(listing), "--out", str(tmp_path / "out"), "--model",
                                    "tiny-sdxl-random", "--lora", LORAS[0], "--steps", "2", "--guidance", "5",
                                    "--controlnet", str(tmp_path / "cn"), "--controlnet-scale", "0.7", "--no-score",
                                    "--no-report", "--allow-path", str(EXAMPLE_LORAS)])
    assert done.exit_code == 0, done.output
    [png] = sorted((tmp_path / "out").rglob("*.png"))
    recipe = Recipe.from_png(png)
    assert (recipe.mode, recipe.controlnet, recipe.controlnet_conditioning_scale) == (
        "controlnet", str((tmp_path / "cn").resolve()), 0.7)
    expected = studio.compose(PROMPTS[0], LORAS, "merge", seed=0, steps=2, guidance=5.0,
                              control_image=paths["control"], controlnet=tmp_path / "cn",
                              controlnet_conditioning_scale=0.7)
    assert np.array_equal(np.asarray(Image.open(png).convert("RGB")), np.asarray(expected.image))


def test_bad_prompt_list_inputs_name_the_line_or_option(tmp_path):
    write_inputs(tmp_path / "inputs")
    outside = tmp_path.parent / f"{tmp_path.name}-outside.png"
    Image.new("RGB", (8, 8)).save(outside)
    csv = tmp_path / "p.csv"
    cases = [
        ("prompt,mask\na,\nb,inputs/mask.png\n", {}, "p.csv:3: a mask needs the image it masks"),
        ("prompt,image\na,inputs/nothing.png\n", {}, "p.csv:2: image inputs/nothing.png not found"),
        ("prompt,image\na,inputs/mask.png\n", {"mask": "inputs/room.png"},
         "--mask: mask inputs/room.png: a mask must be single-channel"),
        ("prompt\na\n", {"image": str(outside)}, "--image: image .* is outside the folders"),
        ("prompt\na\n", {"strength": 0.5}, "--strength: 'strength' applies to img2img and inpainting"),
        ("prompt\na\n", {"image": "inputs/room.png", "strength": 1.5}, "--strength: strength must be in \\(0, 1\\]"),
        ("prompt\na\n", {"controlnet": "inputs"}, "--controlnet: 'controlnet' needs a control image"),
        ("prompt,picture\na,x.png\n", {}, "unknown CSV column\\(s\\) \\['picture'\\]"),
    ]
    for text, kwargs, message in cases:
        csv.write_text(text)
        with pytest.raises(GridError, match=message):
            load(csv, **kwargs)
    listing = tmp_path / "p.jsonl"
    listing.write_text('{"prompt": "a", "image": 3}\n')
    with pytest.raises(GridError, match="p.jsonl:1: 'image' must be an image file path"):
        load(listing)
    # a grid takes its inputs from the file, not from the prompt-list options
    grid = tmp_path / "g.toml"
    grid.write_text('model = "tiny-sdxl-random"\n[[prompts]]\ntext = "x"\n')
    done = CliRunner().invoke(app, ["batch", str(grid), "--out", str(tmp_path / "o"), "--image", "inputs/room.png"])
    assert done.exit_code != 0 and "--image apply to prompt lists" in done.output


def test_control_lora_in_a_grid_and_a_prompt_list_equals_studio_compose(tmp_path):
    """A FLUX control LoRA (written by diffusers' FluxControlPipeline.save_lora_weights) in a grid (control_lora =
    "file:weight") and in a prompt list (--control-lora): each item equals Studio.compose; the id follows the file's
    content and the weight."""
    from studio.grid import load_grid
    from test_control_lora import write_control_lora
    from test_modes import input_image

    write_control_lora(tmp_path / "cl", norms=True)
    input_image(6).save(tmp_path / "edges.png")
    grid = tmp_path / "g.toml"
    grid.write_text('model = "tiny-flux-random"\nsteps = 2\ncontrol_image = "edges.png"\n'
                    'control_lora = "cl/control.safetensors:0.7"\n[[prompts]]\ntext = "a corgi"\n')
    [item], _ = load_grid(grid)
    listing = tmp_path / "p.txt"
    listing.write_text("a corgi\n")
    [listed] = load_prompt_list(listing, model="tiny-flux-random", steps=[2], control_image="edges.png",
                                control_lora="cl/control.safetensors:0.7")
    assert listed.mode_kwargs()["control_lora"].weight == 0.7
    studio = Studio("tiny-flux-random")
    run_batch([item], tmp_path / "out", BatchOptions(score=False, report=False), studio=studio)
    saved = tmp_path / "out" / item.file
    recipe = Recipe.from_png(saved)
    assert recipe.mode == "control-lora" and recipe.control_lora["weight"] == 0.7
    expected = studio.compose("a corgi", [], "merge", seed=0, steps=2, control_image=tmp_path / "edges.png",
                              control_lora=f"{tmp_path / 'cl' / 'control.safetensors'}:0.7")
    assert np.array_equal(np.asarray(Image.open(saved).convert("RGB")), np.asarray(expected.image))
    grid.write_text(grid.read_text().replace(":0.7", ":0.5"))
    assert load_grid(grid)[0][0].id != item.id
    with pytest.raises(GridError, match="'control_lora' needs a control image"):
        load_prompt_list(listing, model="tiny-flux-random", control_lora="cl/control.safetensors")
    with pytest.raises(GridError, match="no .safetensors file there"):
        load_prompt_list(listing, model="tiny-flux-random", control_image="edges.png", control_lora="edges.png")
