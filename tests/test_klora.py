"""K-LoRA: the layer choice against the paper's rule computed directly from the LoRA files, and the image
against plain diffusers/PEFT with the same per-layer, per-step choice applied through PEFT's own layer scales."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fusion import RunContext, StepContext, make_strategy
from pipelines.errors import StrategyError
from pipelines.tiny import build_tiny_sdxl
from reference import load_adapters
from studio import Studio

ATOL = 2e-4
STEPS = 6


def paper_choice(files, scales, steps, alpha=1.5, beta=0.5):
    """{module: [True where the subject LoRA is applied, per step]} by the paper's rule, from the files."""
    sds = [load_file(str(f)) for f in files]
    modules = sorted(k.removesuffix(".lora_A.weight") for k in sds[0] if k.endswith(".lora_A.weight"))
    stats = {}
    for m in modules:
        deltas = [s * sd[f"{m}.lora_B.weight"] @ sd[f"{m}.lora_A.weight"] for s, sd in zip(scales, sds)]
        k = sds[0][f"{m}.lora_A.weight"].shape[0] * sds[1][f"{m}.lora_A.weight"].shape[0]  # k = r1 · r2
        top = [float(d.abs().flatten().sort(descending=True).values[:k].sum()) for d in deltas]
        stats[m] = (top, float(deltas[0].abs().sum() / deltas[1].abs().sum()))
    ratios = [r for _, r in stats.values()]
    mean = np.mean(ratios)
    gamma = np.mean([r for r in ratios if r < 3 * mean])  # outliers (> 3x the mean) removed
    return gamma, {m: [top[0] / gamma > top[1] * (alpha * t / steps + beta) for t in range(steps)]
                   for m, (top, _) in stats.items()}


@pytest.fixture(scope="module")
def pair(sdxl_loras):
    return sdxl_loras[0], sdxl_loras[2]  # rank 4 (scale 2) and rank 8 (scale 0.5): k = 32


def test_klora_picks_the_lora_the_formula_picks(pair):
    studio = Studio("tiny-sdxl")
    names = studio.load(pair)
    strategy = make_strategy("klora")
    run = RunContext(names=names, weights=torch.tensor([1.0, 0.5]), num_steps=STEPS, family="sdxl",
                     composer=studio.composer)
    strategy.prepare(run)
    gamma, expected = paper_choice(pair, [8 / 4, 4 / 8], STEPS)
    assert strategy.gamma == pytest.approx(gamma, rel=1e-5)
    state = studio.composer.state
    flips = 0
    for step in range(STEPS):
        plan = strategy.plan(StepContext(step, STEPS, torch.tensor([1.0, 0.5])))
        assert plan.gains.tolist() == [[1.0, 0.5]]
        for module, choice in expected.items():
            row = plan.layer_weights[state.layer_id(module)]
            assert row.tolist() == ([1.0, 0.0] if choice[step] else [0.0, 1.0]), (module, step)
        flips += sum(c[step] != c[0] for c in expected.values())
    assert flips > 0  # the choice does change with the step
    shares = strategy.info["klora"]["subject_share_per_step"]
    assert shares == pytest.approx([np.mean([c[s] for c in expected.values()]) for s in range(STEPS)])
    assert shares[0] >= shares[-1]  # t runs forward: S grows, the subject wins fewer layers late
    # the scale: S = alpha t/T + beta, t counted in denoising steps
    assert strategy.scale(0, STEPS) == 0.5 and strategy.scale(3, STEPS) == pytest.approx(1.25)
    star = make_strategy("klora", {"pattern": "s*", "beta": 1.275})
    assert star.scale(2, 10) == pytest.approx((1.5 * 0.2 + 1.275) % 1.5)


def test_klora_image_equals_peft_with_the_same_per_layer_choice(pair):
    """Reference: plain diffusers with both adapters loaded through PEFT; before every denoiser call each PEFT
    layer's scale is set to the LoRA weight where the rule picks that LoRA, else 0."""
    weights = [0.9, 0.7]
    _, expected = paper_choice(pair, [8 / 4, 4 / 8], STEPS)
    ref = build_tiny_sdxl()
    names = load_adapters(ref, pair)
    ref.set_adapters(names, weights)
    step = {"i": 0}
    layers = {m.removeprefix("unet."): ref.unet.get_submodule(m.removeprefix("unet.")) for m in expected}

    def choose(module, args, kwargs):
        for m, layer in layers.items():
            subject = expected[f"unet.{m}"][step["i"]]
            layer.set_scale(names[0], weights[0] if subject else 0.0)
            layer.set_scale(names[1], 0.0 if subject else weights[1])

    def on_step_end(p, i, t, kw):
        step["i"] = i + 1
        return {}

    hook = ref.unet.register_forward_pre_hook(choose, with_kwargs=True)
    with torch.no_grad():
        reference = ref("a corgi", num_inference_steps=STEPS, guidance_scale=5.0, height=32, width=32,
                        generator=torch.Generator("cpu").manual_seed(6), output_type="np",
                        callback_on_step_end=on_step_end).images[0]
    hook.remove()
    studio = Studio("tiny-sdxl")
    loras = [f"{f}:{w}" for f, w in zip(pair, weights)]
    got = studio.compose("a corgi", loras, "klora", steps=STEPS, seed=6, width=32, height=32,
                         output_type="np").latents[0]
    np.testing.assert_allclose(got, reference, atol=ATOL, rtol=0)
    merged = studio.compose("a corgi", loras, "merge", steps=STEPS, seed=6, width=32, height=32,
                            output_type="np").latents[0]
    assert np.abs(merged - reference).max() > 10 * ATOL  # K-LoRA is not the merge
    assert studio.composer.state.layer_weights is None  # the per-layer table is gone after the run


def test_klora_needs_exactly_two_loras():
    for count in (1, 3):
        run = RunContext(names=[f"l{i}" for i in range(count)], weights=torch.ones(count), num_steps=4, family="sdxl")
        with pytest.raises(StrategyError, match="exactly two LoRAs"):
            make_strategy("klora").prepare(run)
