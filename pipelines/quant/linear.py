"""`QuantLinear`: a 4-bit linear layer with a 16-bit low-rank branch that hosts the studio's adapters.

SVDQuant (Li et al. 2024, "SVDQuant: Absorbing Outliers by Low-Rank Components for 4-Bit Diffusion Models",
eq. 5-6) writes a linear layer ``y = x Wᵀ + b`` (torch layout, W is out × in) as

    y = x · L_downᵀ · L_upᵀ  +  dequant( Q(x / λ) · Q(R)ᵀ )  +  b

* ``λ`` (``smooth``, per input channel) migrates activation outliers into the weights (SmoothQuant);
* ``L_up · L_down`` is the top-r SVD of the smoothed weight ``W·diag(λ)``; ``L_down`` is stored with ``λ``
  divided out, so the branch sees the raw, un-smoothed ``x``;
* ``R = W·diag(λ) − L_up (L_down·diag(λ))`` is stored in 4 bits (INT4 per 64 input channels with a float16
  scale, or NVFP4), and the activations ``x / λ`` are quantized at run time per token and group.

The 4-bit product has runtimes (:mod:`.runtime`, ``layer.runtime``): ``reference``, the exact path, runs on any
device and computes the product group by group on integer-valued operands (see
:func:`pipelines.quant.formats.group_matmul`); ``dequant`` (W4A16: dequantized weight, one GEMM, :mod:`.dequant`)
and ``triton`` (W4A4 on INT8 tensor cores, :mod:`.triton_kernels`) are the fast ones; ``auto`` picks. ``mode="w4a16"`` keeps
the activations 16-bit (weight-only, no smoothing, no branch: FLUX's adaLN linears, as Nunchaku does);
``rank=0`` and no smoothing give plain round-to-nearest (RTN), the baseline.

Adapters: ``QuantLinear`` subclasses ``nn.Linear`` (so LoRA name tables, shape checks and ``isinstance``
tests treat it as the linear it replaces) and *hosts* a :class:`~pipelines.composed.AdapterBranch` itself:
the branch concatenates the layer's own ``(L_down, L_up)`` as a fixed segment (gain 1) with every LoRA's
``(A, B)`` (live per-sample gains), so the SVD branch and all LoRAs run as one pair of GEMMs. Detaching the
branch (:meth:`detach_branch`) leaves the layer exactly as loaded. :attr:`weight` is the effective
dequantized weight in float32 (for DoRA norms and weight-space tools); it is computed on access, never stored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import formats
from .runtime import check_runtime, kernel_failed, resolve

MODES = ("w4a4", "w4a16")


class QuantLinear(nn.Linear):
    """A linear layer stored as 4-bit residual + 16-bit low-rank branch (+ smoothing), see the module doc."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, fmt: str = "int4",
                 group_size: int | None = None, rank: int = 32, smooth: bool = True, mode: str = "w4a4",
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None,
                 runtime: str = "reference"):
        nn.Module.__init__(self)
        if fmt not in formats.FORMATS:
            raise ValueError(f"unknown 4-bit format '{fmt}'; use one of {formats.FORMATS}")
        if mode not in MODES:
            raise ValueError(f"unknown mode '{mode}'; use one of {MODES}")
        group = group_size or formats.DEFAULT_GROUP[fmt]
        if fmt == "nvfp4" and group != 16:
            raise ValueError("NVFP4 uses blocks of 16 channels")
        if in_features % group:
            raise ValueError(f"{in_features} input channels do not split into groups of {group}")
        if mode == "w4a16" and (rank or smooth):
            raise ValueError("w4a16 layers have no smoothing and no low-rank branch")
        self.in_features, self.out_features = in_features, out_features
        self.fmt, self.group_size, self.rank, self.mode = fmt, group, rank, mode
        groups = in_features // group
        kw = dict(device=device)
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, **kw))
        scale_bits = torch.int16 if fmt == "int4" else torch.uint8
        self.register_buffer("wscales", torch.zeros(out_features, groups, dtype=scale_bits, **kw))
        self.register_buffer("wscale_global", torch.zeros(1, dtype=torch.int32, **kw) if fmt == "nvfp4" else None)
        self.register_buffer("smooth", torch.ones(in_features, dtype=dtype, **kw) if smooth else None)
        self.register_buffer("lora_down", torch.zeros(rank, in_features, dtype=dtype, **kw) if rank else None)
        self.register_buffer("lora_up", torch.zeros(out_features, rank, dtype=dtype, **kw) if rank else None)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, **kw), requires_grad=False) if bias else None
        self.studio_branch = None
        self.runtime = check_runtime(runtime)  # how the 4-bit product runs (pipelines.quant.runtime); not stored

    # ------------------------------------------------------------------------------------------- config
    def spec(self) -> dict:
        """The constructor arguments (what ``studio_quant.json`` records per layer)."""
        return {"in": self.in_features, "out": self.out_features, "bias": self.bias is not None, "fmt": self.fmt,
                "group": self.group_size, "rank": self.rank, "smooth": self.smooth is not None, "mode": self.mode}

    @classmethod
    def from_spec(cls, spec: dict, dtype: torch.dtype = torch.bfloat16, device=None,
                  runtime: str = "reference") -> "QuantLinear":
        return cls(spec["in"], spec["out"], bias=spec["bias"], fmt=spec["fmt"], group_size=spec["group"],
                   rank=spec["rank"], smooth=spec["smooth"], mode=spec["mode"], dtype=dtype, device=device,
                   runtime=runtime)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self.mode} {self.fmt}/{self.group_size}, rank={self.rank}, smooth={self.smooth is not None}, "
                f"runtime={self.runtime}")

    # ------------------------------------------------------------------------------------------- weights
    def weight_operand(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer-valued residual operand ``[out, in]`` (float32) and its scale per group ``[out, in/group]``."""
        if self.fmt == "int4":
            return formats.unpack_int4(self.qweight).float(), formats.from_bits(self.wscales)
        codes = formats.unpack_nibbles(self.qweight)
        scale = formats.from_bits(self.wscales) * formats.from_bits(self.wscale_global) / 2
        return formats.nvfp4_operand(codes), scale

    def residual_weight(self) -> torch.Tensor:
        """``dequant(Q(R))`` in float32, ``[out, in]`` (smoothed input space)."""
        operand, scale = self.weight_operand()
        return (operand.reshape(self.out_features, -1, self.group_size) * scale[..., None]).reshape(operand.shape)

    def dequantized_weight(self) -> torch.Tensor:
        """The effective weight ``dequant(R)·diag(λ)⁻¹ + L_up·L_down`` in float32 (activation rounding aside)."""
        w = self.residual_weight()
        if self.smooth is not None:
            w = w / self.smooth.float()[None, :]
        if self.rank:
            w = w + self.lora_up.float() @ self.lora_down.float()
        return w

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight in float32, computed on access (never stored): what ``nn.Linear`` users such as
        DoRA's weight norm see. Float32 because rounding it to the model dtype would lose precision."""
        return self.dequantized_weight()

    def fixed_segment(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The layer's own low-rank branch ``(L_down [r, in], L_up [out, r])`` for the adapter branch to host."""
        return (self.lora_down, self.lora_up) if self.rank else None

    # ------------------------------------------------------------------------------------------- forward
    def quantize_input(self, x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run-time activation quantization of ``x / λ`` per token and group: integer operand and scales."""
        xs = x2d.float()
        if self.smooth is not None:
            xs = xs / self.smooth.float()
        if self.fmt == "int4":
            codes, scale = formats.quantize_int4(xs, self.group_size, scale_dtype=None)
            return codes.float(), scale
        token_scale = xs.abs().amax(dim=-1) / (formats.E2M1_MAX * formats.FP8_E4M3_MAX)
        codes, block, token_scale = formats.quantize_nvfp4(xs, self.group_size, token_scale)
        return formats.nvfp4_operand(codes), block * token_scale[:, None] / 2

    def quantized_product(self, x: torch.Tensor) -> torch.Tensor:
        """``dequant(Q(x/λ)·Q(R)ᵀ)`` (w4a4) or ``x·dequant(Q(W))ᵀ`` (w4a16), without bias or branch, computed by
        the layer's runtime (``dequant``: ``(x/λ)·dequant(R)ᵀ``, activations not quantized)."""
        return self._product(x)

    def reference_product(self, x2d: torch.Tensor) -> torch.Tensor:
        """The exact path: float32 ``[tokens, out]`` (integer-exact group products, see the module doc)."""
        if self.mode == "w4a16":
            return F.linear(x2d, self.residual_weight().to(x2d.dtype))
        a, a_scale = self.quantize_input(x2d)
        w, w_scale = self.weight_operand()
        return formats.group_matmul(a, a_scale, w, w_scale, self.group_size)

    def _product(self, x: torch.Tensor, bias: torch.Tensor | None = None,
                 addend: torch.Tensor | None = None) -> torch.Tensor:
        """The 4-bit product plus ``bias`` and ``addend`` (same shape as the output), by the layer's runtime.

        ``addend`` must be a fresh tensor (it may be written in place). ``reference`` rounds the product to ``x``'s
        dtype and then adds, in that order; ``dequant``'s GEMM adds the bias or accumulates onto ``addend + bias``;
        the Triton kernel adds both in float32 in its epilogue and rounds once."""
        x2d = x.reshape(-1, self.in_features)
        runtime = resolve(self.runtime, self, x.device)
        training = torch.is_grad_enabled() and (x.requires_grad or (addend is not None and addend.requires_grad))
        if runtime == "triton" and training and self.runtime == "auto":
            runtime = "dequant"  # the kernel has no backward; dequant is differentiable (e.g. training gates)
        if runtime == "triton":
            try:
                from .triton_kernels import w4a4_linear

                y = w4a4_linear(x2d, self.qweight, self.wscales, self.smooth, self.group_size,
                                bias=None if bias is None else bias.to(x.dtype),
                                addend=None if training else addend)
                if training and addend is not None:  # keep the branch's gradient
                    y = y + addend.reshape(y.shape)
            except torch.OutOfMemoryError:
                raise
            except Exception as e:  # a Triton that cannot compile the kernel here: auto falls back, cleanly
                if self.runtime != "auto":
                    raise
                kernel_failed(e)
                return self._product(x, bias, addend)
            return y.reshape(*x.shape[:-1], self.out_features)
        if runtime == "dequant":
            from .dequant import dequant_product

            if addend is not None:  # a fresh tensor (the branch output): the GEMM accumulates onto it
                y = addend.reshape(x2d.shape[0], self.out_features)
                if bias is not None:
                    y.add_(bias.to(x.dtype))
                return dequant_product(self, x2d, accumulate=y).reshape(*x.shape[:-1], self.out_features)
            y, bias = dequant_product(self, x2d, bias), None  # the GEMM adds the bias
        else:
            y = self.reference_product(x2d)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)  # a fresh tensor: add in place (less memory)
        if bias is not None:
            y.add_(bias.to(x.dtype))
        if addend is not None:
            y.add_(addend)
        return y

    def _own_branch(self, x: torch.Tensor) -> torch.Tensor | None:
        """``x·L_downᵀ·L_upᵀ``, the layer's SVD branch (None without one)."""
        if not self.rank:
            return None
        return F.linear(F.linear(x, self.lora_down.to(x.dtype)), self.lora_up.to(x.dtype))

    def _base_op(self, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        """The layer as loaded (4-bit product + own branch [+ bias]); adapters use it for DoRA's rescaling."""
        return self._product(x, self.bias if with_bias else None, self._own_branch(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.studio_branch is None:
            return self._base_op(x)
        y = self._product(x, self.bias)
        return self.studio_branch(x, y, self)  # adds the fixed segment and every LoRA in one GEMM pair

    # ------------------------------------------------------------------------------------------- adapters
    def attach_branch(self, branch: nn.Module) -> None:
        self.studio_branch = branch

    def detach_branch(self) -> None:
        """Drop the adapter branch: the layer is again exactly the loaded quantized layer."""
        self._modules.pop("studio_branch", None)
        self.studio_branch = None


def quantized_layers(module: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in module.named_modules() if isinstance(m, QuantLinear)}
