"""LoKr (LyCORIS; Edalati et al. 2022, KronA): ``ΔW = scale · w1 ⊗ w2`` (Kronecker product).

Either factor may itself be low-rank (``w1 = w1_a @ w1_b``, ``w2 = w2_a @ w2_b``); ``scale = alpha / r`` when
one is, and 1 when both are full matrices (LyCORIS ignores alpha then). By the mixed-product property,
``(U1 V1) ⊗ (U2 V2) = (U1 ⊗ U2)(V1 ⊗ V2)``, so LoKr is exactly low-rank with rank ``rank(w1)·rank(w2)`` and
joins the concatenated branch when that is cheaper than a dense matrix. Conv ``w2`` keeps its spatial axes.
"""

from __future__ import annotations

import torch

from ..delta import LayerDelta, low_rank_if_cheaper

SUFFIXES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def _factors(full, a, b):
    """(U, V) with U @ V = the factor; for a full matrix the identity goes on the larger side."""
    if full is not None:
        full = full.float()
        rows, cols = full.shape[0], full.shape[1]
        if full.dim() == 2 and cols <= rows:
            return full, torch.eye(cols)
        # wide matrices, and conv factors (rows, cols, kh, kw) whose kernel must stay in V
        return torch.eye(rows), full
    return a.float(), b.float()


def build(tensors: dict[str, torch.Tensor], alpha: float | None) -> LayerDelta:
    if "lokr_t2" in tensors:
        raise NotImplementedError("LoKr with a Tucker core (lokr_t2) is not supported")
    w1, w1a, w1b = tensors.get("lokr_w1"), tensors.get("lokr_w1_a"), tensors.get("lokr_w1_b")
    w2, w2a, w2b = tensors.get("lokr_w2"), tensors.get("lokr_w2_a"), tensors.get("lokr_w2_b")
    factored_dim = w1b.shape[0] if w1a is not None else (w2b.shape[0] if w2a is not None else None)
    scale = 1.0 if factored_dim is None or alpha is None else float(alpha) / factored_dim
    u1, v1 = _factors(w1, w1a, w1b)
    u2, v2 = _factors(w2, w2a, w2b)
    up = torch.kron(u1, u2)
    if v2.dim() == 4:
        down = torch.kron(v1[:, :, None, None], v2)
    else:
        down = torch.kron(v1, v2)
    return low_rank_if_cheaper(up, down, kind="lokr", scale=scale)
