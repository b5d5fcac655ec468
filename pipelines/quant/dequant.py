"""The ``dequant`` runtime (W4A16 semantics): dequantize a layer's 4-bit residual, then one GEMM.

For a W4A4 :class:`~pipelines.quant.linear.QuantLinear` (SVDQuant, Li et al. 2024, eq. 5-6) the reference path
computes ``dequant(Q(x/λ)·Q(R)ᵀ)``, quantizing the activations to 4 bits at run time. This runtime keeps the
activations in their 16-bit (or float32) dtype and folds the smoothing into the weight:

    y = x · (dequant(R) · diag(λ)⁻¹)ᵀ  =  (x / λ) · dequant(R)ᵀ        (exact in real arithmetic)

so the only error left is the 4-bit *weight* error, and the output is closer to the 16-bit model than W4A4 (the
README measures both). The dense weight is built at the layer, for this call only (never cached): every element
is ``code · scale_group / λ_k``, computed in float32 (the same operations, in the same order, as
:meth:`QuantLinear.dequantized_weight` minus the branch) and rounded once to the activation dtype. The W4A16
layers (FLUX's adaLN linears, no smoothing) use the same code path without λ.

Speed: on a CPU the weight is built in blocks of rows that fit the cache (INT4 nibbles sign-extended by shifts,
NVFP4 through a 256-entry table of byte -> two operands), which costs 3-8 % of the GEMM at FLUX.1 shapes
(README); on a CUDA GPU a one-pass Triton kernel writes it (:func:`pipelines.quant.triton_kernels.dequantize_int4`)
when Triton is importable, else the same torch code runs unblocked.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import formats

_CPU_BLOCK_ELEMENTS = 1 << 18  # float32 elements per block of rows: 1 MiB, about one core's L2 share


def _byte_table(operand_of_code: torch.Tensor) -> torch.Tensor:
    """``[256, 2]`` float32: for each packed byte, the operands of its low nibble (element 2k) and high nibble."""
    byte = torch.arange(256)
    return torch.stack([operand_of_code[byte & 0xF], operand_of_code[byte >> 4]], dim=1).float()


NVFP4_TABLE = _byte_table(formats.nvfp4_operand(torch.arange(16, dtype=torch.uint8)))  # 2·e2m1 per nibble

_tables: dict[torch.device, torch.Tensor] = {}


def _nvfp4_table(device: torch.device) -> torch.Tensor:
    if device not in _tables:
        _tables[device] = NVFP4_TABLE.to(device)
    return _tables[device]


def group_scales(layer) -> torch.Tensor:
    """The residual's float32 scale per output channel and group ``[out, in/group]`` (NVFP4: ``block·global/2``,
    the 1/2 undoing the doubled E2M1 operand)."""
    if layer.fmt == "int4":
        return formats.from_bits(layer.wscales)
    return formats.from_bits(layer.wscales) * formats.from_bits(layer.wscale_global) / 2


def dequantize_weight(layer, dtype: torch.dtype) -> torch.Tensor:
    """``dequant(R)·diag(λ)⁻¹`` (W4A4 layers) or ``dequant(W)`` (W4A16), ``[out, in]`` in ``dtype``.

    Computed in float32 and rounded once to ``dtype``; bit-identical before rounding to
    ``layer.residual_weight() / λ``.
    """
    device = layer.qweight.device
    if device.type == "cuda" and layer.fmt == "int4":
        from .runtime import KERNEL_GROUPS, triton_import_error

        if layer.group_size in KERNEL_GROUPS and triton_import_error() is None:
            from .triton_kernels import dequantize_int4

            return dequantize_int4(layer.qweight, layer.wscales, layer.smooth, layer.group_size, dtype)
    n_out, n_in, group = layer.out_features, layer.in_features, layer.group_size
    table = _nvfp4_table(device) if layer.fmt == "nvfp4" else None
    scales = group_scales(layer)
    smooth = layer.smooth.float() if layer.smooth is not None else None
    out = torch.empty(n_out, n_in, dtype=dtype, device=device)
    rows = n_out if device.type != "cpu" else max(1, _CPU_BLOCK_ELEMENTS // n_in)
    for start in range(0, n_out, rows):
        block = slice(start, start + rows)
        w = _operands(layer.fmt, layer.qweight[block], table)  # float32 [rows, in]
        w = w.view(-1, n_in // group, group).mul_(scales[block, :, None]).view(-1, n_in)
        if smooth is not None:
            w = w.div_(smooth)
        out[block].copy_(w)  # the one rounding to the activation dtype
    return out


def _operands(fmt: str, packed: torch.Tensor, table: torch.Tensor | None) -> torch.Tensor:
    """Float32 operands ``[rows, 2·cols]`` of packed bytes ``[rows, cols]`` (element 2k = low nibble). INT4 by
    arithmetic shifts on the bytes as int8 (sign-extending each nibble; 4x faster than a table gather on a CPU),
    NVFP4 through the 256-entry byte table."""
    if fmt == "int4":
        signed = packed.view(torch.int8)
        low = torch.bitwise_right_shift(torch.bitwise_left_shift(signed, 4), 4)
        high = torch.bitwise_right_shift(signed, 4)
        return torch.stack([low, high], dim=-1).flatten(-2).float()
    return torch.index_select(table, 0, packed.reshape(-1).int()).view(packed.shape[0], -1)


def dequant_product(layer, x2d: torch.Tensor, bias: torch.Tensor | None = None,
                    accumulate: torch.Tensor | None = None) -> torch.Tensor:
    """``x · dequantize_weight(layer)ᵀ``, the 4-bit product with 16-bit activations, in ``x2d``'s dtype, plus
    ``bias`` or, in place, onto ``accumulate`` ``[tokens, out]`` (either way added by the GEMM itself: no extra
    pass over the output)."""
    weight = dequantize_weight(layer, x2d.dtype)
    if accumulate is not None:
        return accumulate.addmm_(x2d, weight.t())
    return F.linear(x2d, weight, None if bias is None else bias.to(x2d.dtype))
