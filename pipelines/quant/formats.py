"""4-bit number formats: signed INT4 with 16-bit group scales, and NVFP4 (E2M1 values, FP8 E4M3 block scales).

Both formats quantize the last dimension of a tensor in groups (blocks) and return *integer-valued* operands
plus one float scale per group, so that a product of two quantized tensors is computed group by group on
integers and scaled afterwards (see :func:`group_matmul`):

* **INT4** (SVDQuant's INT W4A4, Li et al. 2024, Sec. 5): ``q = clamp(round(x / s), -8, 7)`` with
  ``s = max|x_group| / 7``; weights keep ``s`` as float16 (one per group of 64 input channels and output
  channel), activations get ``s`` at run time per token and group.
* **NVFP4**: values of the 4-bit float E2M1 ``{0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6}``, one FP8 E4M3 scale per
  block of 16 and one float32 scale per tensor (weights) or per token (activations):
  ``x ≈ e2m1 · fp8(s_block) · s_global`` with ``s_global = max|x| / (6 · 448)``. The operand returned is
  ``2 · e2m1`` (an integer in ``[-12, 12]``); the factor 1/2 goes into the scale.

Storage: two 4-bit codes per byte (:func:`pack_int4` / :func:`unpack_int4`, low nibble first). INT4 codes are
two's complement; NVFP4 codes are sign bit + 3-bit magnitude index (the E2M1 bit pattern). Scales are stored
as their raw bits (``int16`` for float16, ``uint8`` for FP8, ``int32`` for float32) so that moving a model
with ``.to(dtype)`` never re-rounds them.
"""

from __future__ import annotations

import torch

INT4_MAX = 7
INT4_MIN = -8
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
FP8_E4M3_MAX = 448.0
FORMATS = ("int4", "nvfp4")
DEFAULT_GROUP = {"int4": 64, "nvfp4": 16}

_E2M1 = torch.tensor(E2M1_VALUES)
_E2M1_MIDPOINTS = (_E2M1[1:] + _E2M1[:-1]) / 2
_NVFP4_OPERAND = torch.cat([2 * _E2M1, -2 * _E2M1])  # code (sign bit 3, magnitude index bits 0-2) -> 2·e2m1


# ------------------------------------------------------------------------------------------------- packing
def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes (int8 in ``[-8, 15]``, last dim even) two per byte: element 2k low nibble, 2k+1 high."""
    if codes.shape[-1] % 2:
        raise ValueError(f"the last dimension must be even to pack 4-bit codes, got {codes.shape[-1]}")
    nibbles = (codes.to(torch.int16) & 0xF).to(torch.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The 4-bit codes of :func:`pack_int4` as unsigned values ``0..15`` (uint8), last dim doubled."""
    low = packed & 0xF
    high = packed >> 4
    return torch.stack([low, high], dim=-1).flatten(-2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Signed INT4 codes (int8 in ``[-8, 7]``) from :func:`pack_int4` bytes."""
    return (unpack_nibbles(packed) ^ 8).to(torch.int8) - 8  # 4-bit two's complement sign extension


# ---------------------------------------------------------------------------------------------- scale bits
def to_bits(scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round ``scales`` to ``dtype`` (float16, float8_e4m3fn or float32) and return its raw bits."""
    bits = {torch.float16: torch.int16, torch.float8_e4m3fn: torch.uint8, torch.float32: torch.int32}[dtype]
    return scales.to(dtype).contiguous().view(bits)


def from_bits(bits: torch.Tensor) -> torch.Tensor:
    """Float32 values of raw scale bits written by :func:`to_bits`."""
    dtype = {torch.int16: torch.float16, torch.uint8: torch.float8_e4m3fn, torch.int32: torch.float32}[bits.dtype]
    return bits.view(dtype).float()


# ---------------------------------------------------------------------------------------------- quantizers
def _grouped(x: torch.Tensor, group: int) -> torch.Tensor:
    if x.shape[-1] % group:
        raise ValueError(f"{x.shape[-1]} channels do not split into groups of {group}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // group, group)


def quantize_int4(x: torch.Tensor, group: int, scale_dtype: torch.dtype | None = torch.float16):
    """Symmetric INT4 per group of ``group`` along the last dim: ``(codes int8 [..., K], scales f32 [..., K/group])``.

    ``scale_dtype`` rounds the scales before the codes are computed (float16 for stored weights, so the codes
    match the stored scale; ``None`` keeps float32, as for activations quantized at run time).
    """
    xg = _grouped(x.float(), group)
    scale = xg.abs().amax(dim=-1) / INT4_MAX
    if scale_dtype is not None:
        limit = torch.finfo(scale_dtype).max
        scale = scale.clamp(max=limit).to(scale_dtype).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group quantizes to zeros
    codes = torch.round(xg / scale[..., None]).clamp(INT4_MIN, INT4_MAX).to(torch.int8)
    return codes.reshape(x.shape), scale


def round_e2m1(magnitude: torch.Tensor) -> torch.Tensor:
    """Index (0..7) of the nearest E2M1 magnitude for non-negative inputs (values above 6 saturate)."""
    return torch.bucketize(magnitude, _E2M1_MIDPOINTS.to(magnitude.device))


def quantize_nvfp4(x: torch.Tensor, group: int = 16, global_scale: torch.Tensor | None = None):
    """NVFP4 along the last dim: ``(codes uint8 [..., K] sign|index, block scales f32, global scale f32)``.

    ``global_scale`` (float32, broadcastable to ``x.shape[:-1]``) defaults to ``max|x| / (6·448)`` over the
    whole tensor; activations pass one per token. Block scales are FP8 E4M3 values (returned as float32) of
    ``max|x_block| / (6 · global)``; the dequantized value is ``e2m1 · block · global``.
    """
    xg = _grouped(x.float(), group)
    if global_scale is None:
        global_scale = xg.abs().amax() / (E2M1_MAX * FP8_E4M3_MAX)
    global_scale = torch.as_tensor(global_scale, dtype=torch.float32, device=x.device)
    global_scale = torch.where(global_scale > 0, global_scale, torch.ones_like(global_scale))
    g = global_scale.reshape(*global_scale.shape, *([1] * (xg.dim() - 1 - global_scale.dim())))
    block = (xg.abs().amax(dim=-1) / (E2M1_MAX * g)).clamp(max=FP8_E4M3_MAX)
    block = block.to(torch.float8_e4m3fn).float()
    step = block * g
    safe = torch.where(step > 0, step, torch.ones_like(step))
    index = round_e2m1((xg.abs() / safe[..., None]).clamp(max=E2M1_MAX))
    index = torch.where((step > 0)[..., None], index, torch.zeros_like(index))
    codes = index.to(torch.uint8) | ((xg < 0).to(torch.uint8) << 3)
    codes = torch.where(index == 0, torch.zeros_like(codes), codes)  # no negative zero
    return codes.reshape(x.shape), block, global_scale


def nvfp4_operand(codes: torch.Tensor) -> torch.Tensor:
    """``2 · e2m1`` for NVFP4 codes (uint8 sign|index): integers in ``[-12, 12]`` as float32."""
    return _NVFP4_OPERAND.to(codes.device)[codes.long()]


# ------------------------------------------------------------------------------------------------- products
def group_matmul(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                 group: int, chunk_elements: int | None = None) -> torch.Tensor:
    """``Σ_g a_scale[t,g] · b_scale[o,g] · (a_g · b_gᵀ)[t,o]`` with every group product integer-exact.

    ``a`` [T, K] and ``b`` [O, K] hold integer values (INT4 codes, or doubled E2M1 values) as float32;
    ``a_scale`` [T, K/group], ``b_scale`` [O, K/group]. Why the group products are exact in float32: INT4
    operands satisfy |a|, |b| ≤ 8, so each product is an integer ≤ 64 and a sum over 64 channels is an
    integer of magnitude ≤ 4096; doubled E2M1 operands satisfy |a|, |b| ≤ 12, so a sum over 16 is ≤ 2304.
    Every partial sum is an integer below 2^24, which float32 represents exactly, so the GEMM is exact in
    any summation order (blocked, FMA, TF32 inputs: integers ≤ 12 are exact in TF32's 10-bit mantissa).
    The scales are applied afterwards in float32. Groups are processed in chunks of at most
    ``chunk_elements`` partial results to bound memory (default: 4 M on a CPU, cache-sized; 64 M elsewhere).
    """
    T, K = a.shape
    O = b.shape[0]
    G = K // group
    ag = a.reshape(T, G, group).transpose(0, 1)  # [G, T, g]
    bg = b.reshape(O, G, group).permute(1, 2, 0)  # [G, g, O]
    out = torch.zeros(T, O, dtype=torch.float32, device=a.device)
    if chunk_elements is None:
        chunk_elements = 1 << 22 if a.device.type == "cpu" else 1 << 26
    step = max(1, chunk_elements // max(T * O, 1))
    for start in range(0, G, step):
        sl = slice(start, start + step)
        products = torch.bmm(ag[sl], bg[sl])  # [g', T, O], exact integers
        products *= a_scale[:, sl].transpose(0, 1)[:, :, None]
        products *= b_scale[:, sl].transpose(0, 1)[:, None, :]
        out += products.sum(0)
    return out
