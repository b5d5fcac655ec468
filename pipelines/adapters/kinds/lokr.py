"""LoKr (LyCORIS; Edalati et al. 2022, KronA): ``ΔW = scale · w1 ⊗ w2`` (Kronecker product).

Either factor may itself be low-rank (``w1 = w1_a @ w1_b``, ``w2 = w2_a @ w2_b``); ``scale = alpha / r`` when
one is, and 1 when both are full matrices (LyCORIS ignores alpha then). By the mixed-product property,
``(U1 V1) ⊗ (U2 V2) = (U1 ⊗ U2)(V1 ⊗ V2)``, so LoKr is exactly low-rank with rank ``rank(w1)·rank(w2)`` and
joins the concatenated branch when that is cheaper than a dense matrix. Conv ``w2`` keeps its spatial axes.
"""

from __future__ import annotations

import torch

from ..delta import LayerDelta, low_rank_if_cheaper
from ..factors import PlannedDelta, factor, flat, pair, same

SUFFIXES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def _factor_shape(tensors, n: int, ndims_b: tuple[int, ...]) -> tuple[int, tuple[int, ...], int]:
    """(rows, column shape, rank) of Kronecker factor ``n`` (full ``lokr_wn`` or ``lokr_wn_a @ lokr_wn_b``)."""
    full, a, b = f"lokr_w{n}", f"lokr_w{n}_a", f"lokr_w{n}_b"
    factored = pair(tensors, a, b)
    if factored and full in tensors:
        raise ValueError(f"both '{full}' and '{a}'/'{b}' are given: which one applies is ambiguous")
    if factored:
        wa, wb = factor(tensors, a), factor(tensors, b, ndims_b)
        same(f"'{a}' and '{b}' ranks", wa.shape[1], wb.shape[0])
        return wa.shape[0], tuple(wb.shape[1:]), wa.shape[1]
    if full not in tensors:
        raise ValueError(f"Kronecker factor {n} is missing (neither '{full}' nor '{a}'/'{b}'): an incomplete "
                         "adapter cannot be applied")
    w = factor(tensors, full, ndims_b)
    return w.shape[0], tuple(w.shape[1:]), min(w.shape[0], flat(w.shape[1:]))


def validate(tensors: dict[str, torch.Tensor]) -> PlannedDelta:
    """Check both Kronecker factors are complete and well formed; ``ΔW``'s size from the shapes alone."""
    if "lokr_t2" in tensors:
        raise ValueError("LoKr with a Tucker core (lokr_t2) is not supported")
    rows1, cols1, _ = _factor_shape(tensors, 1, (2,))
    rows2, cols2, _ = _factor_shape(tensors, 2, (2, 4))
    return PlannedDelta(out=rows1 * rows2, inputs=flat(cols1) * flat(cols2))


def _full(full, a, b) -> torch.Tensor:
    return full.float() if full is not None else (a.float() @ b.float().reshape(b.shape[0], -1)).reshape(
        a.shape[0], *b.shape[1:])


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
    plan = validate(tensors)
    rank = (w1a.shape[1] if w1a is not None else min(w1.shape)) * (
        w2a.shape[1] if w2a is not None else min(w2.shape[0], flat(w2.shape[1:])))
    if rank * (plan.out + plan.inputs) >= plan.numel:  # the exact factors would be larger than ΔW itself
        m1, m2 = _full(w1, w1a, w1b), _full(w2, w2a, w2b)
        dense = torch.kron(m1[:, :, None, None], m2) if m2.dim() == 4 else torch.kron(m1, m2)
        return LayerDelta(dense=dense, scale=scale, kind="lokr")
    u1, v1 = _factors(w1, w1a, w1b)
    u2, v2 = _factors(w2, w2a, w2b)
    up = torch.kron(u1, u2)
    if v2.dim() == 4:
        down = torch.kron(v1[:, :, None, None], v2)
    else:
        down = torch.kron(v1, v2)
    return low_rank_if_cheaper(up, down, kind="lokr", scale=scale)
