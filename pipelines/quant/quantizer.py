"""SVDQuant for one linear layer, and for a whole denoiser.

Per layer ``W`` (out × in, torch layout) with calibration statistics of its input ``X`` (Li et al. 2024,
"SVDQuant", Sec. 4):

1. **smoothing** ``λ_j = max|X_j|^α / max|W_{:,j}|^(1−α)`` (SmoothQuant, Xiao et al. 2023, eq. 4). α is chosen
   per layer from a small grid by the layer's output error on the calibration activations (the whole
   quantized layer is evaluated: smoothing, branch, 4-bit residual and 4-bit activations); "no smoothing"
   (λ = 1) is always a candidate, and α = 0.5 (SmoothQuant's default) is used when the search is off;
2. **low-rank branch** ``L_up L_down`` = top-r SVD of ``Ŵ = W·diag(λ)`` (singular values split evenly between
   the factors), optionally refined: re-do the SVD of ``Ŵ − dequant(Q(R))`` a few times and keep the
   iterate with the smallest weight error;
3. **residual** ``R = Ŵ − L_up L_down`` in INT4 (groups of 64, float16 scales) or NVFP4.

The branch and λ are rounded to the 16-bit storage dtype *before* the residual is formed, so the residual
absorbs their rounding and the stored layer is exactly what was evaluated. ``method="rtn"`` is the baseline:
plain round-to-nearest 4-bit weights and activations, no smoothing, no branch.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from . import formats
from .calibrate import LayerStats
from .linear import QuantLinear
from .targets import Target, plan_targets

DEFAULT_ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))
FALLBACK_ALPHA = 0.5
METHODS = ("svdquant", "rtn")
_LAMBDA_RANGE = (2.0 ** -14, 2.0 ** 14)
_SMALL_LAYER = 1 << 20  # weights


@dataclass
class QuantConfig:
    """How to quantize: format, group size, branch rank, α search, SVD refinement, storage dtype, method."""

    fmt: str = "int4"
    rank: int = 32
    group_size: int | None = None
    alphas: tuple[float, ...] | None = DEFAULT_ALPHAS  # None: fixed ``alpha``
    alpha: float = FALLBACK_ALPHA
    svd_iters: int = 0
    storage_dtype: torch.dtype = torch.bfloat16
    method: str = "svdquant"

    def __post_init__(self):
        if self.fmt not in formats.FORMATS:
            raise ValueError(f"unknown 4-bit format '{self.fmt}'; use one of {', '.join(formats.FORMATS)}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method '{self.method}'; use one of {', '.join(METHODS)}")
        if self.group_size is None:
            self.group_size = formats.DEFAULT_GROUP[self.fmt]
        if self.fmt == "nvfp4" and self.group_size != 16:
            raise ValueError("NVFP4 uses blocks of 16 channels")
        if self.group_size < 2 or self.group_size % 2:
            raise ValueError(f"group size must be an even number >= 2, got {self.group_size}")
        if self.rank < 0 or self.svd_iters < 0:
            raise ValueError("rank and svd_iters must be >= 0")

    def to_json(self) -> dict:
        return {"format": self.fmt, "rank": self.rank, "group_size": self.group_size,
                "alphas": list(self.alphas) if self.alphas is not None else None, "alpha": self.alpha,
                "svd_iters": self.svd_iters, "storage_dtype": str(self.storage_dtype).removeprefix("torch."),
                "method": self.method}


@dataclass
class LayerReport:
    """What happened to one layer: mode, rank, chosen α (None: no smoothing) and relative output errors."""

    path: str
    mode: str
    rank: int
    alpha: float | None
    error: float | None  # ||y_q − y|| / ||y|| on the calibration sample (None without one)
    rtn_error: float | None = None  # the same for round-to-nearest (no smoothing, no branch)
    calibrated: bool = True

    def to_json(self) -> dict:
        return {"mode": self.mode, "rank": self.rank, "alpha": self.alpha, "error": self.error,
                "rtn_error": self.rtn_error, "calibrated": self.calibrated}


@dataclass
class QuantResult:
    config: QuantConfig
    layers: dict[str, LayerReport] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    runtime: str = ""  # which runtime renders with the result will run here (convert fills it in)


# ------------------------------------------------------------------------------------------------ one layer
def smoothing_factors(x_amax: torch.Tensor, weight: torch.Tensor, alpha: float,
                      dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``λ_j = max|X_j|^α / max|W_{:,j}|^(1−α)``, normalised to geometric mean 1, rounded to ``dtype``."""
    eps = 1e-5
    xa = x_amax.double().clamp(min=eps)
    wa = weight.double().abs().amax(dim=0).clamp(min=eps)
    lam = xa.pow(alpha) / wa.pow(1 - alpha)
    lam = lam / lam.log().mean().exp()  # global scale is irrelevant to the quantizers; keep λ near 1
    return lam.clamp(*_LAMBDA_RANGE).to(dtype)


@contextmanager
def _small_work_threads(device: torch.device, elements: int):
    """One CPU thread for small layers: their many small ops (and LAPACK's eigh) run far slower with
    intra-op threads on a busy machine (measured on 2 shared cores: tiny SDXL 63 s threaded vs 4 s)."""
    if device.type != "cpu" or elements > _SMALL_LAYER:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def top_r(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up [out, r], down [r, in])`` with ``up @ down`` the best rank-r approximation of ``m`` (float64).

    Computed from the symmetric eigendecomposition of the smaller Gram matrix (``m mᵀ`` or ``mᵀ m``) in
    float64: for the leading singular values (far above ``sqrt(eps64)·σ_max ≈ 1e-8·σ_max``) this equals the
    SVD to rounding, and it is many times faster than a full SVD on a CPU. The singular values are split
    evenly, ``up = U_r Σ_r^½``, ``down = Σ_r^½ V_rᵀ``.
    """
    m = m.double()
    wide = m.shape[0] <= m.shape[1]
    gram = m @ m.T if wide else m.T @ m
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    vecs = evecs[:, -rank:].flip(-1)
    sigma = evals[-rank:].flip(-1).clamp(min=0).sqrt()
    root = sigma.sqrt()
    safe = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
    if wide:  # vecs = U_r; V_rᵀ = Σ⁻¹ U_rᵀ m
        other = (vecs.T @ m) / safe[:, None]
        return vecs * root, root[:, None] * other
    other = (m @ vecs) / safe  # vecs = V_r; U_r = m V_r Σ⁻¹
    return other * root, root[:, None] * vecs.T


def _quantize_residual(layer: QuantLinear, residual: torch.Tensor) -> None:
    """Quantize ``residual`` (out × in, smoothed space) into ``layer``'s 4-bit buffers."""
    if layer.fmt == "int4":
        codes, scale = formats.quantize_int4(residual, layer.group_size, scale_dtype=torch.float16)
        layer.qweight.copy_(formats.pack_int4(codes))
        layer.wscales.copy_(formats.to_bits(scale, torch.float16))
    else:
        codes, block, global_scale = formats.quantize_nvfp4(residual, layer.group_size)
        layer.qweight.copy_(formats.pack_int4(codes))
        layer.wscales.copy_(formats.to_bits(block, torch.float8_e4m3fn))
        layer.wscale_global.copy_(formats.to_bits(global_scale.reshape(1), torch.float32))


def build_layer(weight: torch.Tensor, bias: torch.Tensor | None, *, fmt: str, group_size: int, rank: int,
                smooth: torch.Tensor | None, mode: str = "w4a4", svd_iters: int = 0,
                storage_dtype: torch.dtype = torch.bfloat16) -> QuantLinear:
    """A :class:`QuantLinear` for ``weight`` with smoothing factors ``smooth`` (None: none) and branch rank."""
    out_f, in_f = weight.shape
    layer = QuantLinear(in_f, out_f, bias=bias is not None, fmt=fmt, group_size=group_size, rank=rank,
                        smooth=smooth is not None, mode=mode, dtype=storage_dtype, device=weight.device)
    w = weight.double()
    lam = smooth.double() if smooth is not None else None
    w_hat = w * lam[None, :] if lam is not None else w
    with torch.no_grad():
        if lam is not None:
            layer.smooth.copy_(smooth)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        if not rank:
            _quantize_residual(layer, w_hat)
            return layer
        target, best = w_hat, None
        for _ in range(svd_iters + 1):
            up, down_hat = top_r(target, rank)
            up_s = up.to(storage_dtype)
            down_s = (down_hat / lam[None, :] if lam is not None else down_hat).to(storage_dtype)
            branch = up_s.double() @ (down_s.double() * (lam[None, :] if lam is not None else 1.0))
            layer.lora_up.copy_(up_s)
            layer.lora_down.copy_(down_s)
            _quantize_residual(layer, w_hat - branch)
            dequant = layer.residual_weight().double()
            err = (w_hat - branch - dequant).norm().item()
            if best is None or err < best[0]:
                best = (err, {k: v.clone() for k, v in layer.state_dict().items()})
            target = w_hat - dequant  # SVDQuant's refinement: the branch absorbs what 4 bits miss
        layer.load_state_dict(best[1])
    return layer


def relative_error(layer: nn.Module, weight: torch.Tensor, sample: torch.Tensor) -> float:
    """``||layer(X) − X Wᵀ|| / ||X Wᵀ||`` on ``sample`` (bias excluded), in float32."""
    with torch.no_grad():
        x = sample.to(weight.device, torch.float32)
        ref = x.double() @ weight.double().T
        got = layer._base_op(x, with_bias=False).double()
        return ((got - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def quantize_linear(linear: nn.Linear, target: Target, stats: LayerStats | None,
                    config: QuantConfig) -> tuple[QuantLinear, LayerReport]:
    """SVDQuant (or RTN) of one layer, with the per-layer α search when calibration samples exist."""
    weight = linear.weight.detach()
    bias = linear.bias.detach() if linear.bias is not None else None
    common = dict(fmt=config.fmt, group_size=config.group_size, storage_dtype=config.storage_dtype)
    sample = stats.sample if stats is not None else None

    def rtn():
        return build_layer(weight, bias, rank=0, smooth=None, mode=target.mode, **common)

    if target.mode == "w4a16" or config.method == "rtn":
        layer = rtn()
        err = relative_error(layer, weight, sample) if sample is not None and sample.numel() else None
        return layer, LayerReport(target.path, target.mode, 0, None, err, err, calibrated=stats is not None)

    def candidate(alpha):
        smooth = None if alpha is None else smoothing_factors(stats.amax, weight, alpha, config.storage_dtype)
        return build_layer(weight, bias, rank=target.rank, smooth=smooth, svd_iters=config.svd_iters, **common)

    if stats is None:  # never called during calibration: no activation statistics to smooth with
        layer = candidate(None)
        return layer, LayerReport(target.path, "w4a4", target.rank, None, None, None, calibrated=False)
    has_sample = sample is not None and sample.numel() > 0
    alphas = config.alphas if (config.alphas and has_sample) else (config.alpha,)
    options = [None, *alphas] if len(alphas) > 1 else list(alphas)
    best = None
    for alpha in options:
        layer = candidate(alpha)
        err = relative_error(layer, weight, sample) if has_sample else math.nan
        if best is None or err < best[1]:
            best = (layer, err, alpha)
    layer, err, alpha = best
    rtn_err = relative_error(rtn(), weight, sample) if has_sample else None
    return layer, LayerReport(target.path, "w4a4", target.rank, alpha, err if has_sample else None, rtn_err)


# -------------------------------------------------------------------------------------------- whole model
def quantize_denoiser(denoiser: nn.Module, family: str, config: QuantConfig,
                      stats: dict[str, LayerStats] | None = None,
                      on_layer: Callable[[int, int, str], None] | None = None) -> QuantResult:
    """Replace the target linears of ``denoiser`` in place by :class:`QuantLinear` (see :mod:`.targets`)."""
    targets, skipped = plan_targets(denoiser, family, group_size=config.group_size, rank=config.rank,
                                    method=config.method)
    result = QuantResult(config=config, skipped=skipped)
    stats = stats or {}
    for i, target in enumerate(targets):
        parent_path, _, child = target.path.rpartition(".")
        parent = denoiser.get_submodule(parent_path) if parent_path else denoiser
        linear = getattr(parent, child)
        with _small_work_threads(linear.weight.device, linear.weight.numel()):
            layer, report = quantize_linear(linear, target, stats.get(target.path), config)
        setattr(parent, child, layer.to(linear.weight.device))
        result.layers[target.path] = report
        if on_layer is not None:
            on_layer(i + 1, len(targets), target.path)
    return result
