"""ControlNet through the studio's seam (tiny SDXL ControlNet from ``ControlNetModel.from_unet``, tiny FLUX
ControlNet from ``FluxControlNetModel.from_transformer``, seeded): merge equals the stock ControlNet pipeline
with ``load_lora_weights`` + ``set_adapters``; composite equals N plain passes averaged; ControlNets for another
base and unsupported combinations are refused before rendering; recipes reproduce."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffusers
import writers
from PIL import Image
from pipelines.errors import StudioError
from pipelines.tiny import build_tiny_flux, build_tiny_flux_controlnet, build_tiny_sdxl, build_tiny_sdxl_controlnet
from reference import load_adapters, run_lanes
from studio import Recipe, Studio
from test_from_pipe import assert_same, snapshot
from test_modes import ATOL, PROMPT, input_image, input_mask

PIPES = {"sdxl": diffusers.StableDiffusionXLControlNetPipeline, "flux": diffusers.FluxControlNetPipeline}
CONTROL_ARG = {"sdxl": "image", "flux": "control_image"}  # what the stock pipelines call the control image


@pytest.fixture(scope="module")
def controlnets():
    return {"sdxl": build_tiny_sdxl_controlnet(build_tiny_sdxl().unet),
            "flux": build_tiny_flux_controlnet(build_tiny_flux().transformer)}


@pytest.fixture(scope="module")
def studios():
    return {family: Studio(f"tiny-{family}-random") for family in ("sdxl", "flux")}


@pytest.fixture(scope="module")
def unet_only_loras(lora_dir, sdxl_loras):
    """LoRAs without text-encoder parts (ControlNet lanes share one text conditioning)."""
    return {"sdxl": sdxl_loras[:2], "flux": [writers.peft_flux(lora_dir / "flux-cn-a", 51, rank=4, alpha=4),
                                             writers.peft_flux(lora_dir / "flux-cn-b", 52, rank=2, alpha=4)]}


def plain(family: str, controlnet):
    base = build_tiny_sdxl() if family == "sdxl" else build_tiny_flux()
    pipe = PIPES[family](**base.components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def guidance(family: str) -> float:
    return 5.0 if family == "sdxl" else 3.5


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_merge_equals_plain_controlnet_pipeline(family, controlnets, studios, sdxl_te_loras, sdxl_loras, flux_loras):
    files, weights = ([sdxl_te_loras[0], sdxl_loras[1]] if family == "sdxl" else flux_loras), [0.8, 0.6]
    control = input_image(7)
    ref = plain(family, controlnets[family])
    ref.set_adapters(load_adapters(ref, files), weights)
    with torch.no_grad():
        expected = ref(PROMPT, num_inference_steps=3, guidance_scale=guidance(family), height=64, width=64,
                       controlnet_conditioning_scale=0.7, **{CONTROL_ARG[family]: control},
                       generator=torch.Generator("cpu").manual_seed(3), output_type="np").images[0]
    loras = [f"{f}:{w}" for f, w in zip(files, weights)]
    common = dict(steps=3, seed=3, guidance=guidance(family), width=64, height=64, output_type="np")
    result = studios[family].compose(PROMPT, loras, "merge", control_image=control, controlnet=controlnets[family],
                                     controlnet_conditioning_scale=0.7, **common)
    np.testing.assert_allclose(result.latents[0], expected, atol=ATOL, rtol=0)
    assert result.recipe.mode == "controlnet" and result.recipe.controlnet == "<ControlNet>"
    # the ControlNet matters
    off = studios[family].compose(PROMPT, loras, "merge", control_image=control, controlnet=controlnets[family],
                                  controlnet_conditioning_scale=0.0, **common).latents[0]
    assert np.abs(off - expected).max() > 10 * ATOL


WITH_IMAGE = {("sdxl", "img2img"): diffusers.StableDiffusionXLControlNetImg2ImgPipeline,
              ("sdxl", "inpaint"): diffusers.StableDiffusionXLControlNetInpaintPipeline,
              ("flux", "img2img"): diffusers.FluxControlNetImg2ImgPipeline,
              ("flux", "inpaint"): diffusers.FluxControlNetInpaintPipeline}


@pytest.mark.parametrize("family,mode", sorted(WITH_IMAGE))
def test_controlnet_img2img_and_inpaint_merge_equal_plain(family, mode, controlnets, studios, unet_only_loras):
    """ControlNet img2img / inpainting: the control image plus an input image (and mask), through the stock
    ControlNet img2img / inpainting pipelines of diffusers."""
    files, weights = unet_only_loras[family], [0.8, 0.6]
    inputs = {"image": input_image(3), "strength": 0.7, **({"mask_image": input_mask()} if mode == "inpaint" else {})}
    base = build_tiny_sdxl() if family == "sdxl" else build_tiny_flux()
    ref = WITH_IMAGE[(family, mode)].from_pipe(base, controlnet=controlnets[family])  # float32: from_pipe casts nothing
    ref.set_progress_bar_config(disable=True)
    ref.set_adapters(load_adapters(ref, files), weights)
    with torch.no_grad():
        expected = ref(PROMPT, control_image=input_image(7), num_inference_steps=4, guidance_scale=guidance(family),
                       height=64, width=64, generator=torch.Generator("cpu").manual_seed(5), output_type="np",
                       **inputs).images[0]
    result = studios[family].compose(PROMPT, [f"{f}:{w}" for f, w in zip(files, weights)], "merge", steps=4, seed=5,
                                     guidance=guidance(family), width=64, height=64, output_type="np",
                                     control_image=input_image(7), controlnet=controlnets[family], **inputs)
    np.testing.assert_allclose(result.latents[0], expected, atol=ATOL, rtol=0)
    assert (result.recipe.mode, result.recipe.strength) == (f"controlnet-{mode}", 0.7)
    # the pipeline's default scale, recorded (SDXL ControlNet img2img: 0.8)
    assert result.recipe.controlnet_conditioning_scale == (0.8 if (family, mode) == ("sdxl", "img2img") else 1.0)
    assert sorted(result.recipe.inputs) == sorted(["control_image", *(k for k in inputs if k != "strength")])


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_composite_equals_average_of_plain_controlnet_passes(family, controlnets, studios, unet_only_loras):
    files, weights = unet_only_loras[family], [0.9, 0.7]
    control = input_image(8)
    ref = plain(family, controlnets[family])
    names = load_adapters(ref, files)
    expected = run_lanes(ref, family, lambda s: [(0, 0.5), (1, 0.5)], names=names, weights=weights, prompt=PROMPT,
                         negative_prompt="blurry", steps=3, guidance=guidance(family), seed=9,
                         pipeline_kwargs={CONTROL_ARG[family]: control})
    result = studios[family].compose(PROMPT, [f"{f}:{w}" for f, w in zip(files, weights)], "composite", steps=3,
                                     seed=9, guidance=guidance(family), negative_prompt="blurry", width=64, height=64,
                                     output_type="np", control_image=control, controlnet=controlnets[family])
    np.testing.assert_allclose(result.latents[0], expected, atol=ATOL, rtol=0)


def test_users_controlnet_pipeline_from_pipe_and_unload(controlnets, sdxl_loras):
    pipe = plain("sdxl", controlnets["sdxl"])
    with torch.no_grad():
        pipe(PROMPT, image=input_image(7), num_inference_steps=1, height=64, width=64, output_type="np")
    before = snapshot(pipe)
    studio = Studio.from_pipe(pipe)
    loras = [f"{sdxl_loras[0]}:0.8", f"{sdxl_loras[1]}:0.5"]
    got = studio.compose(PROMPT, loras, "cmlora", steps=3, width=64, height=64, control_image=input_image(7),
                         output_type="np")  # the pipeline's own ControlNet; no deep-feature cache with it
    assert got.recipe.controlnet == "<pipeline>" and np.isfinite(got.latents[0]).all()
    studio.compose(PROMPT, loras, "merge", steps=2, width=64, height=64, output_type="np")  # text-to-image too
    studio.unload()
    assert_same(pipe, before)


def test_controlnet_recipe_round_trip(controlnets, studios, sdxl_loras, tmp_path):
    folder = tmp_path / "cn"
    controlnets["sdxl"].save_pretrained(folder)
    input_image(7).save(tmp_path / "edges.png")
    studio = studios["sdxl"]
    result = studio.compose(PROMPT, [f"{sdxl_loras[0]}:0.8"], "merge", steps=2, seed=1,
                            control_image=tmp_path / "edges.png", controlnet=folder, controlnet_conditioning_scale=0.5)
    [png] = result.save(tmp_path / "out")
    recipe = Recipe.load(png)
    assert (recipe.mode, recipe.controlnet, recipe.controlnet_conditioning_scale) == ("controlnet",
                                                                                      str(folder.resolve()), 0.5)
    again = studio.reproduce(recipe).images[0]
    np.testing.assert_array_equal(np.asarray(again), np.asarray(result.images[0]))


def test_bad_controlnet_inputs_are_refused_before_rendering(controlnets, studios, sdxl_loras, sdxl_te_loras):
    studio = studios["sdxl"]
    studio.unload()
    calls = []
    hook = studio.pipe.unet.register_forward_pre_hook(lambda m, a: calls.append(1))
    other = diffusers.ControlNetModel(in_channels=4, block_out_channels=(32, 64), down_block_types=(
        "DownBlock2D", "CrossAttnDownBlock2D"), cross_attention_dim=32, norm_num_groups=16, layers_per_block=1,
        attention_head_dim=(2, 4), conditioning_embedding_out_channels=(16, 32))  # an SD-1.5-like ControlNet
    cases = [
        (dict(controlnet=other), "made for another base model.*cross_attention_dim 32 \\(model: 64\\)"),
        (dict(controlnet=controlnets["flux"]), "must be a diffusers ControlNetModel, got FluxControlNetModel"),
        (dict(controlnet=None), "a control image needs a ControlNet"),
        (dict(controlnet=controlnets["sdxl"], mask_image=input_mask()), "a mask .* needs the image it masks"),
        (dict(controlnet=controlnets["sdxl"], controlnet_conditioning_scale=float("nan")),
         "controlnet_conditioning_scale must be a number from 0 to 10"),
    ]
    try:
        for kwargs, message in cases:
            with pytest.raises(StudioError, match=message):
                studio.compose(PROMPT, [f"{sdxl_loras[0]}:0.8"], steps=2, control_image=input_image(7), **kwargs)
        with pytest.raises(StudioError, match="needs a control image"):
            studio.compose(PROMPT, [], steps=2, controlnet=controlnets["sdxl"])
        with pytest.raises(StudioError, match="with lanes of their own text conditioning .* not supported"):
            studio.compose(PROMPT, [f"{f}:0.8" for f in sdxl_te_loras], "composite", steps=2,
                           control_image=input_image(7), controlnet=controlnets["sdxl"])
        assert not calls and not studio.composer.adapters
    finally:
        hook.remove()


def test_cli_controlnet_and_recipe(controlnets, sdxl_loras, tmp_path):
    from typer.testing import CliRunner

    from studio.cli import app

    runner = CliRunner()
    controlnets["sdxl"].save_pretrained(tmp_path / "cn")
    input_image(7).save(tmp_path / "edges.png")
    args = ["--model", "tiny-sdxl-random", "--steps", "2", "--lora", f"{sdxl_loras[0]}:0.8"]
    done = runner.invoke(app, ["render", PROMPT, *args, "--control-image", str(tmp_path / "edges.png"),
                               "--controlnet", str(tmp_path / "cn"), "--controlnet-scale", "0.6",
                               "--out", str(tmp_path / "a")])
    assert done.exit_code == 0, done.output
    [png] = sorted((tmp_path / "a").glob("*.png"))
    recipe = Recipe.load(png)
    assert (recipe.mode, recipe.controlnet_conditioning_scale) == ("controlnet", 0.6)
    again = runner.invoke(app, ["render", "--recipe", str(png), "--allow-path", str(tmp_path), "--allow-path",
                                str(sdxl_loras[0].parent), "--out", str(tmp_path / "b")])
    assert again.exit_code == 0, again.output
    [png2] = sorted((tmp_path / "b").glob("*.png"))
    np.testing.assert_array_equal(np.asarray(Image.open(png2).convert("RGB")), np.asarray(Image.open(png).convert("RGB")))
    lonely = runner.invoke(app, ["render", PROMPT, *args, "--controlnet", str(tmp_path / "cn"), "--out",
                                 str(tmp_path / "c")])
    assert lonely.exit_code == 2 and "needs a control image" in lonely.output
