"""QR-LoRA (Yang et al., ICCV 2025, "QR-LoRA: Efficient and Disentangled Fine-tuning via QR Decomposition for
Customized Generation", method section).

For a target weight W (out x in), take the top-r SVD W_r = U_r Σ_r V_rᵀ and its QR decomposition
s·Q R = W_r (Q: out x r with orthonormal columns, R: r x in, s = alpha / r, 1 in the released code); the
layer becomes ``W_res x + s·Q (R + ΔR) x`` with W_res = W − s·Q R, and only ΔR (r x in, initialised to 0)
is trained. Because W_res + s·Q R = W, a QR-LoRA adapter is exactly the low-rank delta

    ΔW = s · Q ΔR            (up = Q, down = ΔR, scale = s)

and several of them merge as W_res + s·Q (R + Σ_i λ_i ΔR_i) = W + s·Q Σ_i λ_i ΔR_i (the paper's merge), which
the ``qr`` strategy builds as one rank-r adapter.

**File format** (the released code's, which is self-describing; the studio reads and writes it). A
``.safetensors`` file with, for every target layer ``<component>.<module path>`` in diffusers naming
(e.g. ``transformer.transformer_blocks.0.attn.to_q``, ``unet.down_blocks.1.attentions.0.transformer_blocks.0
.attn1.to_q``):

* ``<layer>.lora.q.weight``        Q,  out x r, orthonormal columns (frozen);
* ``<layer>.lora.base_r.weight``   R,  r x in (frozen), with s·Q R = the top-r SVD part of the base weight;
* ``<layer>.lora.delta_r.weight``  ΔR, r x in (trained; upper-triangular for the "triu" variant);

convolution layers use the flattened weight (out x in·kh·kw). Optional ``__metadata__`` (all strings):
``qr_lora.rank``, ``qr_lora.alpha`` (default: the rank, i.e. s = 1 as in the released code),
``qr_lora.variant`` (``"full"`` or ``"triu"``), ``qr_lora.base_model`` (free text). Other keys of the file
(e.g. a PEFT text-encoder LoRA, which the released training script saves alongside) are read as usual.
The released code never stores W_res (it ships a separate residual file); the studio does not need it.

**Shared bases** (a studio extension, read and written by the studio). Every adapter of one base shares the same
Q and R, so a set of them may keep Q and R once: an adapter that stores only ``<layer>.lora.delta_r.weight``
names, in ``qr_lora.bases``, a *bases file* in its own folder (a plain file name, no path) that holds
``<layer>.lora.q.weight`` and ``<layer>.lora.base_r.weight`` for its layers (and no ΔR). The loader fills each
layer's Q and R from it and runs the same base check. A bases file alone is not an adapter and is refused as one.

**Base check.** Q and R are only meaningful for the base weight they were computed from. Since Q spans the
top-r left singular space of W, Qᵀ W = s·R exactly; the studio checks ``‖QᵀW − s·R‖ ≤ tol·‖s·R‖`` (and that Q
is orthonormal) for every layer when the file is loaded, so an adapter made for another checkpoint (or with
another rank convention) is refused with the layer that disagrees. Adapters of one merge must share Q and R
(same base, rank and precision), which the ``qr`` strategy checks.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..delta import LayerDelta

Q_SUFFIX = "lora.q.weight"
R_SUFFIX = "lora.base_r.weight"
DELTA_SUFFIX = "lora.delta_r.weight"
SUFFIXES = (Q_SUFFIX, R_SUFFIX, DELTA_SUFFIX)
BASE_TOLERANCE = 2e-2  # relative; bf16/fp16 copies of the same checkpoint stay well below it


BASES_KEY = "qr_lora.bases"  # metadata: the file name of the shared bases file next to the adapter


def is_qr_key(key: str) -> bool:
    return key.endswith(SUFFIXES)


def bases_file_name(metadata: dict[str, str]) -> str | None:
    """The bases file an adapter names (``None`` if it names none); only a plain ``.safetensors`` file name in
    the adapter's own folder is accepted, so a file cannot point the loader elsewhere."""
    name = metadata.get(BASES_KEY)
    if not name:
        return None
    if Path(name).name != name or name in (".", "..") or "\\" in name or not name.endswith(".safetensors"):
        raise ValueError(f"metadata {BASES_KEY} must be a .safetensors file name in the adapter's folder, got {name!r}")
    return name


def fill_from_bases(groups: dict[str, dict[str, torch.Tensor]], bases: dict[str, torch.Tensor]) -> None:
    """Give every layer of ``groups`` that lacks Q or R the ones of the bases file's tensors (in place)."""
    base_groups, _ = split_keys(bases)
    for key, group in groups.items():
        if "q" in group and "r" in group:
            continue
        shared = base_groups.get(key)
        if shared is None or "q" not in shared or "r" not in shared:
            raise ValueError(f"the bases file has no Q and R for layer '{key}'")
        group.setdefault("q", shared["q"])
        group.setdefault("r", shared["r"])


def split_keys(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """``({layer: {"q", "r", "delta_r"}}, other tensors)``; layers keep their component prefix."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    rest = {}
    names = {Q_SUFFIX: "q", R_SUFFIX: "r", DELTA_SUFFIX: "delta_r"}
    for key, value in tensors.items():
        for suffix, short in names.items():
            if key.endswith("." + suffix):
                groups.setdefault(key[: -len(suffix) - 1], {})[short] = value
                break
        else:
            rest[key] = value
    return groups, rest


def basis(weight: torch.Tensor, rank: int, alpha: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q, R)`` of a base weight: top-``rank`` SVD, then QR, with s·Q R = W_r (s = alpha / rank).

    Computed in float32 like the released code (which divides Σ_r by s before the QR); conv weights are
    flattened to out x in·kh·kw.
    """
    w = weight.detach().float().flatten(1)
    if rank > min(w.shape):
        raise ValueError(f"rank {rank} exceeds the layer's size {tuple(w.shape)}")
    scale = 1.0 if alpha is None else float(alpha) / rank
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    w_r = (u[:, :rank] * (s[:rank] / scale)) @ vh[:rank]
    q, r = torch.linalg.qr(w_r, mode="reduced")
    return q[:, :rank].contiguous(), r[:rank].contiguous()


def base_mismatch(q: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, scale: float,
                  tol: float = BASE_TOLERANCE) -> str | None:
    """Why ``(q, r)`` were not computed from ``weight`` (``None`` if they were, within ``tol``)."""
    w = weight.detach().float().flatten(1)
    q, r = q.float().to(w.device), r.float().to(w.device)
    if q.shape[0] != w.shape[0] or r.shape[1] != w.shape[1] or q.shape[1] != r.shape[0]:
        return f"Q {tuple(q.shape)} and R {tuple(r.shape)} do not fit a weight of {tuple(w.shape)}"
    gram = q.T @ q
    off = (gram - torch.eye(gram.shape[0], device=gram.device)).abs().max().item()
    if off > tol:
        return f"Q is not orthonormal (max |QᵀQ − I| = {off:.3g})"
    expected = scale * r
    error = torch.linalg.norm(q.T @ w - expected) / torch.linalg.norm(expected).clamp_min(1e-12)
    if error > tol:
        return (f"Q and R were not computed from this base weight (‖QᵀW − sR‖/‖sR‖ = {error:.3g} > {tol:g}): "
                "the adapter was made for another base checkpoint, or with another alpha")
    return None


def build(group: dict[str, torch.Tensor], alpha: float | None) -> LayerDelta:
    """The exact delta ``s · Q ΔR`` of one layer."""
    missing = {"q", "r", "delta_r"} - set(group)
    if missing:
        raise ValueError(f"QR-LoRA layer lacks {', '.join(sorted(missing))}")
    q, r, delta_r = group["q"], group["r"], group["delta_r"]
    for short, value in (("Q", q), ("R", r), ("ΔR", delta_r)):
        if value.dim() != 2 or value.numel() == 0:
            raise ValueError(f"QR-LoRA {short} must be a non-empty matrix, got shape {tuple(value.shape)}")
    rank = q.shape[1]
    if r.shape[0] != rank or delta_r.shape != r.shape:
        raise ValueError(f"QR-LoRA shapes disagree: Q {tuple(q.shape)}, R {tuple(r.shape)}, ΔR {tuple(delta_r.shape)}")
    scale = 1.0 if alpha is None else float(alpha) / rank
    return LayerDelta(down=delta_r, up=q, scale=scale, kind="qr")
