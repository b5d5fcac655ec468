"""ControlNet in the web app's input panel (``ui.controlnets``, the Generate handler), without a browser, on the
tiny SDXL model with a tiny ControlNet (``ControlNetModel.from_unet``, seeded) saved to a folder the app is started
with. The image the app makes equals ``Studio.compose`` with the same control image, ControlNet folder and scale."""

from __future__ import annotations

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from pipelines.errors import StudioError
from pipelines.tiny import build_tiny_sdxl, build_tiny_sdxl_controlnet
from studio import Recipe, Studio
from studio.library import Library
from test_modes import input_image
from ui.callbacks import Callbacks
from ui.controlnets import NONE, find_controlnets
from ui.handlers import Handlers
from ui_support import build_library


def no_progress(*args, **kwargs):
    pass


@pytest.fixture(scope="module")
def controlnet_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("controlnets") / "tiny-canny"
    build_tiny_sdxl_controlnet(build_tiny_sdxl().unet).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def studio():
    return Studio("tiny-sdxl-random")


@pytest.fixture()
def h(studio, controlnet_dir, tmp_path):
    library = Library(build_library(tmp_path / "loras"))
    return Handlers(Callbacks(studio, library, out_dir=tmp_path / "out", preview_every=0,
                              controlnets=find_controlnets([controlnet_dir])))


def generate(h, stack=(), **inputs):
    return list(h.generate("a zorb", "", 3, 3, 5.0, 64, 64, 1, "merge", {}, list(stack), progress=no_progress,
                           **inputs))[-1]


def test_controlnet_from_the_input_panel_equals_compose(h, studio, controlnet_dir):
    stack, _, _ = h.cb.add("random-subject.safetensors", [], 0)
    edges = input_image(7)
    *_, items, recipe_text, png, _, _ = generate(h, stack, control_image=edges, controlnet="tiny-canny",
                                                 controlnet_scale=0.7)
    recipe = Recipe.from_png(png["value"])
    assert (recipe.mode, recipe.controlnet, recipe.controlnet_conditioning_scale) == (
        "controlnet", str(controlnet_dir.resolve()), 0.7)
    assert recipe.inputs["control_image"]["source"] == "<image>" and 'mode = "controlnet"' in recipe_text
    made = np.asarray(Image.open(png["value"]).convert("RGB"))
    lora = f"{h.cb.library.path('random-subject.safetensors')}:1.0"
    direct = studio.compose("a zorb", [lora], "merge", seed=3, steps=3, guidance=5.0, width=64, height=64,
                            control_image=edges, controlnet=controlnet_dir, controlnet_conditioning_scale=0.7)
    np.testing.assert_array_equal(made, np.asarray(direct.image))
    # the ControlNet matters: at scale 0 the image differs
    *_, png0, _, _ = generate(h, stack, control_image=edges, controlnet="tiny-canny", controlnet_scale=0.0)
    assert not np.array_equal(np.asarray(Image.open(png0["value"]).convert("RGB")), made)
    # without a control image the ControlNet choice is not used: text-to-image
    *_, png_t2i, _, _ = generate(h, stack, controlnet="tiny-canny", controlnet_scale=0.7)
    assert Recipe.from_png(png_t2i["value"]).mode is None


@pytest.mark.parametrize("choice, message", [(NONE, "a control image needs a ControlNet: pick one of tiny-canny"),
                                             ("../elsewhere", "ControlNet '../elsewhere' is not one this app was "
                                                              "started with \\(tiny-canny\\)")])
def test_bad_controlnet_choices_are_refused_before_rendering(h, choice, message):
    with pytest.raises(gr.Error, match=message):
        generate(h, control_image=input_image(7), controlnet=choice, controlnet_scale=1.0)
    assert not list(h.cb.out_dir.iterdir())


def test_controlnet_folders_are_checked_at_start(tmp_path, controlnet_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(StudioError, match="not a folder"):
        find_controlnets([tmp_path / "missing"])
    with pytest.raises(StudioError, match="a ControlNet is a diffusers folder with config.json"):
        find_controlnets([tmp_path / "empty"])
    assert list(find_controlnets([controlnet_dir, controlnet_dir])) == ["tiny-canny", "tiny-canny-2"]


def test_app_without_controlnets_says_how_to_add_one(studio, tmp_path):
    from ui.app import build_app

    h = Handlers(Callbacks(studio, Library(build_library(tmp_path / "loras")), out_dir=tmp_path / "out"))
    with pytest.raises(gr.Error, match="start the app with --controlnet DIR"):
        generate(h, control_image=input_image(7), controlnet=NONE)
    demo = build_app(h.cb)
    [dropdown] = [c for c in demo.config["components"] if c.get("props", {}).get("elem_id") == "controlnet"]
    assert [tuple(c) for c in dropdown["props"]["choices"]] == [(NONE, NONE)]


def test_flux_control_lora_from_the_input_panel_equals_compose(tmp_path):
    """On a FLUX model started with --control-lora: the same list offers it; the image equals Studio.compose with
    that control LoRA at the slider's weight (FluxControlPipeline)."""
    from test_control_lora import write_control_lora
    from ui.app import build_app
    from ui.controlnets import find_control_loras

    control = write_control_lora(tmp_path / "canny", norms=True)
    flux = Studio("tiny-flux-random")
    offered = find_control_loras([control])
    assert list(offered) == ["control (control LoRA)"]
    h = Handlers(Callbacks(flux, Library(build_library(tmp_path / "loras")), out_dir=tmp_path / "out",
                           preview_every=0, control_loras=offered))
    [dropdown] = [c for c in build_app(h.cb).config["components"] if c.get("props", {}).get("elem_id") == "controlnet"]
    assert [tuple(c)[0] for c in dropdown["props"]["choices"]] == [NONE, "control (control LoRA)"]
    edges = input_image(4)
    *_, png, _, _ = list(h.generate("a zorb", "", 3, 3, 3.5, 64, 64, 1, "merge", {}, [], progress=no_progress,
                                    control_image=edges, controlnet="control (control LoRA)",
                                    controlnet_scale=0.8))[-1]
    recipe = Recipe.from_png(png["value"])
    assert recipe.mode == "control-lora" and recipe.control_lora["weight"] == 0.8
    direct = flux.compose("a zorb", [], "merge", seed=3, steps=3, guidance=3.5, width=64, height=64,
                          control_image=edges, control_lora=f"{control}:0.8")
    np.testing.assert_array_equal(np.asarray(Image.open(png["value"]).convert("RGB")), np.asarray(direct.image))
    with pytest.raises(StudioError, match="not a .safetensors file"):
        find_control_loras([tmp_path / "missing.safetensors"])
