"""Creating QR-LoRA adapters (Yang et al., ICCV 2025) for a loaded pipeline, in the format of :mod:`.kinds.qr`.

>>> bases = qr_bases(pipe, FLUX, rank=64)                     # {layer: (Q, R)} from the base weights
>>> delta_r = {k: torch.zeros_like(r) for k, (q, r) in bases.items()}   # what a trainer optimises
>>> save_qr_lora("style.safetensors", bases, delta_r, variant="triu", base_model="FLUX.1-dev")
>>> save_qr_bases("qr-bases.safetensors", bases)               # or: Q and R once for a set of adapters,
>>> save_qr_lora("style.safetensors", bases, delta_r, bases_file="qr-bases.safetensors")   # each holding ΔR

A trainer keeps Q and R frozen and learns ΔR for the layer ``W x + s·Q ΔR x`` (equal to the paper's
``W_res x + s·Q (R + ΔR) x``); the "triu" variant multiplies ΔR by :func:`triu_mask` in the forward pass.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from ..atomic_files import save_safetensors
from ..families import Family
from .kinds import qr

# The released code's FLUX targets (matched as module-path suffixes, so single blocks' attn.to_q/k/v count too).
FLUX_TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                "ff_context.net.2")
# SDXL (a TODO of the released code): the attention projections, as diffusers' DreamBooth LoRA scripts target.
SDXL_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def default_targets(family: Family) -> tuple[str, ...]:
    return FLUX_TARGETS if family.name == "flux" else SDXL_TARGETS


def qr_bases(
    pipe,
    family: Family,
    rank: int,
    *,
    targets: Sequence[str] | None = None,
    alpha: float | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{"<denoiser>.<module path>": (Q, R)}`` for every targeted linear layer of the denoiser.

    ``targets`` are module-path suffixes (default: :func:`default_targets`); Q (out x r) and R (r x in) come
    from the layer's own weight (top-``rank`` SVD, then QR, s·Q R = W_r with s = alpha / rank), in float32 on
    the CPU.
    """
    targets = tuple(targets or default_targets(family))
    denoiser = getattr(pipe, family.denoiser)
    bases = {}
    for path, module in denoiser.named_modules():
        if not isinstance(module, nn.Linear) or not any(path == t or path.endswith("." + t) for t in targets):
            continue
        q, r = qr.basis(module.weight.detach().cpu(), rank, alpha)
        bases[f"{family.denoiser}.{path}"] = (q, r)
    if not bases:
        raise ValueError(f"no linear layer of the {family.name} denoiser matches the targets {list(targets)}")
    return bases


def triu_mask(rank: int, in_features: int) -> torch.Tensor:
    """The released "triu" variant's mask: ΔR is kept upper-triangular (r x in)."""
    return torch.triu(torch.ones(rank, in_features))


def qr_lora_tensors(
    bases: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    delta_r: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    with_bases: bool = True,
) -> dict[str, torch.Tensor]:
    """The file's tensors: ``<layer>.lora.q.weight``, ``.lora.base_r.weight`` (unless ``with_bases`` is
    false), ``.lora.delta_r.weight`` (ΔR = 0 where ``delta_r`` has no entry), stored as ``dtype``."""
    delta_r = dict(delta_r or {})
    unknown = sorted(set(delta_r) - set(bases))
    if unknown:
        raise ValueError(f"ΔR given for layers without a basis: {unknown[:3]}")
    out = {}
    for key, (q, r) in bases.items():
        d = delta_r.get(key)
        d = torch.zeros_like(r) if d is None else d
        if d.shape != r.shape:
            raise ValueError(f"{key}: ΔR has shape {tuple(d.shape)}, R has {tuple(r.shape)}")
        if with_bases:
            out |= _basis_tensors(key, q, r, dtype)
        out[f"{key}.{qr.DELTA_SUFFIX}"] = d.detach().to(dtype).contiguous().cpu()
    return out


def save_qr_lora(
    path: str | Path,
    bases: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    delta_r: Mapping[str, torch.Tensor] | None = None,
    *,
    alpha: float | None = None,
    variant: str = "full",
    base_model: str = "",
    extra_tensors: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
    bases_file: str | None = None,
) -> Path:
    """Write a QR-LoRA ``.safetensors`` file (format in :mod:`.kinds.qr`); ``extra_tensors`` (e.g. a PEFT
    text-encoder LoRA with ``text_encoder.`` keys) are stored alongside. ``dtype`` (e.g. float16 to halve the
    file) applies to Q, R and ΔR; the load-time base check tolerates half-precision copies.

    With ``bases_file`` (a file name) the adapter stores only ΔR and names that file, which
    :func:`save_qr_bases` writes once, next to it, for all adapters sharing ``bases``."""
    if variant not in ("full", "triu"):
        raise ValueError(f"variant must be 'full' or 'triu', got {variant!r}")
    tensors = qr_lora_tensors(bases, delta_r, dtype, with_bases=bases_file is None)
    tensors.update({k: v.detach().contiguous().cpu() for k, v in (extra_tensors or {}).items()})
    metadata = _metadata(bases, alpha, base_model) | {"qr_lora.variant": variant}
    if bases_file is not None:
        metadata[qr.BASES_KEY] = bases_file
        qr.bases_file_name(metadata)  # the same check the loader makes
    return _write(path, tensors, metadata)


def save_qr_bases(
    path: str | Path,
    bases: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    alpha: float | None = None,
    base_model: str = "",
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write the shared Q and R of ``bases`` as a bases file (see :mod:`.kinds.qr`, "Shared bases")."""
    tensors = {}
    for key, (q, r) in bases.items():
        tensors |= _basis_tensors(key, q, r, dtype)
    return _write(path, tensors, _metadata(bases, alpha, base_model))


def _basis_tensors(key: str, q: torch.Tensor, r: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {f"{key}.{qr.Q_SUFFIX}": q.detach().to(dtype).contiguous().cpu(),
            f"{key}.{qr.R_SUFFIX}": r.detach().to(dtype).contiguous().cpu()}


def _metadata(bases, alpha: float | None, base_model: str) -> dict[str, str]:
    ranks = sorted({q.shape[1] for q, _ in bases.values()})
    metadata = {"qr_lora.rank": json.dumps(ranks[0] if len(ranks) == 1 else ranks), "qr_lora.base_model": base_model}
    if alpha is not None:
        metadata["qr_lora.alpha"] = str(float(alpha))
    return metadata


def _write(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Atomically (a reader never sees half a file), with the umask's mode."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_safetensors(tensors, path, metadata)
