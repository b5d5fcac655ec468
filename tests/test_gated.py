"""gated: AutoLoRA's gate against its formula, the block x time schedule against diffusers' own per-block
``set_adapters`` changed at every step, and gate training end to end (CLI and API) on tiny SDXL and FLUX."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding

from fusion import make_strategy
from fusion.block_schedule import PRESETS, BlockSchedule, Curve, depth_groups
from fusion.gates import GateSet, gates_path
from pipelines.errors import StrategyError, StudioError
from pipelines.families import FLUX, SDXL
from pipelines.tiny import build_tiny_sdxl
import writers
from reference import load_adapters
from studio import Studio
from studio.train_gates import GateTraining, autolora_loss, train_gates

ATOL = 2e-4
PROMPT = "a corgi in a garden"
SMALL = {"width": 32, "height": 32}  # 32x32 images keep these tests fast (every block still runs)


# ------------------------------------------------------------------------------------------------ the gate
@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_gate_output_equals_autolora_formula(family, studio_for, sdxl_loras, flux_loras):
    studio = studio_for(family)
    names = studio.load(sdxl_loras[:2] if family == "sdxl" else flux_loras)
    composer, state = studio.composer, studio.composer.state
    state.set_active(names)
    cols = [state.column(n) for n in names]
    gains = torch.zeros(2, len(state.names))
    gains[0, cols], gains[1, cols] = torch.tensor([0.8, 0.5]), torch.tensor([1.2, 0.7])
    state.set_gains(denoiser=gains)
    gate_set = GateSet.for_stack(composer, names)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for gate in gate_set.gates:
            for p in gate.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
    key = next(k for k in gate_set.keys if all(k in composer.adapters[n].layer_keys for n in names))
    layer, gate = composer.layers[key], gate_set.gates[gate_set.keys.index(key)]
    x = torch.randn(2, 7, layer.in_features, generator=gen)
    t = torch.tensor([0.3, 0.9])

    # the formula, computed from each LoRA's dense weight change
    with torch.no_grad():
        h = F.linear(x, layer.weight, layer.bias)
        o = [gains[:, c].view(2, 1, 1) * F.linear(x, composer.delta_weight(n, key)) for n, c in zip(names, cols)]
        phi = get_timestep_embedding(t * 1000, 8, flip_sin_to_cos=True, downscale_freq_shift=0)
        d = h.shape[-1]
        expected = h.clone()
        for oi in o:
            g = torch.sigmoid(F.layer_norm(oi, (d,)) * gate.w_lora + F.layer_norm(h, (d,)) * F.layer_norm(oi, (d,))
                              * gate.w_cross + gate.bias + (phi @ gate.w_time.T)[:, None, :])
            expected += gate.w_out * g * oi
        ungated = layer(x)
        denoiser = getattr(studio.pipe, studio.family.denoiser)
        n_params = len(list(denoiser.parameters()))
        gate_set.attach(composer)
        assert len(list(denoiser.parameters())) == n_params  # gates are not registered in the model
        try:
            state.timestep = t
            got = layer(x)
            state.timestep = torch.tensor([0.05, 0.05])
            other_time = layer(x)
        finally:
            gate_set.detach()
            state.timestep = None
        after = layer(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert (got - other_time).abs().max() > 1e-3  # the gate uses the timestep
    torch.testing.assert_close(ungated, h + sum(o), atol=1e-5, rtol=1e-4)  # ungated path unchanged
    assert torch.equal(after, ungated)  # detaching restores the ungated layer exactly
    # per-adapter outputs sum to the ungated change
    outputs = layer.studio_branch.adapter_outputs(x, h, layer)
    torch.testing.assert_close(outputs.sum(0), ungated - h, atol=1e-5, rtol=1e-4)


def test_gates_on_a_4bit_model_see_its_own_branch_as_base(sdxl_loras, tmp_path):
    """A 4-bit layer's SVDQuant branch is part of ``h_base``, not an adapter: an identity gate changes nothing."""
    from pipelines.quant import QuantLinear
    from pipelines.quant.convert import convert
    from pipelines.quant.quantizer import QuantConfig

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the 4-bit reference path is many small ops (see test_quant_pipeline)
    try:
        _, folder = convert("tiny-sdxl-random", tmp_path / "q", QuantConfig(fmt="int4", rank=8, alphas=None), None)
        studio = Studio(str(folder))
        names = studio.load(sdxl_loras[:2])
        composer, state = studio.composer, studio.composer.state
        state.set_active(names)
        state.set_gains(denoiser=state.gains_row({names[0]: 0.8, names[1]: 0.5})[None])
        gate_set = GateSet.for_stack(composer, names)
        key = next(k for k in gate_set.keys if isinstance(composer.layers[k], QuantLinear) and composer.layers[k].rank)
        layer = composer.layers[key]
        x = torch.randn(1, 5, layer.in_features, generator=torch.Generator().manual_seed(0))
        seen = {}

        def identity_gate(inputs, base, outputs, columns):
            seen.update(base=base, outputs=outputs, columns=columns)
            return outputs.sum(0)

        with torch.no_grad():
            ungated = layer(x)
            layer.studio_branch.set_gate(identity_gate)
            try:
                gated = layer(x)
            finally:
                layer.studio_branch.set_gate(None)
            own = layer._base_op(x)  # 4-bit product + bias + the layer's own low-rank branch, no LoRA
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(seen["base"], own, atol=1e-5, rtol=1e-5)
    assert seen["outputs"].shape[0] == 2 and seen["columns"] == [state.column(n) for n in names]
    torch.testing.assert_close(gated, ungated, atol=1e-5, rtol=1e-5)


def test_autolora_loss_formula():
    target = torch.tensor([[1.0, -1.0], [0.5, 0.0]])
    own = target + 0.1
    other = target + torch.tensor([[0.4, 0.4], [0.4, 0.4]])
    assert float(autolora_loss(own, None, target, 0.5)) == pytest.approx(0.01)
    assert float(autolora_loss(own, other, target, 0.5)) == pytest.approx(0.01 + (0.5 - 0.16))
    far = target + 1.0
    assert float(autolora_loss(own, far, target, 0.5)) == pytest.approx(0.01)  # hinge inactive beyond the margin


# ------------------------------------------------------------------------------------------------ schedules
def test_depth_groups_presets_and_curves(studio_for):
    sdxl_blocks = ["te1", "te2", "down.0", "down.1", "down.2", "mid", "up.0", "up.1", "up.2", "other"]
    assert depth_groups(SDXL, sdxl_blocks) == {"deep": ["down.2", "mid", "up.0"],
                                               "outer": ["down.0", "down.1", "up.1", "up.2"]}
    flux_blocks = ["te1", "te2", *[f"double.{i}" for i in range(19)], *[f"single.{i}" for i in range(38)], "other"]
    groups = depth_groups(FLUX, flux_blocks)
    assert groups["outer"] == [*[f"double.{i}" for i in range(14)], *[f"single.{i}" for i in range(24, 38)]]
    assert len(groups["deep"]) == 29
    curve = Curve.parse([[0.0, 1.0], [0.5, 1.0], [1.0, 0.5]], "x")
    assert [curve(p) for p in (0.0, 0.25, 0.75, 1.0)] == pytest.approx([1.0, 1.0, 0.75, 0.5])
    assert Curve.parse(0.3, "x")(0.9) == pytest.approx(0.3)
    bound = BlockSchedule.load("subject-deep-early").bind("sdxl", sdxl_blocks, [["a", "0", "subject"],
                                                                                ["b", "1", "style"]])
    early, late = bound.gains(0.0), bound.gains(0.9)
    deep, outer = [sdxl_blocks.index(b) for b in ("down.2", "mid", "up.0")], [sdxl_blocks.index("up.2")]
    assert early[deep, 0].tolist() == [1.0] * 3 and late[deep, 0].tolist() == pytest.approx([0.6] * 3)
    assert early[outer, 1].item() == pytest.approx(0.3) and late[outer, 1].item() == pytest.approx(1.0)
    assert early[[0, 1, 9]].eq(1).all()  # text encoders and embedders are never scheduled
    assert set(PRESETS) >= {"flat", "subject-deep-early", "b-lora"}


def test_schedule_errors_name_the_problem(tmp_path):
    blocks = ["te1", "te2", "down.0", "down.1", "down.2", "mid", "up.0", "up.1", "up.2", "other"]
    with pytest.raises(StrategyError, match="unknown schedule 'deep-later'.*preset"):
        BlockSchedule.load("deep-later")
    bad = tmp_path / "bad.toml"
    bad.write_text("[subject\nmid = 1")
    with pytest.raises(StrategyError, match="bad.toml: not valid TOML"):
        BlockSchedule.load(str(bad))
    bad.write_text("[subject]\nmid = [[0.5, 1.0], [0.2, 0.0]]")
    with pytest.raises(StrategyError, match=r"\[subject\] mid: keyframe progress must increase"):
        BlockSchedule.load(str(bad))
    bad.write_text("[subject]\n'down.7' = 1.0")
    with pytest.raises(StrategyError, match="block 'down.7' does not exist"):
        BlockSchedule.load(str(bad)).bind("sdxl", blocks, [["x", "0", "subject"]])
    with pytest.raises(StrategyError, match="no table for 'x' / '0' / 'background'"):
        BlockSchedule.load("b-lora").bind("sdxl", blocks, [["x", "0", "background"]])
    with pytest.raises(StrategyError, match="text encoders and embedders"):
        BlockSchedule({"subject": {"te": 0.0}}).bind("sdxl", blocks, [["x", "0", "subject"]])
    with pytest.raises(StrategyError, match="one of"):
        make_strategy("gated", {"mode": "sometimes"})


def test_schedule_equals_diffusers_per_block_scales_changed_every_step(studio_for, sdxl_loras, tmp_path):
    """Time-varying block gains against diffusers' own ``set_adapters`` with per-block dicts, set per step."""
    files, weights, steps = sdxl_loras[:2], [0.9, 0.7], 4
    schedule = tmp_path / "schedule.toml"
    schedule.write_text('[subject]\n"down.1" = [[0.0, 1.0], [1.0, 0.0]]\nmid = 0.5\n'
                        '[style]\nup = 0.8\n"up.1" = [[0.0, 0.2], [0.6, 1.0]]\n')
    studio = studio_for("sdxl")
    got = studio.compose(PROMPT, [f"{f}:{w}" for f, w in zip(files, weights)], "gated", steps=steps, seed=3,
                         strategy_params={"mode": "schedule", "schedule": str(schedule)},
                         output_type="np", **SMALL).latents[0]

    ref = build_tiny_sdxl()
    names = load_adapters(ref, files)

    def scales(step):
        p = step / steps
        up1 = float(np.interp(p, [0.0, 0.6], [0.2, 1.0]))
        w0, w1 = weights
        return [{"unet": {"down": {"block_1": w0 * (1 - p), "block_2": w0}, "mid": 0.5 * w0,
                          "up": {"block_0": w0, "block_1": w0}}},
                {"unet": {"down": {"block_1": w1, "block_2": w1}, "mid": w1,
                          "up": {"block_0": 0.8 * w1, "block_1": up1 * w1}}}]

    current = {"step": 0}
    original = ref.unet.forward

    def forward(*args, **kwargs):
        ref.set_adapters(names, scales(current["step"]))
        return original(*args, **kwargs)

    def on_step_end(pipe, i, t, kw):
        current["step"] = i + 1
        return {}

    ref.unet.forward = forward
    with torch.no_grad():
        expected = ref(PROMPT, num_inference_steps=steps, guidance_scale=5.0, height=32, width=32, output_type="np",
                       generator=torch.Generator("cpu").manual_seed(3), callback_on_step_end=on_step_end).images[0]
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
    merged = studio.compose(PROMPT, [f"{f}:{w}" for f, w in zip(files, weights)], "merge", steps=steps, seed=3,
                            output_type="np", **SMALL).latents[0]
    assert np.abs(merged - got).max() > 10 * ATOL


def test_constant_schedule_equals_static_block_weights_on_flux(studio_for, flux_loras, tmp_path):
    schedule = tmp_path / "flux.toml"
    schedule.write_text('[subject]\ndouble = 0.5\n[style]\n"single.1" = 0.0\n"double.0" = 2.0\n')
    studio = studio_for("flux")
    a, b = (str(f) for f in flux_loras)
    got = studio.compose(PROMPT, [a, f"{b}:0.7"], "gated", steps=3, seed=5, output_type="np", **SMALL,
                         strategy_params={"mode": "schedule", "schedule": str(schedule)}).latents[0]
    expected = studio.compose(PROMPT, [f"{a}:1:blocks=double=0.5", f"{b}:0.7:blocks=single.1=0,double.0=2"],
                              "merge", steps=3, seed=5, output_type="np", **SMALL).latents[0]
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ training
def _copy(files, folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, f in enumerate(files):
        out.append(str(shutil.copy(f, folder / f"lora{i}.safetensors")))
    return out


def _timesteps_seen_by_gates(studio, files, params=None):
    seen = []
    gate_hooks = []
    original = GateSet.attach

    def attach(self, composer):
        original(self, composer)
        gate_hooks.append(self.gates[0].register_forward_pre_hook(
            lambda m, a: seen.append(float(m.state.timestep.reshape(-1)[0]))))

    GateSet.attach = attach
    try:
        strat = make_strategy("gated", params)
        result = studio.compose(PROMPT, files, strat, steps=3, seed=2, output_type="np", **SMALL)
    finally:
        GateSet.attach = original
        for h in gate_hooks:
            h.remove()
    return strat, result.latents[0], seen


def test_train_gates_api_keeps_the_model_frozen_and_gated_uses_the_gates(studio_for, sdxl_loras, tmp_path):
    studio = studio_for("sdxl")
    files = _copy(sdxl_loras[:2], tmp_path / "stack")
    before = {k: v.clone() for k, v in studio.pipe.unet.state_dict().items()}
    trained = train_gates(studio, files, config=GateTraining(steps=2, renders=1, render_steps=2, seed=1,
                                                                    size=32))
    assert trained.path == gates_path(files, "tiny-sdxl-random", [studio.loaded()[n].sha256 for n in studio.load(files)])
    assert trained.path.parent == tmp_path / "stack" and trained.path.exists()
    assert len(trained.losses) == 2 and all(np.isfinite(trained.losses))
    after = studio.pipe.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # model frozen, nothing left attached
    assert not any(layer.studio_branch.gate for layer in studio.composer.layers.values())
    loaded = GateSet.load(trained.path, studio.composer, studio.load(files))
    assert any(float(g.w_out.detach().sub(0.512).abs().max()) > 0 for g in loaded.gates)  # the gates moved
    assert any(float(g.w_time.detach().abs().max()) > 0 for g in loaded.gates)  # so did the timestep term
    assert loaded.metadata["model"] == "tiny-sdxl-random" and '"lora0.safetensors"' in loaded.metadata["loras"]

    strat, learned, seen = _timesteps_seen_by_gates(studio, files)
    assert strat.used.startswith("learned gates") and strat.info["gated"]["used"] == strat.used
    expected_t = [float(t) / 1000 for t in studio.pipe.scheduler.timesteps]
    assert seen[:3] == pytest.approx(expected_t)  # the gates see each step's timestep
    scheduled = studio.compose(PROMPT, files, "gated", strategy_params={"mode": "schedule"}, steps=3, seed=2,
                               output_type="np", **SMALL).latents[0]
    assert np.abs(learned - scheduled).max() > 10 * ATOL
    assert not any(layer.studio_branch.gate for layer in studio.composer.layers.values())


def test_train_gates_cli_on_flux_and_gated_render(studio_for, flux_loras, tmp_path):
    from typer.testing import CliRunner

    from studio.cli import app

    files = _copy(flux_loras, tmp_path / "flux-stack")
    result = CliRunner().invoke(app, ["train-gates", "--model", "tiny-flux-random", "--lora", files[0], "--lora",
                                      f"{files[1]}:0.8", "--steps", "2", "--renders", "1", "--render-steps", "2",
                                      "--size", "32", "--caption", "0=a zorb", "--seed", "3"])
    assert result.exit_code == 0, result.output
    path = Path(result.stdout.strip().splitlines()[-1])
    assert path.parent == tmp_path / "flux-stack" and path.name.startswith("studio-gates-")
    studio = studio_for("flux")
    strat, image, seen = _timesteps_seen_by_gates(studio, [files[0], f"{files[1]}:0.8"], {"mode": "learned"})
    assert strat.used == f"learned gates {path.name}" and image.shape == (32, 32, 3)
    assert seen[:3] == pytest.approx([float(t) / 1000 for t in studio.pipe.scheduler.timesteps])
    # gates belong to their stack: another stack refuses them, and learned mode without gates explains itself
    other = [str(writers.peft_flux(tmp_path / "other", 99)), files[1]]
    with pytest.raises(StrategyError, match="another stack or model"):
        studio.compose(PROMPT, other, "gated", strategy_params={"gates": str(path)}, steps=1, output_type="np",
                       **SMALL)
    with pytest.raises(StrategyError, match="studio train-gates"):
        studio.compose(PROMPT, other, "gated", strategy_params={"mode": "learned"}, steps=1, output_type="np",
                       **SMALL)
    with pytest.raises(StudioError, match="at least two"):
        train_gates(studio, files[:1])
