"""QuantLinear against the SVDQuant formula computed directly; LoRAs joining its low-rank branch; SVDQuant vs RTN."""

from __future__ import annotations

import pytest
import torch

from pipelines.adapters.delta import LayerDelta
from pipelines.composed import compose_module, prepare_delta, restore_module
from pipelines.mix_state import MixState
from pipelines.quant.calibrate import LayerStats
from pipelines.quant.linear import QuantLinear
from pipelines.quant.quantizer import QuantConfig, build_layer, quantize_linear, relative_error, smoothing_factors
from pipelines.quant.targets import Target

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def outlier_layer(n_in=256, n_out=192, seed=0):
    """A linear layer and activations with a few outlier channels, as diffusion transformers have."""
    gen = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(n_in, n_out)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n_out, n_in, generator=gen) / n_in ** 0.5)
        linear.weight[:, 7] *= 8  # a weight outlier column too
        linear.bias.copy_(torch.randn(n_out, generator=gen) * 0.1)
    x = torch.randn(2, 160, n_in, generator=gen)
    x[..., [3, 50, 51, 200]] *= 30  # activation outlier channels
    return linear, x


# --------------------------------------------------------------------------------------------- reference
def _nibbles(packed):
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2).long()


def reference_forward(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """y = x·L_downᵀ·L_upᵀ + dequant(Q(x/λ)·Q(R)ᵀ) + b, written out element by element in float64."""
    g = layer.group_size
    v = _nibbles(layer.qweight)
    if layer.fmt == "int4":
        w_codes = torch.where(v >= 8, v - 16, v).double()
        w_scale = layer.wscales.view(torch.float16).double()
    else:
        w_codes = torch.where(v >= 8, -E2M1[v & 7], E2M1[v & 7])
        w_scale = layer.wscales.view(torch.float8_e4m3fn).double() * layer.wscale_global.view(torch.float32).double()
    w_res = w_codes * w_scale.repeat_interleave(g, dim=1)
    x2 = x.reshape(-1, layer.in_features)
    xs = x2 / layer.smooth.float() if layer.smooth is not None else x2
    x_deq = torch.empty_like(xs, dtype=torch.float64)
    for t in range(xs.shape[0]):
        if layer.fmt == "nvfp4":
            token_scale = xs[t].abs().max() / (6 * 448)
        for k in range(0, layer.in_features, g):
            part = xs[t, k:k + g]
            if layer.fmt == "int4":
                s = part.abs().max() / 7
                s = s if s > 0 else torch.tensor(1.0)
                x_deq[t, k:k + g] = torch.clamp(torch.round(part / s), -8, 7).double() * s.double()
            else:
                block = (part.abs().max() / (6 * token_scale)).to(torch.float8_e4m3fn).double()
                step = block * token_scale.double()
                mag = (part.double().abs() / step).clamp(max=6)
                nearest = E2M1[(mag[:, None] - E2M1[None]).abs().argmin(dim=1)]
                x_deq[t, k:k + g] = torch.sign(part.double()) * nearest * step
    y = x_deq @ w_res.T
    if layer.rank:
        y = y + x2.double() @ layer.lora_down.double().T @ layer.lora_up.double().T
    if layer.bias is not None:
        y = y + layer.bias.double()
    return y.reshape(*x.shape[:-1], layer.out_features)


@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
def test_quantized_layer_equals_the_formula(fmt):
    linear, x = outlier_layer()
    smooth = smoothing_factors(x.reshape(-1, 256).abs().amax(0), linear.weight, 0.5)
    group = 64 if fmt == "int4" else 16
    layer = build_layer(linear.weight.detach(), linear.bias.detach(), fmt=fmt, group_size=group, rank=16,
                        smooth=smooth, storage_dtype=torch.bfloat16)
    with torch.no_grad():
        got = layer(x)
    expected = reference_forward(layer, x)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    # the effective weight: the residual de-smoothed plus the branch, close to the original weight
    rel = (layer.weight - linear.weight).norm() / linear.weight.norm()
    assert rel < 0.1


def test_weight_only_layer_and_rtn_are_the_same_formula_without_branch():
    linear, x = outlier_layer()
    w4a16 = build_layer(linear.weight.detach(), linear.bias.detach(), fmt="int4", group_size=64, rank=0,
                        smooth=None, mode="w4a16")
    with torch.no_grad():
        expected = x @ w4a16.weight.T + w4a16.bias.float()
        torch.testing.assert_close(w4a16(x), expected, rtol=1e-5, atol=1e-5)
        rtn = build_layer(linear.weight.detach(), linear.bias.detach(), fmt="int4", group_size=64, rank=0, smooth=None)
        torch.testing.assert_close(rtn(x).double(), reference_forward(rtn, x), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
def test_svdquant_beats_round_to_nearest_on_outlier_layers(fmt):
    linear, x = outlier_layer(seed=5)
    flat = x.reshape(-1, 256)
    stats = LayerStats(amax=flat.abs().amax(0), sample=flat[:128])
    held_out = flat[128:]
    config = QuantConfig(fmt=fmt, alphas=(0.0, 0.25, 0.5, 0.75, 1.0))
    svdq, report = quantize_linear(linear, Target("l", 256, 192, True, "w4a4", 32), stats, config)
    rtn, _ = quantize_linear(linear, Target("l", 256, 192, True, "w4a4", 0), stats,
                             QuantConfig(fmt=fmt, method="rtn"))
    err_svdq = relative_error(svdq, linear.weight, held_out)
    err_rtn = relative_error(rtn, linear.weight, held_out)
    assert err_svdq < 0.5 * err_rtn, (err_svdq, err_rtn)
    assert report.alpha is not None and report.error < report.rtn_error
    # SVDQuant's refinement (SVD of λW − Q(R), a few times) lowers the weight error further
    smooth = smoothing_factors(stats.amax, linear.weight, 0.5)
    weight_error = {}
    for iters in (0, 3):
        layer = build_layer(linear.weight.detach(), None, fmt=fmt, group_size=config.group_size, rank=32,
                            smooth=smooth, svd_iters=iters)
        weight_error[iters] = ((layer.weight - linear.weight) * smooth.float()).norm().item()
    assert weight_error[3] < 0.99 * weight_error[0], weight_error
    # the branch alone (no smoothing) beats RTN too
    branch_only = build_layer(linear.weight.detach(), None, fmt=fmt, group_size=config.group_size, rank=32, smooth=None)
    assert relative_error(branch_only, linear.weight, held_out) < err_rtn


# ----------------------------------------------------------------------------------------------- adapters
def lora(n_in, n_out, rank, seed, scale=0.5):
    gen = torch.Generator().manual_seed(seed)
    return LayerDelta(down=torch.randn(rank, n_in, generator=gen) * 0.1, up=torch.randn(n_out, rank, generator=gen) * 0.1,
                      scale=scale)


def host(layer, deltas):
    state = MixState(["double.0"], text_blocks=[])
    for name in deltas:
        state.add_column(name)
    composed = compose_module(layer, state, block_id=0)
    for name, delta in deltas.items():
        composed.studio_branch.entries[name] = prepare_delta(delta, layer)
    state.set_active(list(deltas))
    return composed, state


@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
def test_loras_join_the_branch_as_one_gemm_pair_with_live_gains(fmt):
    linear, x = outlier_layer()
    layer = build_layer(linear.weight.detach(), linear.bias.detach(), fmt=fmt, group_size=64 if fmt == "int4" else 16,
                        rank=16, smooth=smoothing_factors(x.reshape(-1, 256).abs().amax(0), linear.weight, 0.5))
    with torch.no_grad():
        base = layer(x)
    deltas = {"a": lora(256, 192, 4, 1), "b": lora(256, 192, 8, 2, scale=2.0)}
    composed, state = host(layer, deltas)
    assert composed is layer  # the quantized layer hosts the branch itself
    gains = torch.tensor([[0.8, 0.3], [0.0, 1.5]])  # a different mix per sample
    state.set_gains(denoiser=gains)
    with torch.no_grad():
        got = composed(x)
    branch = composed.studio_branch
    assert branch.down_cat.shape[0] == 16 + 4 + 8 and branch.fixed_rank == 16  # one concatenated pair
    for i in range(2):
        exact = sum(gains[i, j] * d.scale * (x[i] @ d.down.T @ d.up.T) for j, d in enumerate(deltas.values()))
        torch.testing.assert_close(got[i], base[i] + exact, rtol=1e-5, atol=1e-5)
    # a new weight is a new gain: no re-packing, no re-quantization
    packed = branch.down_cat
    state.set_gains(denoiser=torch.tensor([[0.1, 0.2]]))
    with torch.no_grad():
        composed(x)
    assert branch.down_cat is packed
    # no LoRA active: the fixed segment alone reproduces the layer
    state.set_active([])
    with torch.no_grad():
        torch.testing.assert_close(composed(x), base, rtol=1e-5, atol=1e-5)
    # removing every adapter leaves the layer exactly as loaded
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    restored = restore_module(composed)
    assert restored is layer and layer.studio_branch is None
    assert "studio_branch" not in dict(layer.named_children())
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())
    with torch.no_grad():
        assert torch.equal(layer(x), base)


def test_dora_on_a_quantized_layer_uses_its_effective_weight():
    linear, x = outlier_layer()
    layer = build_layer(linear.weight.detach(), linear.bias.detach(), fmt="int4", group_size=64, rank=16,
                        smooth=smoothing_factors(x.reshape(-1, 256).abs().amax(0), linear.weight, 0.5))
    delta = lora(256, 192, 4, 3)
    delta.magnitude = torch.rand(192, generator=torch.Generator().manual_seed(9)) + 0.5
    delta.magnitude_axis = "out"
    with torch.no_grad():
        base_nobias = layer._base_op(x, with_bias=False)
        base = layer(x)
    composed, state = host(layer, {"d": delta})
    state.set_gains(denoiser=torch.tensor([[0.7]]))
    with torch.no_grad():
        got = composed(x)
    w_eff = layer.dequantized_weight().double()
    dw = delta.scale * delta.up.double() @ delta.down.double()
    s = delta.magnitude.double() / (w_eff + dw).norm(dim=1)
    expected = base.double() + 0.7 * ((s - 1) * base_nobias.double() + s * (x.double() @ dw.T))
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


def test_weight_only_layer_hosts_loras_without_a_fixed_segment():
    """FLUX's adaLN linears are W4A16 with no branch: LoRAs on them form the whole concatenated pair."""
    linear, x = outlier_layer()
    layer = build_layer(linear.weight.detach(), linear.bias.detach(), fmt="int4", group_size=64, rank=0, smooth=None,
                        mode="w4a16")
    with torch.no_grad():
        base = layer(x)
    delta = lora(256, 192, 4, 7)
    composed, state = host(layer, {"a": delta})
    state.set_gains(denoiser=torch.tensor([[0.6]]))
    with torch.no_grad():
        got = composed(x)
    assert composed.studio_branch.fixed_rank == 0 and composed.studio_branch.down_cat.shape[0] == 4
    torch.testing.assert_close(got, base + 0.6 * delta.scale * (x @ delta.down.T @ delta.up.T), rtol=1e-5, atol=1e-5)
