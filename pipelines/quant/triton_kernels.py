"""Triton kernels for INT4 :class:`~pipelines.quant.linear.QuantLinear` layers: W4A4 on INT8 tensor cores.

SVDQuant's INT W4A4 (Li et al. 2024, Sec. 5) multiplies 4-bit activations by 4-bit weights, each quantized per
group of ``g`` = 64 input channels, and scales every group's product:

    y[t, o] = Σ_groups  s_x[t, grp] · s_w[o, grp] · Σ_{k ∈ grp} q_x[t, k] · q_w[o, k]                  (1)

The inner sum is an integer of magnitude ≤ 64·8·8 = 4096, so INT8 tensor cores with INT32 accumulation compute
it exactly on every GPU from Ampere (sm_80) on — Hopper (sm_90) included, which has INT8 but no INT4 tensor cores.
Weights stay packed two per byte in memory and are unpacked to INT8 in registers. Three kernels:

* :func:`quantize_activations` — ``x / λ`` per token and group to INT4 codes and float32 scales, with the
  reference path's rounding exactly (:func:`pipelines.quant.formats.quantize_int4` with float32 scales):
  correctly rounded divisions (``div_rn``) and round-half-to-even;
* :func:`w4a4_linear` — eq. (1): per group one ``tl.dot`` of INT8 operands into INT32, then
  ``(int32 → fp32) · s_x · s_w`` accumulated in float32; the epilogue adds the bias and an optional ``addend``
  (the low-rank branch's output, computed by torch) and writes the activation dtype;
* :func:`dequantize_int4` — the ``dequant`` runtime's one-pass weight dequantization on a GPU.

Every integer product is exact, so the result equals the reference path up to float32 rounding of the scaled
sums (the order of the float32 additions, and fused multiply-adds on a GPU). The kernels run on a CUDA GPU, or
on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``, set before ``triton`` is imported), which is how
the tests check them without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .runtime import KERNEL_GROUPS, interpreted

INTERPRETED = interpreted()


@triton.jit
def _round_half_even(v):
    """``torch.round`` (ties to even) for float32 ``|v| < 2^22``, from floor: exact on every backend."""
    low = tl.floor(v)
    frac = v - low  # exact: v and low share the exponent range
    odd = (low - 2.0 * tl.floor(low * 0.5)) != 0.0
    up = (frac > 0.5) | ((frac == 0.5) & odd)
    return low + up.to(tl.float32)


@triton.jit
def _quantize_int4_act_kernel(x_ptr, smooth_ptr, q_ptr, s_ptr, M, K, stride_xm,
                              HAS_SMOOTH: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr):
    """One program: ``BLOCK_M`` tokens × one group. Codes ``q [M, K]`` int8, scales ``s [K/GROUP, M]`` float32."""
    pid_m = tl.program_id(0)
    grp = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = grp * GROUP + tl.arange(0, GROUP)
    row_ok = rows < M
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    if HAS_SMOOTH:
        lam = tl.load(smooth_ptr + cols).to(tl.float32)
        x = tl.math.div_rn(x, lam[None, :])
    scale = tl.math.div_rn(tl.max(tl.abs(x), axis=1), 7.0)
    scale = tl.where(scale > 0.0, scale, 1.0)  # an all-zero group quantizes to zeros
    codes = _round_half_even(tl.math.div_rn(x, scale[:, None]))
    codes = tl.minimum(tl.maximum(codes, -8.0), 7.0)
    tl.store(q_ptr + rows[:, None] * K + cols[None, :], codes.to(tl.int8), mask=row_ok[:, None])
    tl.store(s_ptr + grp * M + rows, scale, mask=row_ok)


@triton.jit
def _unpack_int4(packed, BLOCK_N: tl.constexpr, GROUP: tl.constexpr):
    """``[BLOCK_N, GROUP/2]`` uint8 (element 2k in the low nibble) -> ``[BLOCK_N, GROUP]`` int8 in ``[-8, 7]``."""
    signed = packed.to(tl.int8, bitcast=True)
    low = (signed << 4) >> 4  # arithmetic shifts sign-extend the nibble
    high = signed >> 4
    return tl.reshape(tl.join(low, high), (BLOCK_N, GROUP))


@triton.jit
def _w4a4_int4_gemm_kernel(qa_ptr, sa_ptr, qw_ptr, sw_ptr, bias_ptr, add_ptr, out_ptr, M, N, K,
                           stride_add, stride_out,
                           HAS_BIAS: tl.constexpr, HAS_ADD: tl.constexpr, GROUP: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SWIZZLE: tl.constexpr):
    """Eq. (1) for one ``BLOCK_M × BLOCK_N`` tile; ``sw_ptr`` holds the weights' float16 scale *bits* (int16)."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_band = SWIZZLE * tiles_n  # tiles of SWIZZLE row-bands walked column by column: weight tiles stay in L2
    band = pid // per_band
    first_m = band * SWIZZLE
    band_rows = tl.minimum(tiles_m - first_m, SWIZZLE)
    pid_m = first_m + (pid % per_band) % band_rows
    pid_n = (pid % per_band) // band_rows

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, GROUP)
    rh = tl.arange(0, GROUP // 2)
    m_ok = rm < M
    n_ok = rn < N
    groups = K // GROUP
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for grp in range(0, groups):
        a = tl.load(qa_ptr + rm[:, None] * K + (grp * GROUP + rk)[None, :], mask=m_ok[:, None], other=0)
        packed = tl.load(qw_ptr + rn[:, None] * (K // 2) + (grp * (GROUP // 2) + rh)[None, :],
                         mask=n_ok[:, None], other=0)
        w = _unpack_int4(packed, BLOCK_N, GROUP)
        exact = tl.dot(a, tl.trans(w), out_dtype=tl.int32)  # integers ≤ 4096 in magnitude
        s_a = tl.load(sa_ptr + grp * M + rm, mask=m_ok, other=0.0)
        s_w = tl.load(sw_ptr + rn * groups + grp, mask=n_ok, other=0).to(tl.float16, bitcast=True).to(tl.float32)
        acc += exact.to(tl.float32) * s_a[:, None] * s_w[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_ADD:
        acc += tl.load(add_ptr + rm[:, None] * stride_add + rn[None, :], mask=m_ok[:, None] & n_ok[None, :],
                       other=0.0).to(tl.float32)
    tl.store(out_ptr + rm[:, None] * stride_out + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _dequant_int4_kernel(qw_ptr, sw_ptr, smooth_ptr, out_ptr, N, K, HAS_SMOOTH: tl.constexpr,
                         GROUP: tl.constexpr, BLOCK_N: tl.constexpr):
    """``out[n, k] = code · s_w[n, k/GROUP] / λ_k`` in float32, rounded once to the output dtype."""
    pid_n = tl.program_id(0)
    grp = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rh = tl.arange(0, GROUP // 2)
    packed = tl.load(qw_ptr + rn[:, None] * (K // 2) + (grp * (GROUP // 2) + rh)[None, :], mask=n_ok[:, None], other=0)
    w = _unpack_int4(packed, BLOCK_N, GROUP).to(tl.float32)
    s_w = tl.load(sw_ptr + rn * (K // GROUP) + grp, mask=n_ok, other=0).to(tl.float16, bitcast=True).to(tl.float32)
    w = w * s_w[:, None]
    cols = grp * GROUP + tl.arange(0, GROUP)
    if HAS_SMOOTH:
        w = tl.math.div_rn(w, tl.load(smooth_ptr + cols).to(tl.float32)[None, :])
    tl.store(out_ptr + rn[:, None] * K + cols[None, :], w.to(out_ptr.dtype.element_ty), mask=n_ok[:, None])


# ------------------------------------------------------------------------------------------------ launchers
def _check_group(group: int) -> None:
    if group not in KERNEL_GROUPS:
        raise ValueError(f"the Triton INT4 kernels take groups of {KERNEL_GROUPS}, not {group}")


def quantize_activations(x2d: torch.Tensor, smooth: torch.Tensor | None, group: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """INT4 codes ``[M, K]`` (int8) and float32 scales ``[K/group, M]`` of ``x2d / λ``, per token and group."""
    _check_group(group)
    x2d = x2d.contiguous()
    M, K = x2d.shape
    codes = torch.empty(M, K, dtype=torch.int8, device=x2d.device)
    scales = torch.empty(K // group, M, dtype=torch.float32, device=x2d.device)
    block_m = 64
    grid = (triton.cdiv(M, block_m), K // group)
    _quantize_int4_act_kernel[grid](x2d, smooth if smooth is not None else x2d, codes, scales, M, K, x2d.stride(0),
                                    HAS_SMOOTH=smooth is not None, GROUP=group, BLOCK_M=block_m)
    return codes, scales


def _tiles(M: int) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)``: large tiles for image-token counts, smaller for text."""
    if INTERPRETED:  # numpy runs each program: fewer, larger tiles are faster
        return 64, 64, 4, 1
    if M >= 2048:
        return 128, 128, 8, 3
    return 64, 128, 4, 3


def w4a4_linear(x2d: torch.Tensor, qweight: torch.Tensor, wscale_bits: torch.Tensor, smooth: torch.Tensor | None,
                group: int, bias: torch.Tensor | None = None, addend: torch.Tensor | None = None) -> torch.Tensor:
    """``dequant(Q(x/λ)·Q(R)ᵀ) + bias + addend`` in ``x2d``'s dtype: INT4 weights ``qweight [N, K/2]`` (packed,
    low nibble first), float16 group scales as int16 bits ``[N, K/group]``, activations quantized here."""
    _check_group(group)
    M, K = x2d.shape
    N = qweight.shape[0]
    qa, sa = quantize_activations(x2d, smooth, group)
    out = torch.empty(M, N, dtype=x2d.dtype, device=x2d.device)
    if addend is not None:
        addend = addend.reshape(M, N)
        if addend.stride(1) != 1:
            addend = addend.contiguous()
    bias = bias.contiguous() if bias is not None else None
    block_m, block_n, warps, stages = _tiles(M)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    extra = {} if INTERPRETED else {"num_warps": warps, "num_stages": stages}
    _w4a4_int4_gemm_kernel[grid](qa, sa, qweight.contiguous(), wscale_bits.contiguous(),
                                 bias if bias is not None else out, addend if addend is not None else out, out,
                                 M, N, K, addend.stride(0) if addend is not None else 0, out.stride(0),
                                 HAS_BIAS=bias is not None, HAS_ADD=addend is not None, GROUP=group,
                                 BLOCK_M=block_m, BLOCK_N=block_n, SWIZZLE=8, **extra)
    return out


def dequantize_int4(qweight: torch.Tensor, wscale_bits: torch.Tensor, smooth: torch.Tensor | None, group: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """``code · scale / λ`` for every weight, ``[N, K]`` in ``dtype`` (one pass over the packed weights)."""
    _check_group(group)
    N = qweight.shape[0]
    K = qweight.shape[1] * 2
    out = torch.empty(N, K, dtype=dtype, device=qweight.device)
    block_n = 64
    grid = (triton.cdiv(N, block_n), K // group)
    _dequant_int4_kernel[grid](qweight.contiguous(), wscale_bits.contiguous(),
                               smooth if smooth is not None else out, out, N, K,
                               HAS_SMOOTH=smooth is not None, GROUP=group, BLOCK_N=block_n)
    return out
