"""The Triton W4A4 kernels under Triton's interpreter (``TRITON_INTERPRET=1``, numpy on the CPU), against the
reference path of :class:`~pipelines.quant.linear.QuantLinear`.

Not collected by a plain ``pytest`` run (no ``test_`` prefix): ``test_quant_runtimes.py`` runs this file in a
subprocess with the interpreter switched on, because Triton reads the flag once, when it is first imported, and
the main test process must stay as it is.
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run through test_quant_runtimes.py (needs TRITON_INTERPRET=1 before triton is imported)",
                allow_module_level=True)
pytest.importorskip("triton")

from test_quant_linear import host, lora, outlier_layer  # noqa: E402

from pipelines.quant import triton_kernels  # noqa: E402
from pipelines.quant.dequant import dequantize_weight  # noqa: E402
from pipelines.quant.quantizer import build_layer, smoothing_factors  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def int4_layer(group=64, n_in=256, n_out=80, rank=16, seed=0, bias=True):
    linear, x = outlier_layer(n_in, n_out, seed=seed)
    smooth = smoothing_factors(x.reshape(-1, n_in).abs().amax(0), linear.weight, 0.5)
    layer = build_layer(linear.weight.detach(), linear.bias.detach() if bias else None, fmt="int4", group_size=group,
                        rank=rank, smooth=smooth)
    return layer, x[:, :25]  # 50 tokens: not a multiple of any tile


def test_activation_quantization_rounds_exactly_like_the_reference():
    layer, x = int4_layer()
    x2d = x.reshape(-1, 256).clone()
    # ties: λ = 1 on group 0 and amax 7 there, so the scale is exactly 1 and k + 0.5 must round to even
    layer.smooth[:64] = 1.0
    x2d[:, :64] = torch.linspace(-6.5, 6.5, 27).repeat(3)[:64]
    x2d[:, 0] = 7.0
    x2d[3, 64:128] = 0.0  # an all-zero group: scale 1, codes 0
    codes, scales = triton_kernels.quantize_activations(x2d, layer.smooth, 64)
    ref_codes, ref_scales = layer.quantize_input(x2d)
    assert torch.equal(codes.float(), ref_codes) and torch.equal(scales.T, ref_scales)
    assert set(codes[0, 1:27].tolist()) >= {-6, -4, -2, 2, 4, 6}  # the ties of ±6.5, ±5.5, ... went to even


@pytest.mark.parametrize("group", [32, 64, 128])
def test_kernel_product_equals_the_reference_path(group):
    layer, x = int4_layer(group=group)
    x2d = x.reshape(-1, 256)
    got = triton_kernels.w4a4_linear(x2d, layer.qweight, layer.wscales, layer.smooth, group)
    expected = layer.reference_product(x2d)
    # integer group products are exact; only the float32 sum of scaled groups may round differently
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())
    # the epilogue: bias and an addend (the branch output) in float32
    addend = torch.randn(x2d.shape[0], 80, generator=torch.Generator().manual_seed(1))
    fused = triton_kernels.w4a4_linear(x2d, layer.qweight, layer.wscales, layer.smooth, group, bias=layer.bias,
                                       addend=addend)
    torch.testing.assert_close(fused, expected + layer.bias + addend, rtol=1e-6, atol=1e-6 * fused.abs().max().item())


def test_layer_runtime_triton_equals_reference_with_loras_and_per_sample_gains():
    layer, x = int4_layer()
    with torch.no_grad():
        reference = layer(x)
        layer.runtime = "triton"
        torch.testing.assert_close(layer(x), reference, rtol=1e-6, atol=1e-6 * reference.abs().max().item())
        layer.runtime = "reference"
    deltas = {"a": lora(256, 80, 4, 1), "b": lora(256, 80, 8, 2, scale=2.0)}
    composed, state = host(layer, deltas)
    state.set_gains(denoiser=torch.tensor([[0.8, 0.3], [0.0, 1.5]]))  # a different mix per sample
    with torch.no_grad():
        reference = composed(x)
        layer.runtime = "triton"
        got = composed(x)
    torch.testing.assert_close(got, reference, rtol=1e-6, atol=1e-6 * reference.abs().max().item())


def test_auto_runs_dequant_when_gradients_are_recorded():
    """The kernel has no backward: training through a 4-bit layer (e.g. learned gates) must not lose gradients."""
    layer, x = int4_layer()
    x = x.clone().requires_grad_(True)
    layer.runtime = "dequant"
    expected = layer(x)
    layer.runtime = "auto"
    got = layer(x)
    assert got.grad_fn is not None and torch.equal(got, expected)
    layer.runtime = "triton"  # explicit: the kernel, with the branch added outside it (its gradient kept)
    out = layer(x)
    out.sum().backward()
    branch_grad = (torch.ones(80) @ layer.lora_up.float() @ layer.lora_down.float()).expand_as(x)
    torch.testing.assert_close(x.grad, branch_grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(out, layer(x), rtol=1e-6, atol=1e-6 * out.abs().max().item())


def test_dequant_kernel_equals_the_torch_dequantization():
    layer, _ = int4_layer()
    got = triton_kernels.dequantize_int4(layer.qweight, layer.wscales, layer.smooth, 64, torch.float32)
    assert torch.equal(got, dequantize_weight(layer, torch.float32))
    # bfloat16: the interpreter's float32 -> bfloat16 conversion is not round-to-nearest-even (a GPU's is), so
    # here the kernel's bfloat16 weights agree with torch's to one bfloat16 step
    got = triton_kernels.dequantize_int4(layer.qweight, layer.wscales, layer.smooth, 64, torch.bfloat16).float()
    expected = dequantize_weight(layer, torch.bfloat16).float()
    assert ((got - expected).abs() <= expected.abs() * 2.0 ** -7).all()


def test_composite_lanes_on_a_quantized_pipeline_match_the_reference(tmp_path, sdxl_loras):
    """A whole denoiser forward: composite runs the LoRAs as lanes of one batch with per-lane gains."""
    from studio import Studio
    from pipelines.quant.convert import convert
    from pipelines.quant.quantizer import QuantConfig

    _, folder = convert("tiny-sdxl-random", tmp_path / "q", QuantConfig(fmt="int4", alphas=None), None)
    stack = [f"{sdxl_loras[0]}:0.9", f"{sdxl_loras[1]}:0.7"]
    latents = {}
    for runtime in ("reference", "triton"):
        studio = Studio(str(folder), runtime=runtime)
        assert studio.runtime_counts[runtime] > 0
        result = studio.compose("a fox", stack, "composite", steps=1, seed=2, guidance=1.0, width=32, height=32,
                                output_type="latent")
        latents[runtime] = result.latents[0]
    ref, got = latents["reference"], latents["triton"]
    assert ((got - ref).norm() / ref.norm()).item() < 1e-5
