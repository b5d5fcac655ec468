"""merge, switch and composite against plain diffusers, on tiny SDXL and tiny FLUX (float32, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusion import StepContext, make_strategy
from pipelines.tiny import build_tiny_flux, build_tiny_sdxl
from reference import load_adapters, run_lanes
from studio import Studio

ATOL = 2e-4  # on images in [0, 1] after a few steps of a random tiny model


def render(studio, files, weights, strategy, **kw):
    loras = [f"{f}:{w}" for f, w in zip(files, weights)]
    result = studio.compose("a corgi in a garden", loras, strategy, output_type="np", **kw)
    return result.latents[0]


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_merge_matches_diffusers_set_adapters(family, sdxl_te_loras, sdxl_loras, flux_loras):
    files = [sdxl_te_loras[0], sdxl_loras[1]] if family == "sdxl" else flux_loras
    weights = [0.8, 0.6]
    ref = build_tiny_sdxl() if family == "sdxl" else build_tiny_flux()
    names = load_adapters(ref, files)
    ref.set_adapters(names, weights)
    guidance = 5.0 if family == "sdxl" else 3.5
    with torch.no_grad():
        expected = ref("a corgi in a garden", num_inference_steps=4, guidance_scale=guidance, height=64, width=64,
                       generator=torch.Generator("cpu").manual_seed(3), output_type="np").images[0]
    studio = Studio(f"tiny-{family}-random")
    got = render(studio, files, weights, "merge", steps=4, seed=3, guidance=guidance)
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
    # the LoRAs matter: the base model gives another image
    base = studio.compose("a corgi in a garden", [], "merge", steps=4, seed=3, guidance=guidance,
                          output_type="np").latents[0]
    assert np.abs(base - expected).max() > 10 * ATOL


def test_switch_schedule():
    switch = make_strategy("switch", {"tau": 5})
    active = [int(switch.plan(StepContext(s, 12, torch.tensor([1.0, 0.5]))).gains.argmax()) for s in range(12)]
    assert active == [0] * 5 + [1] * 5 + [0] * 2
    three = make_strategy("switch", {"tau": 1})
    assert [int(three.plan(StepContext(s, 6, torch.ones(3))).gains.argmax()) for s in range(6)] == [0, 1, 2, 0, 1, 2]
    plan = switch.plan(StepContext(6, 12, torch.tensor([1.0, 0.5])))
    assert plan.gains.tolist() == [[0.0, 0.5]] and plan.text_lanes == [1]


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_switch_matches_plain_diffusers_rotation(family, sdxl_te_loras, flux_loras):
    files = sdxl_te_loras if family == "sdxl" else flux_loras
    weights, tau, steps = [0.9, 0.7], 2, 5
    ref = build_tiny_sdxl() if family == "sdxl" else build_tiny_flux()
    names = load_adapters(ref, files)
    guidance = 5.0 if family == "sdxl" else 3.5
    expected = run_lanes(ref, family, lambda s: [((s // tau) % 2, 1.0)], names=names, weights=weights,
                         prompt="a corgi in a garden", negative_prompt="blurry", steps=steps, guidance=guidance, seed=5)
    studio = Studio(f"tiny-{family}-random")
    got = render(studio, files, weights, "switch", strategy_params={"tau": tau}, steps=steps, seed=5,
                 guidance=guidance, negative_prompt="blurry")
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_composite_equals_average_of_single_lora_passes(family, sdxl_te_loras, sdxl_loras, flux_loras):
    """Composite = mean over LoRAs of each LoRA's own (guided) prediction, each with its own text encoding."""
    files = [*sdxl_te_loras, sdxl_loras[0]] if family == "sdxl" else flux_loras
    weights = [0.9, 0.7, 1.0][: len(files)]
    ref = build_tiny_sdxl() if family == "sdxl" else build_tiny_flux()
    names = load_adapters(ref, files)
    n = len(files)
    guidance = 5.0 if family == "sdxl" else 3.5
    expected = run_lanes(ref, family, lambda s: [(i, 1.0 / n) for i in range(n)], names=names, weights=weights,
                         prompt="a corgi in a garden", negative_prompt="blurry", steps=4, guidance=guidance, seed=9)
    studio = Studio(f"tiny-{family}-random")
    batches = []  # the batch the denoiser's first layer sees
    first = studio.pipe.unet.conv_in if family == "sdxl" else studio.pipe.transformer.x_embedder
    hook = first.register_forward_pre_hook(lambda m, a: batches.append(a[0].shape[0]))
    got = render(studio, files, weights, "composite", steps=4, seed=9, guidance=guidance, negative_prompt="blurry")
    hook.remove()
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
    # one batched forward per step, N replicas (x2 for classifier-free guidance on SDXL)
    assert len(batches) == 4
    assert set(batches) == {n * (2 if family == "sdxl" else 1)}


def test_text_encoder_parts_stay_in_their_own_replica(sdxl_te_loras):
    """The released Composite code encodes the prompt once with all adapters; the studio does not, and the
    difference is visible."""
    studio = Studio("tiny-sdxl-random")
    ours = render(studio, sdxl_te_loras, [1.0, 1.0], "composite", steps=3, seed=1)
    ref = build_tiny_sdxl()
    names = load_adapters(ref, sdxl_te_loras)
    leaky = run_lanes(ref, "sdxl", lambda s: [(0, 0.5), (1, 0.5)], names=names, weights=[1.0, 1.0],
                      prompt="a corgi in a garden", negative_prompt="", steps=3, guidance=5.0, seed=1,
                      shared_text_encoding=True)
    assert np.abs(ours - leaky).max() > 10 * ATOL


def test_unknown_strategy_and_parameter():
    from pipelines.errors import StrategyError

    with pytest.raises(StrategyError, match="unknown strategy 'blend'.*merge"):
        make_strategy("blend")
    with pytest.raises(StrategyError, match="no parameter 'tua'.*tau"):
        make_strategy("switch", {"tua": 3})
    with pytest.raises(StrategyError, match="expects int"):
        make_strategy("switch", {"tau": "often"})
    with pytest.raises(StrategyError, match=">= 1"):
        make_strategy("switch", {"tau": 0})
