"""Lanes in chunks (``max_lanes``): the same image as one batch, and a simulated out-of-memory retry.

The reference is the same render with every lane in one denoiser call (``max_lanes="all"``), the seam's
one-batch path that the strategy tests compare with plain diffusers/PEFT passes. Chunking must keep every
per-lane input right: the lane's rows of the batch, its own text conditioning (LoRAs with text-encoder parts),
its gains, the step's block gains and layer weights, and CMLoRA's deep-feature cache (lanes that reuse cached
features in one chunk while the lane that refreshes them runs in another).
"""

from __future__ import annotations

import pytest
import torch

from pipelines.errors import OutOfMemoryError, StudioError
from pipelines.feature_cache import DeepFeatureCache
from pipelines.lane_memory import LaneBudget, fitting_lanes, parse_max_lanes
from pipelines.render import run_pipeline
from pipelines.seam import StepPlan

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"width": 32, "height": 32, "steps": 4}
ATOL = 1e-4  # float32 GEMMs round differently at different batch sizes (measured up to 1.2e-5)


def first_layer(studio):
    """A module that runs exactly once per denoiser forward (records the rows of every lane call)."""
    denoiser = getattr(studio.pipe, studio.family.denoiser)
    return denoiser.conv_in if studio.family.name == "sdxl" else denoiser.x_embedder


@pytest.fixture
def call_rows(studio_for):
    """``call_rows(studio)``: a list that receives the batch rows of every denoiser forward (chunk)."""
    handles = []

    def attach(studio):
        rows: list[int] = []
        handles.append(first_layer(studio).register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0])))
        return rows

    yield attach
    for handle in handles:
        handle.remove()


def latents(studio, loras, strategy, max_lanes, **extra):
    result = studio.compose("a corgi in a garden", loras, strategy, seed=3, output_type="latent",
                            max_lanes=max_lanes, **SMALL, **extra)
    return result.latents[0]


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_composite_chunked_equals_one_batch(family, studio_for, sdxl_loras, sdxl_te_loras, flux_loras, call_rows):
    studio = studio_for(family)
    # LoRAs with text-encoder parts: every lane also carries its own prompt embeddings
    loras = [*sdxl_te_loras, sdxl_loras[0]] if family == "sdxl" else flux_loras
    loras = [f"{p}:{w}" for p, w in zip(loras, (0.9, 0.7, 1.1))]
    guidance = {} if family == "sdxl" else {"negative_prompt": "blurry", "pipeline_kwargs": {"true_cfg_scale": 2.0}}
    rows = call_rows(studio)
    whole = latents(studio, loras, "composite", "all", **guidance)
    per_call_whole = sorted(set(rows))
    rows.clear()
    for max_lanes in (1, 2):
        chunked = latents(studio, loras, "composite", max_lanes, **guidance)
        torch.testing.assert_close(chunked, whole, atol=ATOL, rtol=0)
        lanes = len(loras)
        # the chunks really were smaller: every call ran at most max_lanes lanes (2 CFG rows per lane)
        assert max(rows) * lanes <= max(per_call_whole) * max_lanes, (rows, per_call_whole)
        rows.clear()
    # a different seed changes the image by far more than the tolerance (the comparison can fail)
    other = studio.compose("a corgi in a garden", loras, "composite", seed=4, output_type="latent", **SMALL,
                           **guidance).latents[0]
    assert (other - whole).abs().max() > 100 * ATOL


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_cmlora_cache_chunked_equals_one_batch(family, studio_for, sdxl_loras, flux_loras, monkeypatch):
    studio = studio_for(family)
    loras = sdxl_loras if family == "sdxl" else flux_loras
    skipped = []
    remove = DeepFeatureCache.remove

    def recording_remove(self):
        skipped.append(self.skipped_rows)
        remove(self)

    monkeypatch.setattr(DeepFeatureCache, "remove", recording_remove)

    def run(max_lanes):
        return studio.compose("a corgi", loras, "cmlora", strategy_params={"cache": True}, seed=5,
                              output_type="latent", max_lanes=max_lanes, **{**SMALL, "steps": 8}).latents[0]

    whole = run("all")
    assert skipped[-1] > 0  # some lanes did reuse cached deep features
    for max_lanes in (1, 2):
        chunked = run(max_lanes)
        torch.testing.assert_close(chunked, whole, atol=ATOL, rtol=0)
        assert skipped[-1] == skipped[0]  # chunks skip the deep blocks for exactly the same rows


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_seam_chunks_keep_gains_block_gains_layer_weights(family, studio_for, sdxl_loras, flux_loras):
    """A hand-made plan with everything per lane/per step: four lanes, unequal and negative reduce weights."""
    studio = studio_for(family)
    loras = sdxl_loras if family == "sdxl" else flux_loras
    names = studio.load(loras)
    state = studio.composer.state
    n = len(state.names)
    gen = torch.Generator().manual_seed(0)
    gains = torch.rand(4, n, generator=gen) * 1.5
    weights = torch.tensor([0.7, -0.3, 0.4, 0.2])
    layers = len(state.layer_index)

    def plan_for_step(step: int) -> StepPlan:
        g = torch.Generator().manual_seed(100 + step)
        return StepPlan(gains=gains * (1 + 0.1 * step), weights=weights,
                        block_gains=torch.rand(len(state.blocks), n, generator=g) * 2,
                        layer_weights=torch.rand(layers, n, generator=g) * 2)

    def render(max_lanes):
        output, seam = run_pipeline(
            studio.composer, stack=names, plan_for_step=plan_for_step, text_lanes=gains[:1], prompt="a corgi",
            negative_prompt=None, num_inference_steps=3, guidance_scale=studio.family.default_guidance,
            width=32, height=32, generator=torch.Generator().manual_seed(1), output_type="latent",
            max_lanes=max_lanes)
        return output.images, seam

    whole, seam = render(None)
    assert seam.chunk_calls == seam.calls
    for max_lanes in (1, 3):
        chunked, seam = render(max_lanes)
        assert seam.chunk_calls == seam.calls * -(-4 // max_lanes)
        torch.testing.assert_close(chunked, whole, atol=ATOL, rtol=0)


def simulate_oom(studio, max_rows: int):
    """Raise torch's out-of-memory error in any denoiser call with more than ``max_rows`` rows."""

    def hook(module, args):
        if args[0].shape[0] > max_rows:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated: {args[0].shape[0]} rows)")

    return first_layer(studio).register_forward_pre_hook(hook)


def test_out_of_memory_halves_the_chunk_and_retries(studio_for, sdxl_loras, call_rows):
    studio = studio_for("sdxl")
    reference = latents(studio, sdxl_loras, "composite", "all")
    rows = call_rows(studio)
    # 3 lanes x 2 CFG rows = 6 rows do not fit, 2 do: 3 -> OOM -> 1 lane per call for the rest of the render
    handle = simulate_oom(studio, max_rows=4)
    try:
        retried = latents(studio, sdxl_loras, "composite", "all")
    finally:
        handle.remove()
    torch.testing.assert_close(retried, reference, atol=ATOL, rtol=0)
    assert rows[0] == 6 and set(rows[1:]) == {2}, rows  # one failed call, then single lanes only
    assert len(rows) == 1 + 3 * SMALL["steps"]


def test_out_of_memory_twice_is_a_clear_error_and_leaves_nothing_behind(studio_for, sdxl_loras):
    studio = studio_for("sdxl")
    denoiser = studio.pipe.unet
    handle = simulate_oom(studio, max_rows=1)  # not even one lane (2 CFG rows) fits
    gains = studio.composer.state.denoiser_gains.clone()
    try:
        with pytest.raises(OutOfMemoryError, match=r"max_lanes \(--max-lanes, now 2\).*image size"):
            latents(studio, sdxl_loras, "composite", 2)
    finally:
        handle.remove()
    assert "forward" not in denoiser.__dict__  # the seam's wrapper is gone
    torch.testing.assert_close(studio.composer.state.denoiser_gains, gains)
    # the studio renders normally afterwards
    assert latents(studio, sdxl_loras, "composite", "all").isfinite().all()


def test_merge_and_switch_run_one_call_per_step(studio_for, sdxl_loras, call_rows):
    studio = studio_for("sdxl")
    rows = call_rows(studio)
    for strategy in ("merge", "switch"):
        rows.clear()
        latents(studio, sdxl_loras, strategy, 1)
        assert rows == [2] * SMALL["steps"]


def test_max_lanes_setting_and_auto_budget(studio_for, sdxl_loras):
    assert parse_max_lanes("auto") == "auto" and parse_max_lanes("all") is None and parse_max_lanes("3") == 3
    for bad in (0, -2, 1.5, True, "many", "0"):
        with pytest.raises(StudioError, match="max_lanes"):
            parse_max_lanes(bad)
    with pytest.raises(StudioError, match="max_lanes"):
        studio_for("sdxl").compose("x", sdxl_loras, "composite", max_lanes=0, **SMALL)
    # the auto budget: 80 % of the free memory over the measured per-lane peak, at least one lane
    assert fitting_lanes(10 * 2**30, 2 * 2**30, lanes=5) == 4
    assert fitting_lanes(10 * 2**30, 3 * 2**30, lanes=2) == 2
    assert fitting_lanes(2**30, 4 * 2**30, lanes=5) == 1
    # on the CPU, auto runs every lane in one call; a fixed cap and the halving after an out-of-memory error
    assert LaneBudget("auto", "cpu").lanes_per_call(7, 2) == 7
    budget = LaneBudget(4, "cpu")
    assert budget.lanes_per_call(7, 2) == 4
    assert budget.after_out_of_memory(4) == 2 and budget.lanes_per_call(7, 2) == 2
    assert budget.after_out_of_memory(1) is None


def test_cli_max_lanes(sdxl_loras, tmp_path):
    import numpy as np
    from PIL import Image
    from typer.testing import CliRunner

    from studio.cli import app

    runner = CliRunner()
    base = ["render", "a corgi", "--lora", f"{sdxl_loras[0]}:0.9", "--lora", f"{sdxl_loras[1]}:0.6", "-s",
            "composite", "--steps", "2", "--width", "32", "--height", "32", "--model", "tiny-sdxl-random"]
    images = {}
    for lanes in ("all", "1"):
        out = tmp_path / lanes
        result = runner.invoke(app, [*base, "--max-lanes", lanes, "--out", str(out)])
        assert result.exit_code == 0, result.output
        images[lanes] = np.asarray(Image.open(next(out.glob("*.png"))), dtype=np.int16)
    assert np.abs(images["all"] - images["1"]).max() <= 1  # 8-bit pixels of the same image
    result = runner.invoke(app, [*base, "--max-lanes", "zero", "--out", str(tmp_path / "bad")])
    assert result.exit_code == 2 and "max_lanes must be" in result.output


def test_auto_budget_on_cuda_measures_one_lane_then_fits_free_memory(monkeypatch):
    """The CUDA side of ``auto`` with the allocator's counters simulated (no GPU here): the first lane call
    runs one lane and measures its peak; later calls fit 80 % of free (+ cached but unused) memory."""
    gib = 2**30
    memory = {"allocated": 6 * gib, "peak": 6 * gib, "reserved": 7 * gib, "free": 9 * gib}
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: memory.update(peak=memory["allocated"]))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: memory["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: memory["peak"])
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: memory["reserved"])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (memory["free"], 80 * gib))
    budget = LaneBudget("auto", "cuda")
    assert budget.lanes_per_call(5, 2) == 1  # nothing measured yet: one lane
    with budget.observe(1):
        memory["peak"] += 2 * gib  # the lane call's activations
    assert budget.per_lane_bytes == 2 * gib
    assert budget.lanes_per_call(5, 2) == 4  # 0.8 * (9 + 1) GiB // 2 GiB
    memory["free"] = 3 * gib
    assert budget.lanes_per_call(5, 2) == 1  # 0.8 * 4 GiB // 2 GiB = 1
    assert budget.after_out_of_memory(4) == 2
    memory["free"] = 70 * gib
    assert budget.lanes_per_call(5, 2) == 2  # the halved cap holds for the rest of the render
