"""Batch inputs: grids and prompt lists → items with stable ids; bad input stops before anything renders."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from batch_support import EXAMPLE_LORAS, ROOT, write_grid
from studio.cli import app
from studio.grid import GridError, load_grid
from studio.prompt_list import load_prompt_list

runner = CliRunner()
SUBJECT = str(EXAMPLE_LORAS / "random-subject.safetensors")
STYLE = str(EXAMPLE_LORAS / "random-style.safetensors")
ALLOW = [EXAMPLE_LORAS]  # the test grids name the example LoRAs by absolute path: allowed explicitly (--allow-path)


def test_grid_expands_with_stable_ids(tmp_path):
    grid = write_grid(tmp_path / "g.toml", prompts=2, strategies=("merge", "switch:tau=2"), seeds=(0, 1, 2))
    items, model = load_grid(grid, allow=ALLOW)
    assert model == "tiny-sdxl-random" and len(items) == 2 * 2 * 3
    assert len({i.id for i in items}) == 12 and len({i.file for i in items}) == 12
    assert [i.row for i in items[:6]] == ["merge"] * 3 + ["switch(tau=2)"] * 3
    assert [i.column for i in items[:3]] == ["seed 0", "seed 1", "seed 2"]
    assert items[0].concepts == {"subject": "a zorb", "style": "inkwash"}
    assert dict(items[3].strategy.params)["tau"] == 2
    # the same grid read again (another process, another run) gives the same ids; any change gives new ones
    assert [i.id for i in load_grid(grid, allow=ALLOW)[0]] == [i.id for i in items]
    moved = tmp_path / "other" / "g.toml"
    moved.parent.mkdir()
    moved.write_text(grid.read_text())
    assert [i.id for i in load_grid(moved, allow=ALLOW)[0]] == [i.id for i in items]
    write_grid(grid, prompts=2, strategies=("merge", "switch:tau=2"), seeds=(0, 1, 2), steps=3)
    assert not {i.id for i in load_grid(grid, allow=ALLOW)[0]} & {i.id for i in items}


def test_example_grids_load():
    for name, count, column in (("strategies-by-seed.toml", 18, "seed 0"), ("weights-sweep.toml", 24, "w=0.4")):
        items, _ = load_grid(ROOT / "assets" / "grids" / name)
        assert len(items) == count and items[0].column == column


def test_weights_axis_and_columns(tmp_path):
    grid = write_grid(tmp_path / "g.toml", prompts=1, strategies=("merge",), seeds=(3,),
                      extra="weights = [0.5, [1.0, 0.25]]\n[report]\ncolumns = \"weights\"")
    items, _ = load_grid(grid, allow=ALLOW)
    assert [i.weights for i in items] == [[0.5, 0.5], [1.0, 0.25]]
    assert [i.column for i in items] == ["w=0.5", "w=1/0.25"]


@pytest.mark.parametrize("text, message, line", [
    ('model = "tiny-sdxl-random"\ncolour = "red"\n[[prompts]]\ntext = "x"\n', "unknown key 'colour' in the grid", 2),
    ('model = "tiny-sdxl-random"\n[[prompts]]\ntext = "x"\n[axes]\nseed = [0]\nsampler = ["euler"]\n',
     "unknown key 'sampler' in [axes]", 6),
    ('model = "tiny-sdxl-random"\n[[prompts]]\ntext = "x"\n[axes]\nstrategy = ["merge",\n  "mystery"]\n',
     "unknown strategy 'mystery'", 6),
    ('model = "tiny-sdxl-random"\n[[prompts]]\ntext = "x"\n[axes]\nstrategy = ["switch:tao=2"]\n', "has no parameter 'tao'", 5),
    ('model = "tiny-sdxl-random"\n[[stacks]]\nname = "s"\nloras = [\n  "missing/nowhere.safetensors:0.5",\n]\n'
     '[[prompts]]\ntext = "x"\n', "LoRA missing/nowhere.safetensors: not found", 5),
    ('model = "tiny-sdxl-random"\n[[prompts]]\ntext = "x"\nconcept = "y"\n', "unknown key 'concept' in prompt #1", 4),
    ('model = "tiny-sdxl-random"\n[[prompts]]\ntext = "x"\n[axes]\nseed = [0, 0]\n', "names the same image twice", None),
    ('model = "tiny-sdxl-random"\nsteps = [\n', "invalid TOML", 2),
    ('model = "tiny-sdxl-random"\n[[prompts]]\ntext = "x"\n[report]\ncolumns = "colour"\n', "columns must be one of", 5),
])
def test_bad_grids_name_file_and_line(tmp_path, text, message, line):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(GridError, match=message.replace("[", r"\[").replace("(", r"\(")) as info:
        load_grid(path)
    assert str(info.value).startswith(f"{path}:{line}: " if line else f"{path}: ")


def test_bad_lora_entries(tmp_path):
    grid = write_grid(tmp_path / "g.toml", extra="weights = [[1.0, 0.5, 0.2]]")
    with pytest.raises(GridError, match=r"weights \[1.0, 0.5, 0.2\] has 3 values but stack 'zorb\+inkwash' has 2"):
        load_grid(grid, allow=ALLOW)
    text = write_grid(tmp_path / "h.toml").read_text().replace('concept = "inkwash"', 'concept = "inkwash", colour = 1')
    (tmp_path / "h.toml").write_text(text)
    with pytest.raises(GridError, match=r"h\.toml:9: LoRA entry has unknown keys \['colour'\]"):
        load_grid(tmp_path / "h.toml", allow=ALLOW)
    text = write_grid(tmp_path / "k.toml").read_text() + '\n[[prompts]]\ntext = "y"\nconcepts = { nobody = "z" }\n'
    (tmp_path / "k.toml").write_text(text)
    with pytest.raises(GridError, match=r"concept\(s\) for \['nobody'\]"):
        load_grid(tmp_path / "k.toml", allow=ALLOW)


def test_prompt_lists(tmp_path):
    (tmp_path / "p.txt").write_text("# prompts\na zorb\n\na zorb at night\n")
    items = load_prompt_list(tmp_path / "p.txt", model="tiny-sdxl-random", loras=[f"{SUBJECT}:0.8:name=subject"],
                             concepts={"subject": "a zorb"}, strategies=["merge", "composite"], seeds=[1, 2])
    assert len(items) == 2 * 2 * 2 and items[0].concepts == {"subject": "a zorb"}
    (tmp_path / "p.csv").write_text('prompt,negative,concept:style\n"a zorb, inkwash",blurry,inkwash\nzorb 2,,\n')
    items = load_prompt_list(tmp_path / "p.csv", model="tiny-sdxl-random", loras=[f"{STYLE}:0.7:name=style"])
    assert [(i.prompt, i.negative, i.concepts) for i in items] == [
        ("a zorb, inkwash", "blurry", {"style": "inkwash"}), ("zorb 2", "", {})]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a zorb", "concepts": {"style": "ink"}}\n"plain prompt"\n')
    items = load_prompt_list(tmp_path / "p.jsonl", model="tiny-sdxl-random", loras=[f"{STYLE}:0.7:name=style"])
    assert [i.prompt for i in items] == ["a zorb", "plain prompt"]


@pytest.mark.parametrize("name, text, message", [
    ("bad.csv", "prompt,negative\nok,fine\nbroken,row,extra\n", r"bad\.csv:3: row has 3 field\(s\), the header has 2"),
    ("bad.csv", 'prompt\n"multi\nline"\n"unterminated\n', r"bad\.csv:4: broken CSV row"),
    ("bad.csv", "text\nx\n", r"bad\.csv:1: the CSV header needs a 'prompt' column"),
    ("bad.csv", "prompt,negative\nfine,\n\n,blurry\n", r"bad\.csv:4: empty prompt"),
    ("bad.jsonl", '{"prompt": "a"}\n{"prompt": "b",}\n', r"bad\.jsonl:2: invalid JSON"),
    ("bad.jsonl", '{"prompt": "a"}\n\n{"prompt": "b", "seed": 3}\n', r"bad\.jsonl:3: unknown key\(s\) \['seed'\]"),
    ("bad.jsonl", '{"negative": "x"}\n', r"bad\.jsonl:1: needs a non-empty 'prompt'"),
    ("bad.md", "a zorb\n", r"bad\.md: a batch input is a \.toml grid or a prompt list"),
])
def test_broken_prompt_rows_name_file_and_line(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(GridError, match=message):
        load_prompt_list(tmp_path / name, model="tiny-sdxl-random")


def test_cli_bad_input_fails_before_rendering(tmp_path, monkeypatch):
    import studio.api

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(studio.api.Studio, "__init__", no_model)
    out = tmp_path / "out"
    (tmp_path / "p.txt").write_text("a zorb\n")
    cases = [
        (["batch", str(tmp_path / "p.txt"), "--lora", "nowhere.safetensors", "--out", str(out)],
         "--lora: LoRA nowhere.safetensors: file not found"),
        (["batch", str(tmp_path / "p.txt"), "--strategy", "mystery", "--out", str(out)], "unknown strategy 'mystery'"),
        (["batch", str(tmp_path / "p.txt"), "--lora", SUBJECT, "--concept", "style=ink", "--out", str(out)],
         "--concept: no --lora is called ['style']"),
        (["batch", str(write_grid(tmp_path / "g.toml")), "--seed", "3", "--out", str(out)],
         "--seed apply to prompt lists; a grid sets them in the file"),
        (["batch", str(tmp_path / "p.txt"), "--clip-model", "ViT-Q-99", "--out", str(out)],
         "unknown CLIP model 'ViT-Q-99'"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.output.split()), result.output
        assert not out.exists()
