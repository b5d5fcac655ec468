"""Recipes of img2img and inpainting renders (mode, strength, input files with SHA-256): round trips through the
PNG, `studio render --image/--mask/--strength` and `--recipe`, and every bad input refused before rendering."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipelines.errors import RecipeError, StudioError
from studio import Recipe, Studio
from studio.cli import app
from studio.settings import SettingsError
from test_modes import PROMPT, input_image, input_mask

runner = CliRunner()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    input_image(1).save(folder / "photo.png")
    input_mask().save(folder / "mask.png")
    return folder


@pytest.fixture(scope="module")
def studio():
    return Studio("tiny-sdxl-random")


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.mark.parametrize("mode", ["text2img", "img2img", "inpaint"])
def test_recipe_round_trip_per_mode(mode, studio, files, sdxl_loras, tmp_path):
    inputs = {"text2img": {}, "img2img": {"image": files / "photo.png", "strength": 0.6},
              "inpaint": {"image": files / "photo.png", "mask_image": files / "mask.png"}}[mode]
    result = studio.compose(PROMPT, [f"{sdxl_loras[0]}:0.7"], "composite" if mode == "inpaint" else "merge",
                            steps=3, seed=2, width=64, height=64, **inputs)
    [png] = result.save(tmp_path)
    recipe = Recipe.load(png)
    if mode == "text2img":
        assert recipe.mode is None and recipe.inputs is None
        assert not {"mode", "strength", "inputs"} & set(recipe.to_dict())  # text-to-image recipes as before
    else:
        assert recipe.mode == mode
        assert recipe.strength == (0.6 if mode == "img2img" else 0.9999)  # inpainting: diffusers' default
        for role, path in (("image", "photo.png"), ("mask_image", "mask.png")):
            if role in inputs:
                assert recipe.inputs[role] == {"source": str((files / path).resolve()),
                                               "sha256": hashlib.sha256((files / path).read_bytes()).hexdigest()}
    again = studio.reproduce(recipe).images[0]
    np.testing.assert_array_equal(np.asarray(again), pixels(png))


def test_reproducing_refuses_missing_or_changed_inputs(studio, files, sdxl_loras, tmp_path):
    moved = tmp_path / "in"
    moved.mkdir()
    shutil.copy(files / "photo.png", moved / "photo.png")
    result = studio.compose(PROMPT, [f"{sdxl_loras[0]}:0.7"], steps=2, image=moved / "photo.png", strength=0.5)
    recipe = result.recipe
    (moved / "photo.png").unlink()
    with pytest.raises(RecipeError, match=r"the image .*photo.png is missing; pass the same file with --image"):
        studio.reproduce(recipe)
    input_image(5).save(moved / "photo.png")  # other pixels under the same name
    with pytest.raises(RecipeError, match="is not the image the recipe was made from"):
        studio.reproduce(recipe)
    # the same file elsewhere, passed explicitly, reproduces
    again = studio.reproduce(recipe, image=files / "photo.png", output_type="np").latents[0]
    first = studio.compose(PROMPT, [f"{sdxl_loras[0]}:0.7"], steps=2, image=files / "photo.png", strength=0.5,
                           output_type="np").latents[0]
    np.testing.assert_array_equal(again, first)
    # an in-memory image is recorded by its pixels and must be passed again
    memory = studio.compose(PROMPT, [], steps=2, image=input_image(1), strength=0.5).recipe
    with pytest.raises(RecipeError, match="was an in-memory image"):
        studio.reproduce(memory)
    studio.reproduce(memory, image=input_image(1))


def test_old_and_damaged_recipes():
    old = Recipe.from_toml('model = "tiny-sdxl"\nprompt = "a corgi"\nseed = 3\n')
    assert old.mode is None and old.strength is None and old.inputs is None
    sha = "0" * 64
    good = {"model": "tiny-sdxl", "prompt": "p", "mode": "img2img", "strength": 0.5,
            "inputs": {"image": {"source": "a.png", "sha256": sha}}}
    assert Recipe.from_dict(dict(good)).inputs["image"]["source"] == "a.png"
    for change, message in [({"mode": "outpaint"}, "mode must be one of text2img, img2img, inpaint"),
                            ({"strength": 1.5}, r"strength must be in \(0, 1\]"),
                            ({"mode": "inpaint"}, "mode inpaint needs the inputs"),
                            ({"inputs": {"image": {"source": "a.png"}}}, "must be a table with 'source' and 'sha256'"),
                            ({"inputs": {"image": {"source": "a.png", "sha256": "xyz"}}}, "64 lowercase hex"),
                            ({"inputs": {"depth": {"source": "a.png", "sha256": sha}}}, "unknown roles"),
                            ({"mode": "text2img", "inputs": None}, "strength applies to img2img")]:
        with pytest.raises(RecipeError, match=message):
            Recipe.from_dict({**good, **change})


def test_bad_inputs_are_refused_before_rendering(studio, files, sdxl_loras, tmp_path):
    studio.unload()
    calls = []
    hook = studio.pipe.unet.register_forward_pre_hook(lambda m, a: calls.append(1))
    rgb_mask = tmp_path / "rgb-mask.png"
    input_mask().convert("RGB").save(rgb_mask)
    empty = tmp_path / "empty.png"
    Image.new("L", (64, 64), 100).save(empty)  # gray below 50 %: nothing binarises to "repaint"
    not_image = tmp_path / "notes.png"
    not_image.write_text("not a PNG")
    lora = [f"{sdxl_loras[0]}:0.7"]
    cases = [
        (dict(image=files / "photo.png", mask_image=rgb_mask), StudioError, "rgb-mask.png: a mask must be "
                                                                           "single-channel.*got a RGB image"),
        (dict(image=files / "photo.png", mask_image=empty), StudioError, "empty.png: the mask is empty"),
        (dict(mask_image=files / "mask.png"), StudioError, "a mask .* needs the image it masks"),
        (dict(strength=0.5), StudioError, "strength applies to img2img and inpainting"),
        (dict(image=files / "photo.png", strength=0.0), SettingsError, r"strength must be in \(0, 1\]"),
        (dict(image=files / "photo.png", strength=1.5), SettingsError, r"strength must be in \(0, 1\]"),
        (dict(image=files / "photo.png", strength=float("nan")), SettingsError, "strength must be a number"),
        (dict(image=files / "photo.png", strength=True), SettingsError, "strength must be a number"),
        (dict(image=tmp_path / "nowhere.png"), StudioError, "nowhere.png: image file not found"),
        (dict(image=not_image), StudioError, "notes.png: cannot read the image as an image"),
        (dict(image=42), StudioError, "image must be a PIL image or an image file path, got int"),
        (dict(pipeline_kwargs={"image": input_image()}), StudioError, "pass image as compose"),
    ]
    try:
        for kwargs, error, message in cases:
            with pytest.raises(error, match=message):
                studio.compose(PROMPT, lora, steps=2, width=64, height=64, **kwargs)
            assert not calls and not studio.composer.adapters, kwargs  # nothing rendered, nothing left attached
    finally:
        hook.remove()


def test_cli_img2img_inpaint_and_recipe(files, sdxl_loras, tmp_path):
    lora = ["--lora", f"{sdxl_loras[0]}:0.7"]
    common = ["--model", "tiny-sdxl-random", "--steps", "2", "--seed", "4"]
    done = runner.invoke(app, ["render", PROMPT, *lora, *common, "--image", str(files / "photo.png"), "--mask",
                               str(files / "mask.png"), "--strength", "0.8", "--out", str(tmp_path / "a")])
    assert done.exit_code == 0, done.output
    [png] = sorted((tmp_path / "a").glob("*.png"))
    recipe = Recipe.load(png)
    assert recipe.mode == "inpaint" and recipe.strength == 0.8 and (recipe.width, recipe.height) == (64, 64)
    loras = ["--allow-path", str(sdxl_loras[0].parent)]
    again = runner.invoke(app, ["render", "--recipe", str(png), *loras, "--allow-path", str(files), "--out",
                                str(tmp_path / "b")])
    assert again.exit_code == 0, again.output
    [png2] = sorted((tmp_path / "b").glob("*.png"))
    np.testing.assert_array_equal(pixels(png2), pixels(png))
    # the recipe's input files lie outside the folders it may read unless allowed (or passed)
    refused = runner.invoke(app, ["render", "--recipe", str(png), *loras, "--out", str(tmp_path / "c")])
    assert refused.exit_code == 2 and "outside the folders the recipe may read" in refused.output
    passed = runner.invoke(app, ["render", "--recipe", str(png), *loras, "--image", str(files / "photo.png"), "--mask",
                                 str(files / "mask.png"), "--out", str(tmp_path / "d")])
    assert passed.exit_code == 0, passed.output
    bad = runner.invoke(app, ["render", PROMPT, *common, "--image", str(files / "photo.png"), "--strength", "2",
                              "--out", str(tmp_path / "e")])
    assert bad.exit_code == 2 and "strength must be in (0, 1]" in bad.output
    missing = runner.invoke(app, ["render", PROMPT, *common, "--mask", str(tmp_path / "none.png")])
    assert missing.exit_code == 2 and "--mask" in missing.output and "file not found" in missing.output


def test_web_recipe_endpoint_refuses_mode_recipes():
    """The endpoint never opens a client's paths, so it cannot reproduce a recipe made from input images."""
    from types import SimpleNamespace

    from ui.recipe_api import render_recipe

    callbacks = SimpleNamespace(studio=SimpleNamespace(model="tiny-sdxl"))
    text = ('model = "tiny-sdxl"\nprompt = "p"\nmode = "inpaint"\n[inputs.image]\nsource = "/etc/a.png"\n'
            f'sha256 = "{"0" * 64}"\n[inputs.mask_image]\nsource = "/etc/m.png"\nsha256 = "{"1" * 64}"\n')
    with pytest.raises(StudioError, match="mode inpaint needs its input images"):
        render_recipe(callbacks, text)
