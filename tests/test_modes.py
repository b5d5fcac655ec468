"""img2img and inpainting through the studio's seam, against the plain diffusers pipelines (tiny SDXL and FLUX,
float32, CPU): merge equals ``load_lora_weights`` + ``set_adapters`` on the stock pipeline of the mode; composite
equals the average of one plain pass per LoRA; switch addresses the full schedule that ``strength`` truncates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import diffusers
from pipelines.tiny import build_tiny_flux, build_tiny_sdxl
from reference import load_adapters, run_lanes
from studio import Studio

ATOL = 2e-4  # images in [0, 1], as in test_strategies.py
PROMPT = "a corgi in a garden"
CLASSES = {("sdxl", "img2img"): diffusers.StableDiffusionXLImg2ImgPipeline,
           ("sdxl", "inpaint"): diffusers.StableDiffusionXLInpaintPipeline,
           ("flux", "img2img"): diffusers.FluxImg2ImgPipeline,
           ("flux", "inpaint"): diffusers.FluxInpaintPipeline}
CASES = sorted(CLASSES)


def input_image(seed: int = 0, size: int = 64) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(size, size, 3) * 255).astype("uint8"))


def input_mask(size: int = 64) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    return mask


def mode_inputs(mode: str, strength: float) -> dict:
    inputs = {"image": input_image(), "strength": strength}
    if mode == "inpaint":
        inputs["mask_image"] = input_mask()
    return inputs


def plain_pipeline(family: str, mode: str):
    """The stock diffusers pipeline of the mode on a fresh tiny model (same seeded weights as the studio's)."""
    base = build_tiny_sdxl() if family == "sdxl" else build_tiny_flux()
    pipe = CLASSES[(family, mode)].from_pipe(base)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def guidance_of(family: str) -> float:
    return 5.0 if family == "sdxl" else 3.5


@pytest.fixture(scope="module")
def studios():
    made = {}

    def get(family: str) -> Studio:
        if family not in made:
            made[family] = Studio(f"tiny-{family}-random")
        return made[family]

    return get


def lora_files(family, sdxl_te_loras, sdxl_loras, flux_loras):
    return [sdxl_te_loras[0], sdxl_loras[1]] if family == "sdxl" else flux_loras


@pytest.mark.parametrize("family,mode", CASES)
def test_merge_equals_plain_pipeline_with_set_adapters(family, mode, studios, sdxl_te_loras, sdxl_loras, flux_loras):
    files, weights = lora_files(family, sdxl_te_loras, sdxl_loras, flux_loras), [0.8, 0.6]
    inputs = mode_inputs(mode, strength=0.75)
    ref = plain_pipeline(family, mode)
    ref.set_adapters(load_adapters(ref, files), weights)
    size = {} if (family, mode) == ("sdxl", "img2img") else {"height": 64, "width": 64}
    with torch.no_grad():
        expected = ref(PROMPT, num_inference_steps=4, guidance_scale=guidance_of(family), **size, **inputs,
                       generator=torch.Generator("cpu").manual_seed(3), output_type="np").images[0]
    studio = studios(family)
    result = studio.compose(PROMPT, [f"{f}:{w}" for f, w in zip(files, weights)], "merge", steps=4, seed=3,
                            guidance=guidance_of(family), width=64, height=64, output_type="np", **inputs)
    np.testing.assert_allclose(result.latents[0], expected, atol=ATOL, rtol=0)
    assert result.recipe.mode == mode and result.recipe.strength == 0.75
    # the input image matters, and so do the LoRAs
    plain_t2i = studio.compose(PROMPT, [f"{f}:{w}" for f, w in zip(files, weights)], "merge", steps=4, seed=3,
                               guidance=guidance_of(family), width=64, height=64, output_type="np").latents[0]
    assert np.abs(plain_t2i - expected).max() > 10 * ATOL
    base = studio.compose(PROMPT, [], "merge", steps=4, seed=3, guidance=guidance_of(family), width=64, height=64,
                          output_type="np", **inputs).latents[0]
    assert np.abs(base - expected).max() > 10 * ATOL


@pytest.mark.parametrize("family,mode", CASES)
def test_composite_equals_average_of_plain_passes(family, mode, studios, sdxl_te_loras, sdxl_loras, flux_loras):
    """Composite in img2img / inpainting = the mean of each LoRA's own prediction (own text encoding), in the
    stock pipeline of the mode."""
    files = [*sdxl_te_loras, sdxl_loras[0]] if family == "sdxl" else flux_loras
    weights, n = [0.9, 0.7, 1.0][: len(files)], len(files)
    inputs = mode_inputs(mode, strength=0.8)
    ref = plain_pipeline(family, mode)
    names = load_adapters(ref, files)
    expected = run_lanes(ref, family, lambda s: [(i, 1.0 / n) for i in range(n)], names=names, weights=weights,
                         prompt=PROMPT, negative_prompt="blurry", steps=5, guidance=guidance_of(family), seed=9,
                         pipeline_kwargs=inputs)
    result = studios(family).compose(PROMPT, [f"{f}:{w}" for f, w in zip(files, weights)], "composite", steps=5,
                                     seed=9, guidance=guidance_of(family), negative_prompt="blurry", width=64,
                                     height=64, output_type="np", **inputs)
    np.testing.assert_allclose(result.latents[0], expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_switch_steps_count_in_the_full_schedule(family, studios, sdxl_te_loras, flux_loras):
    """With strength < 1 the loop starts at schedule step ``begin_index``; switch's rotation is over the
    schedule, so the first step run uses the LoRA of that schedule step, not LoRA 0."""
    files = sdxl_te_loras if family == "sdxl" else flux_loras
    weights, tau, steps = [0.9, 0.7], 3, 8
    inputs = mode_inputs("img2img", strength=0.5)  # 4 of the 8 steps run: schedule steps 4..7
    ref = plain_pipeline(family, "img2img")
    names = load_adapters(ref, files)
    offset = steps - 4
    expected = run_lanes(ref, family, lambda s: [(((s + offset) // tau) % 2, 1.0)], names=names, weights=weights,
                         prompt=PROMPT, negative_prompt="blurry", steps=steps, guidance=guidance_of(family), seed=5,
                         pipeline_kwargs=inputs)
    got = studios(family).compose(PROMPT, [f"{f}:{w}" for f, w in zip(files, weights)], "switch",
                                  strategy_params={"tau": tau}, steps=steps, seed=5, guidance=guidance_of(family),
                                  negative_prompt="blurry", width=64, height=64, output_type="np", **inputs)
    np.testing.assert_allclose(got.latents[0], expected, atol=ATOL, rtol=0)
    # counting the loop's steps instead (LoRAs 0, 0, 0, 1 instead of 1, 1, 0, 0) gives another image
    wrong = run_lanes(ref, family, lambda s: [((s // tau) % 2, 1.0)], names=names, weights=weights, prompt=PROMPT,
                      negative_prompt="blurry", steps=steps, guidance=guidance_of(family), seed=5,
                      pipeline_kwargs=inputs)
    assert np.abs(wrong - expected).max() > 10 * ATOL


def test_image_size_sets_the_render_size_and_other_sizes_are_resized(studios, sdxl_loras):
    studio = studios("sdxl")
    result = studio.compose(PROMPT, [f"{sdxl_loras[0]}:0.5"], steps=2, image=input_image(size=48), strength=0.5,
                            output_type="np")
    assert result.latents[0].shape == (48, 48, 3) and not result.warnings
    result = studio.compose(PROMPT, [f"{sdxl_loras[0]}:0.5"], steps=2, image=input_image(size=48), strength=0.5,
                            width=64, height=64, output_type="np")
    assert result.latents[0].shape == (64, 64, 3)
    assert any("48x48; resized to 64x64" in w for w in result.warnings)


@pytest.mark.parametrize("strategy", ["cmlora", "klora", "gated", "ties", "cat", "lego", "mcdropout"])
def test_other_strategies_run_in_inpainting(strategy, studios, sdxl_loras):
    """The other kinds of strategy run on the inpainting pipeline: lanes with feature caches and profile
    renders in the same mode (cmlora), per-layer selection (klora), block x time gates (gated), derived
    weight-space adapters (ties, cat, lego, mcdropout)."""
    inputs = mode_inputs("inpaint", strength=0.9)
    result = studios("sdxl").compose(PROMPT, [f"{sdxl_loras[0]}:0.8", f"{sdxl_loras[1]}:0.6"], strategy, steps=3,
                                     seed=1, width=64, height=64, output_type="np", **inputs)
    image = result.latents[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_steps_run_counts_the_loop(family, studios):
    """The CLI's progress total for img2img: the steps diffusers' loop really runs at a strength."""
    from pipelines.modes import steps_run

    for steps, strength in ((5, 0.5), (7, 0.3), (4, 1.0), (6, 0.99)):
        calls = []
        studios(family).compose(PROMPT, [], steps=steps, width=64, height=64, image=input_image(), strength=strength,
                                callback=lambda *args: calls.append(1), output_type="np")
        assert len(calls) == steps_run(studios(family).family, steps, strength), (steps, strength)
    assert steps_run(studios(family).family, 7, 0.3) == (2 if family == "sdxl" else 3)  # the two roundings
