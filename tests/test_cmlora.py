"""CMLoRA: frequency profiling, ordering, dominant weights, schedule, and the deep-feature cache.

The references are independent: the score is recomputed here with a per-radius mask loop; the uncached
strategy is compared with plain diffusers/PEFT running one pass per LoRA and weighting them; the cached one
with the same plain passes where a reusing LoRA's deep features are swapped in by forward hooks (DeepCache's
rule), one LoRA at a time, without the studio's row slicing.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from fusion import RunContext, StepContext, make_strategy
from fusion.cmlora import frequency_score, grayscale, lane_weights, radial_profile, refresh_steps
from pipelines.errors import StrategyError
from pipelines.tiny import build_tiny_flux, build_tiny_sdxl
from reference import load_adapters, run_lanes

ATOL = 2e-4
PROMPT = "a corgi in a garden"
SMALL = {"width": 32, "height": 32}  # 32x32 images keep these tests fast (every block still runs)


# ------------------------------------------------------------------------------------------------ formulas
def reference_score(gray: np.ndarray, cutoff: float) -> float:
    spectrum = np.abs(np.fft.fftshift(np.fft.fft2(gray)))
    rows, cols = gray.shape
    yy, xx = np.mgrid[0:rows, 0:cols]
    radius = np.floor(np.sqrt((yy - rows // 2) ** 2 + (xx - cols // 2) ** 2)).astype(int)
    profile = np.array([np.log(1 + spectrum[radius == r]).mean() for r in range(radius.max() + 1)])
    profile = profile / profile.max()
    return float(profile[int(np.ceil(cutoff * radius.max())):].mean())


def texture(size: int, blur: float, seed: int = 0) -> np.ndarray:
    """Gaussian-blurred white noise as an RGB image (``blur``: the blur's sigma in pixels; 0 = sharp)."""
    noise = np.random.default_rng(seed).standard_normal((size, size))
    fy, fx = np.fft.fftfreq(size)[:, None], np.fft.fftfreq(size)[None, :]
    image = np.real(np.fft.ifft2(np.fft.fft2(noise) * np.exp(-2 * (np.pi * blur) ** 2 * (fx ** 2 + fy ** 2))))
    gray = 0.5 + 0.2 * image / image.std()
    return np.repeat(gray[..., None], 3, axis=2)


def test_frequency_score_formula():
    image = texture(64, 0.5)
    gray = grayscale(image)
    np.testing.assert_allclose(gray, image[..., 0], atol=1e-12)  # a gray RGB image keeps its values
    # the cut-off is a fraction of the image's largest radius (45 at 64², 90 at 128²), not a pixel radius
    for size in (64, 128):
        gray = grayscale(texture(size, 1.0))
        profile = radial_profile(gray)
        assert len(profile) - 1 == int(np.sqrt(2) * size / 2)
        for cutoff in (0.0, 0.2, 0.5):
            assert frequency_score(profile, cutoff) == pytest.approx(reference_score(gray, cutoff), rel=1e-9)
    # sharper pictures (edges, texture) score higher than smoother ones
    scores = [frequency_score(radial_profile(grayscale(texture(64, blur))), 0.2) for blur in (0, 0.5, 1, 2, 4)]
    assert scores == sorted(scores, reverse=True) and scores[0] > 10 * scores[-1]


def test_refresh_schedule_and_dominant_weights():
    assert refresh_steps(8) == [0, 2, 3, 6, 7]  # every 2 until 3, every 3 until 7, every 2 after
    assert refresh_steps(30) == [0, 2, 4, 6, 8, 10, 11, 14, 17, 20, 23, 26, 28]
    assert refresh_steps(1) == [0] and refresh_steps(2)[0] == 0
    for n in (1, 2, 3, 5):
        w = lane_weights(n, 0)
        assert float(w.sum()) == pytest.approx(1.0)
        assert float(w[0]) == pytest.approx((n - 0.5) / (2 * n - 1.5))
        assert all(float(v) == pytest.approx(1 / (2 * n - 1.5)) for v in w[1:])
    assert lane_weights(2, 1).tolist() == pytest.approx([0.4, 0.6])
    assert lane_weights(3, 0).tolist() == pytest.approx([5 / 9, 2 / 9, 2 / 9])


def test_dominant_rotates_in_frequency_order_and_marks_reuse():
    strat = make_strategy("cmlora")
    strat.ranking = [2, 0, 1]  # as prepare() sets it from scores: LoRA 2 has the highest frequency score
    steps, weights = 8, torch.tensor([1.0, 0.8, 0.6])
    plans = [strat.plan(StepContext(s, steps, weights)) for s in range(steps)]
    # refresh steps 0, 2, 3, 6, 7 hand the role to 2, 0, 1, 2, 0
    assert [p.extras["dominant"] for p in plans] == [2, 2, 0, 1, 1, 1, 2, 0]
    for s, plan in enumerate(plans):
        dom = plan.extras["dominant"]
        assert plan.text_lanes == [0, 1, 2]
        assert torch.equal(plan.gains, torch.diag(weights))
        assert plan.weights.tolist() == pytest.approx(lane_weights(3, dom).tolist())
        reuse = plan.extras["feature_cache"]["reuse"]
        assert reuse == [s not in (0, 2, 3, 6, 7) and i != dom for i in range(3)]
    # a LoRA outside its step window leaves the lanes; the weights follow the active count
    plan = strat.plan(StepContext(4, steps, torch.tensor([1.0, 0.0, 0.6])))
    assert plan.text_lanes == [0, 2] and plan.extras["dominant"] == 2
    assert plan.weights.tolist() == pytest.approx([0.4, 0.6])
    # cache off: no feature-cache request
    assert "feature_cache" not in make_strategy("cmlora", {"cache": False}).plan(StepContext(1, 8, weights)).extras


def test_bad_parameters_and_missing_renderer():
    with pytest.raises(StrategyError, match="one of"):
        make_strategy("cmlora", {"order": "random"})
    with pytest.raises(StrategyError, match="<= 1"):
        make_strategy("cmlora", {"cutoff": 2})
    run = RunContext(names=["a", "b"], weights=torch.ones(2), num_steps=4, family="sdxl")
    with pytest.raises(StrategyError, match="order=stack"):
        make_strategy("cmlora").prepare(run)


# ------------------------------------------------------------------------------------------------ profiling
def test_profiles_are_renders_of_each_lora_alone_and_cached_on_disk(studio_for, sdxl_loras, tmp_path, monkeypatch):
    studio = studio_for("sdxl")
    monkeypatch.setattr(studio, "cache_dir", tmp_path / "cache")
    files = [str(f) for f in sdxl_loras[:2]]
    strat = make_strategy("cmlora", {"profile_steps": 2})
    result = studio.compose(PROMPT, [f"{files[0]}:0.9", files[1]], strat, steps=2, seed=4, output_type="np",
                            **SMALL)
    assert len(result.latents) == 1
    entries = sorted((tmp_path / "cache" / "cmlora").glob("*.json"))
    assert len(entries) == 2
    # the profile of LoRA 0 is the radial profile of that LoRA rendered alone (seed 0, its name as prompt)
    parsed = studio.loaded()[studio.load([files[0]])[0]]
    prompt = ", ".join(parsed.info.triggers) or parsed.name
    alone = studio.compose(prompt, [f"{files[0]}:0.9"], "merge", steps=2, seed=0, output_type="np",
                           **SMALL).latents[0]
    expected = radial_profile(grayscale(alone))
    assert strat.scores[0] == pytest.approx(frequency_score(expected, 0.2), rel=1e-5)
    assert strat.ranking == sorted(range(2), key=lambda i: -strat.scores[i])
    names = studio.load(files)
    info = result.strategy_info["cmlora"]
    assert info["order"] == [names[i] for i in strat.ranking] and info["scores"][names[1]] == strat.scores[1]
    # a second run reads the disk cache instead of rendering again
    monkeypatch.setattr("fusion.cmlora.radial_profile", lambda *a: pytest.fail("profile recomputed"))
    again = make_strategy("cmlora", {"profile_steps": 2})
    studio.compose(PROMPT, [f"{files[0]}:0.9", files[1]], again, steps=2, seed=4, output_type="np", **SMALL)
    assert again.scores == pytest.approx(strat.scores)


# ------------------------------------------------------------------------------------------------ rendering
def _dominant_reference(strat, steps, n):
    def lanes(step):
        dom = strat.dominant(step, steps, list(range(n)))
        return [(i, float(w)) for i, w in enumerate(lane_weights(n, dom))]
    return lanes


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_uncached_cmlora_equals_weighted_single_lora_passes(family, studio_for, sdxl_te_loras, flux_loras):
    files = sdxl_te_loras if family == "sdxl" else flux_loras
    weights, steps = [0.9, 0.7], 4
    guidance = 5.0 if family == "sdxl" else 3.5
    strat = make_strategy("cmlora", {"cache": False, "order": "stack"})
    studio = studio_for(family)
    got = studio.compose(PROMPT, [f"{f}:{w}" for f, w in zip(files, weights)], strat, steps=steps, seed=2,
                         guidance=guidance, negative_prompt="blurry", output_type="np", **SMALL).latents[0]
    ref = build_tiny_sdxl() if family == "sdxl" else build_tiny_flux()
    names = load_adapters(ref, files)
    expected = run_lanes(ref, family, _dominant_reference(strat, steps, 2), names=names, weights=weights,
                         prompt=PROMPT, negative_prompt="blurry", steps=steps, guidance=guidance, seed=2, size=32)
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)


class DeepCacheReference:
    """DeepCache on plain PEFT passes: per LoRA, store the deep part's output (SDXL) or residual (FLUX) on a full
    pass and substitute it with forward hooks on a reusing pass."""

    def __init__(self, pipe, family, reuse):
        self.pipe, self.family, self.reuse = pipe, family, reuse
        self.store = {}

    @contextlib.contextmanager
    def __call__(self, step, index):
        reuse = self.reuse(step, index) and index in self.store
        handles = []
        if self.family == "sdxl":
            exit_block = self.pipe.unet.up_blocks[-2]

            def after(module, args, output):
                if reuse:
                    return self.store[index]
                self.store[index] = output.clone()

            handles.append(exit_block.register_forward_hook(after))
        else:
            tr = self.pipe.transformer
            entry = {}

            def before(module, args, kwargs):
                entry["in"] = (kwargs["encoder_hidden_states"], kwargs["hidden_states"])

            def after(module, args, output):
                if reuse:
                    return tuple(i + r for i, r in zip(entry["in"], self.store[index]))
                self.store[index] = tuple(o - i for o, i in zip(output, entry["in"]))

            handles.append(tr.transformer_blocks[1].register_forward_pre_hook(before, with_kwargs=True))
            handles.append(tr.single_transformer_blocks[-2].register_forward_hook(after))
        try:
            yield
        finally:
            for h in handles:
                h.remove()


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_cached_cmlora_equals_deepcache_reference_and_skips_deep_rows(family, studio_for, sdxl_te_loras,
                                                                     sdxl_loras, flux_loras):
    files = [*sdxl_te_loras, sdxl_loras[2]] if family == "sdxl" else flux_loras
    n = len(files)
    weights, steps = [0.9, 0.7, 1.0][:n], 4  # refresh steps 0, 1, 3: at step 2 two of three lanes reuse
    guidance = 5.0 if family == "sdxl" else 3.5
    strat = make_strategy("cmlora", {"order": "stack"})
    studio = studio_for(family)
    den = getattr(studio.pipe, "unet" if family == "sdxl" else "transformer")
    # a layer before the deep span, and one inside it (hooked inside the block, so after the row slicing)
    first, deep = ((den.conv_in, den.down_blocks[1].resnets[0]) if family == "sdxl"
                   else (den.x_embedder, den.transformer_blocks[1].norm1))
    seen = {"first": [], "deep": []}
    hooks = [first.register_forward_pre_hook(lambda m, a: seen["first"].append(a[0].shape[0])),
             deep.register_forward_pre_hook(lambda m, a: seen["deep"].append(a[0].shape[0]))]
    try:
        got = studio.compose(PROMPT, [f"{f}:{w}" for f, w in zip(files, weights)], strat, steps=steps, seed=6,
                             guidance=guidance, output_type="np", **SMALL).latents[0]
    finally:
        for h in hooks:
            h.remove()
    ref = build_tiny_sdxl() if family == "sdxl" else build_tiny_flux()
    names = load_adapters(ref, files)
    refresh = set(refresh_steps(steps))

    def reuse(step, index):
        return step not in refresh and index != strat.dominant(step, steps, list(range(n)))

    expected = run_lanes(ref, family, _dominant_reference(strat, steps, n), names=names, weights=weights,
                         prompt=PROMPT, negative_prompt="", steps=steps, guidance=guidance, seed=6, size=32,
                         lane_context=DeepCacheReference(ref, family, reuse))
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
    # the deep blocks really ran on fewer rows: all lanes at refresh steps, only the dominant lane otherwise
    rows = 2 if family == "sdxl" else 1
    assert seen["first"] == [n * rows] * steps
    assert seen["deep"] == [(n if s in refresh else 1) * rows for s in range(steps)]


def test_cache_on_stays_close_to_cache_off(studio_for, sdxl_loras, flux_loras, capsys):
    """The cache approximates; report how far, next to how much the LoRAs and the seed change the image."""
    report = []
    for family, files in (("sdxl", sdxl_loras[:2]), ("flux", flux_loras)):
        studio = studio_for(family)
        loras = [str(f) for f in files]

        def run(params=None, stack=loras, seed=11):
            return studio.compose(PROMPT, stack, "cmlora", strategy_params={"order": "stack", **(params or {})},
                                  steps=6, seed=seed, output_type="np", **SMALL).latents[0]

        cached, uncached, base, other_seed = run(), run({"cache": False}), run(stack=[]), run({"cache": False}, seed=12)
        diff = np.abs(cached - uncached)
        psnr = 10 * np.log10(1.0 / float((diff ** 2).mean()))
        seed_change = float(np.abs(uncached - other_seed).mean())
        report.append(f"{family}: cache on vs off: mean |diff| {diff.mean():.5f}, max {diff.max():.5f}, "
                      f"PSNR {psnr:.1f} dB; LoRA effect (vs base model) {np.abs(uncached - base).mean():.5f}; "
                      f"seed change {seed_change:.5f}")
        assert psnr > 40 and diff.mean() < 0.02 * seed_change
    with capsys.disabled():
        print("\n" + "\n".join(report))


def test_cache_saves_work_against_composite_for_three_loras(studio_for, sdxl_loras):
    """Counted, not timed: with three LoRAs the cached run does fewer FLOPs than the uncached one, which does
    exactly composite's work (same lanes; only the reduction weights differ)."""
    from torch.utils.flop_counter import FlopCounterMode

    studio = studio_for("sdxl")
    stack = [str(f) for f in sdxl_loras]

    def flops(strategy, params=None):
        counter = FlopCounterMode(display=False)
        with counter:
            studio.compose(PROMPT, stack, strategy, strategy_params=params, steps=6, seed=0, output_type="np",
                           **SMALL)
        return counter.get_total_flops()

    composite = flops("composite")
    uncached = flops("cmlora", {"order": "stack", "cache": False})
    cached = flops("cmlora", {"order": "stack"})
    assert uncached == composite
    assert cached < 0.9 * uncached  # steps 1, 3, 4 of 6 run the deep blocks for one lane of three
