"""composite reduce=sum (Composable Diffusion's AND over LoRAs) against plain diffusers passes, SDXL and FLUX."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusion import StepContext, make_strategy
from pipelines.tiny import build_tiny_flux, build_tiny_sdxl
from reference import load_adapters, run_lanes
from studio import Studio

ATOL = 2e-4


def test_sum_plan_has_a_base_lane_with_weight_one_minus_n():
    strat = make_strategy("composite", {"reduce": "sum"})
    plan = strat.plan(StepContext(0, 4, torch.tensor([0.75, 0.0, 0.5])))  # LoRA 1 outside its step window
    assert plan.gains.tolist() == [[0.0, 0.0, 0.0], [0.75, 0.0, 0.0], [0.0, 0.0, 0.5]]
    assert plan.weights.tolist() == [-1.0, 1.0, 1.0]
    assert plan.text_lanes == [3, 0, 2]
    assert strat.text_lanes(torch.tensor([0.9, 0.7, 0.5]))[3].abs().sum() == 0  # base lane: no text-encoder part
    with pytest.raises(Exception, match="reduce.*one of"):
        make_strategy("composite", {"reduce": "max"})


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_sum_equals_base_plus_sum_of_differences(family, sdxl_te_loras, sdxl_loras, flux_loras):
    """ε = ε_0 + Σ_i (ε_i − ε_0), each ε from a plain diffusers pass (ε_0: the LoRA-free model and prompt)."""
    files = [*sdxl_te_loras, sdxl_loras[0]] if family == "sdxl" else flux_loras
    weights = [0.9, 0.7, 1.0][: len(files)]
    n = len(files)
    ref = build_tiny_sdxl() if family == "sdxl" else build_tiny_flux()
    names = load_adapters(ref, files)
    guidance = 5.0 if family == "sdxl" else 3.5
    # lane n is the base: adapter 0 at weight 0 (denoiser and text encoders), i.e. the model without LoRAs
    lanes = [(n, 1.0 - n)] + [(i, 1.0) for i in range(n)]
    expected = run_lanes(ref, family, lambda s: lanes, names=[*names, names[0]], weights=[*weights, 0.0],
                         prompt="a corgi in a garden", negative_prompt="blurry", steps=4, guidance=guidance, seed=9)
    studio = Studio(f"tiny-{family}-random")
    loras = [f"{f}:{w}" for f, w in zip(files, weights)]
    batches = []
    first = studio.pipe.unet.conv_in if family == "sdxl" else studio.pipe.transformer.x_embedder
    hook = first.register_forward_pre_hook(lambda m, a: batches.append(a[0].shape[0]))
    got = studio.compose("a corgi in a garden", loras, "composite", strategy_params={"reduce": "sum"},
                         output_type="np", steps=4, seed=9, guidance=guidance, negative_prompt="blurry").latents[0]
    hook.remove()
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
    assert set(batches) == {(n + 1) * (2 if family == "sdxl" else 1)}  # one batched forward of N+1 lanes per step
    mean = studio.compose("a corgi in a garden", loras, "composite", output_type="np", steps=4, seed=9,
                          guidance=guidance, negative_prompt="blurry").latents[0]
    assert np.abs(mean - got).max() > 10 * ATOL  # sum is not the mean
