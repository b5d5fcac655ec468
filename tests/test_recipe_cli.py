"""Recipes in PNGs and TOML, the ``studio`` CLI (render, render --recipe, library, strategies)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import writers
from pipelines.errors import RecipeError
from studio import Recipe, Studio
from studio.cli import app

runner = CliRunner()


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_png_embeds_recipe_and_a1111_parameters(sdxl_te_loras, tmp_path):
    studio = Studio("tiny-sdxl-random")
    result = studio.compose("a corgi, watercolor", [f"{sdxl_te_loras[0]}:0.8:start=0.1",
                                                    {"source": sdxl_te_loras[1], "blocks": {"down": 0.5}}],
                            "switch", strategy_params={"tau": 2}, negative_prompt="blurry", seed=7, steps=4)
    (path,) = result.save(tmp_path)
    text = Image.open(path).text
    assert "studio_recipe" in text and "parameters" in text
    recipe = Recipe.from_png(path)
    assert recipe == result.recipe
    assert recipe.strategy_params == {"tau": 2} and recipe.loras[0].start == 0.1
    assert recipe.loras[1].blocks == {"down": 0.5} and len(recipe.loras[0].sha256) == 64
    a1111 = text["parameters"]
    assert a1111.startswith("a corgi, watercolor <lora:")
    assert "Negative prompt: blurry" in a1111 and "Seed: 7" in a1111 and "Steps: 4" in a1111
    again = studio.reproduce(recipe)
    assert np.array_equal(np.asarray(again.image), np.asarray(result.image))


def test_a1111_parameters_parse():
    text = ("masterpiece, a knight <lora:armor_v2:0.7> in a castle <lora:oil:1>\n"
            "Negative prompt: lowres, bad hands\n"
            'Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234, Size: 832x1216, '
            'Model hash: abc, Model: sdxl_base, Lora hashes: "armor_v2: 1a2b, oil: 3c4d", Version: v1.9')
    recipe = Recipe.from_a1111(text)
    assert recipe.prompt == "masterpiece, a knight in a castle"
    assert recipe.negative_prompt == "lowres, bad hands"
    assert (recipe.steps, recipe.guidance, recipe.seed, recipe.width, recipe.height) == (28, 6.5, 1234, 832, 1216)
    assert [(lora.name, lora.weight) for lora in recipe.loras] == [("armor_v2", 0.7), ("oil", 1.0)]
    with pytest.raises(RecipeError, match="no 'Steps:' line"):
        Recipe.from_a1111("just a prompt")


def test_toml_recipe_round_trip_and_errors(tmp_path):
    recipe = Recipe(model="tiny-sdxl-random", prompt="a fox", strategy="composite", seed=3, steps=5, width=64, height=64)
    path = tmp_path / "r.toml"
    path.write_text(recipe.to_toml())
    assert Recipe.load(path) == recipe
    path.write_text('model = "tiny-sdxl-random"\nprompt = "x"\ncolour = "red"\n')
    with pytest.raises(RecipeError, match=r"r\.toml: unknown recipe keys \['colour'\]"):
        Recipe.load(path)
    path.write_text("model = [")
    with pytest.raises(RecipeError, match="invalid TOML"):
        Recipe.load(path)


def test_cli_render_and_reproduce(sdxl_loras, tmp_path):
    out = tmp_path / "out"
    args = ["render", "a corgi in a garden", "--lora", f"{sdxl_loras[0]}:0.9", "--lora", f"{sdxl_loras[1]}:0.6",
            "--strategy", "composite", "--steps", "3", "--seed", "11", "--count", "2", "--out", str(out),
            "--model", "tiny-sdxl-random"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["composite-seed11.png", "composite-seed12.png"]
    again = tmp_path / "again"
    result = runner.invoke(app, ["render", "--recipe", str(files[1]), "--out", str(again),
                                 "--allow-path", str(sdxl_loras[0].parent.parent)])  # the LoRAs' folder
    assert result.exit_code == 0, result.output
    assert np.array_equal(pixels(again / "composite-seed12.png"), pixels(files[1]))


def test_cli_errors_are_clear(tmp_path):
    result = runner.invoke(app, ["render", "a corgi", "--strategy", "blend", "--steps", "1", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "unknown strategy 'blend'" in result.output
    result = runner.invoke(app, ["render", "a corgi", "--lora", str(tmp_path / "missing.safetensors"),
                                 "--model", "tiny-sdxl-random", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "file not found" in result.output


def test_cli_strategies_lists_the_registry():
    result = runner.invoke(app, ["strategies", "--json"])
    assert result.exit_code == 0
    rows = {row["name"]: row for row in json.loads(result.output)}
    from fusion import REGISTRY

    assert set(rows) == set(REGISTRY)
    assert rows["switch"]["params"][0]["name"] == "tau" and rows["switch"]["params"][0]["default"] == 5


def test_cli_library_reads_metadata(sdxl_loras, tmp_path):
    lib = tmp_path / "lib"
    tags = json.dumps({"10_corgi": {"corgi dog": 12, "grass": 3}})
    writers.kohya_from_peft(sdxl_loras[0], lib / "subjects" / "corgi.safetensors",
                            metadata={"ss_output_name": "corgi-v1", "ss_base_model_version": "sdxl_base_v1-0",
                                      "ss_tag_frequency": tags})
    (lib / "subjects" / "corgi.preview.png").write_bytes(b"")
    writers.write_state_dict(lib / "styles" / "flux-style.safetensors",
                             {"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.zeros(2, 4),
                              "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.zeros(4, 2)},
                             {"modelspec.trigger_phrase": "inkwash, sumi-e"})
    (lib / "broken.safetensors").write_bytes(b"\x00")
    result = runner.invoke(app, ["library", str(lib), "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["relative_path"]: row for row in json.loads(result.stdout)}
    corgi = rows["subjects/corgi.safetensors"]
    assert corgi["name"] == "corgi-v1" and corgi["base"] == "sdxl" and corgi["format"] == "kohya"
    assert corgi["rank"] == 4 and corgi["triggers"][:2] == ["corgi dog", "grass"]
    assert corgi["preview"].endswith("corgi.preview.png")
    style = rows["styles/flux-style.safetensors"]
    assert style["base"] == "flux" and style["triggers"] == ["inkwash", "sumi-e"]
    assert "broken.safetensors" in result.output  # reported as skipped, not fatal
    table = runner.invoke(app, ["library", str(lib)])
    assert table.exit_code == 0 and "corgi-v1" in table.stdout
