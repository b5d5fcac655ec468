"""LoHa (LyCORIS; Hyeon-Woo et al. 2022, FedPara): ``ΔW = (alpha / r) · (w1a @ w1b) ⊙ (w2a @ w2b)``.

The Hadamard product of two rank-r matrices has rank at most r², with the exact factorization
``B[o, (i, j)] = w1a[o, i] · w2a[o, j]`` and ``A[(i, j), c] = w1b[i, c] · w2b[j, c]`` (a row-wise and a
column-wise Khatri-Rao product). That keeps LoHa in the concatenated low-rank branch whenever r² is small
against the layer size. The Tucker variant (``hada_t1``/``hada_t2``, conv layers) is rebuilt densely.
"""

from __future__ import annotations

import torch

from ..delta import LayerDelta, low_rank_if_cheaper
from ..factors import PlannedDelta, factor, flat, pair, same

SUFFIXES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")


def validate(tensors: dict[str, torch.Tensor]) -> PlannedDelta:
    """Check the four factors (and the Tucker cores) fit together; ``ΔW``'s size from the shapes alone."""
    w1a, w1b = factor(tensors, "hada_w1_a"), factor(tensors, "hada_w1_b")
    w2a, w2b = factor(tensors, "hada_w2_a"), factor(tensors, "hada_w2_b")
    if pair(tensors, "hada_t1", "hada_t2"):
        t1, t2 = factor(tensors, "hada_t1", (4,)), factor(tensors, "hada_t2", (4,))
        for t, a, b, n in ((t1, w1a, w1b, 1), (t2, w2a, w2b, 2)):
            same(f"'hada_t{n}' and 'hada_w{n}_a' ranks", t.shape[0], a.shape[0])
            same(f"'hada_t{n}' and 'hada_w{n}_b' ranks", t.shape[1], b.shape[0])
        same("the output sizes of the two Hadamard factors", w1a.shape[1], w2a.shape[1])
        same("the input sizes of the two Hadamard factors", w1b.shape[1], w2b.shape[1])
        if t1.shape[2:] != t2.shape[2:]:
            raise ValueError(f"'hada_t1' and 'hada_t2' kernels disagree ({tuple(t1.shape)} vs {tuple(t2.shape)})")
        return PlannedDelta(out=w1a.shape[1], inputs=w1b.shape[1] * flat(t1.shape[2:]))
    same("'hada_w1_a' and 'hada_w1_b' ranks", w1a.shape[1], w1b.shape[0])
    same("'hada_w2_a' and 'hada_w2_b' ranks", w2a.shape[1], w2b.shape[0])
    same("the output sizes of the two Hadamard factors", w1a.shape[0], w2a.shape[0])
    same("the input sizes of the two Hadamard factors", w1b.shape[1], w2b.shape[1])
    return PlannedDelta(out=w1a.shape[0], inputs=w1b.shape[1])


def _tucker(core: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor) -> torch.Tensor:
    # core (r, r, kh, kw), w_a (r, out), w_b (r, in) -> (out, in, kh, kw)
    return torch.einsum("ijkl,jr,ip->prkl", core.float(), w_b.float(), w_a.float())


def build(tensors: dict[str, torch.Tensor], alpha: float | None) -> LayerDelta:
    w1a, w1b = tensors["hada_w1_a"], tensors["hada_w1_b"]
    w2a, w2b = tensors["hada_w2_a"], tensors["hada_w2_b"]
    rank = w1b.shape[0]
    scale = 1.0 if alpha is None else float(alpha) / rank
    if "hada_t1" in tensors:
        dense = _tucker(tensors["hada_t1"], w1a, w1b) * _tucker(tensors["hada_t2"], w2a, w2b)
        return LayerDelta(dense=dense, scale=scale, kind="loha")
    r1, r2 = w1a.shape[1], w2a.shape[1]
    out_f, in_f = w1a.shape[0], w1b.shape[1]
    if r1 * r2 * (out_f + in_f) >= out_f * in_f:  # the exact factors would be larger than ΔW itself
        dense = (w1a.float() @ w1b.float()) * (w2a.float() @ w2b.float())
        return LayerDelta(dense=dense, scale=scale, kind="loha")
    up = (w1a.float()[:, :, None] * w2a.float()[:, None, :]).reshape(w1a.shape[0], r1 * r2)
    down = (w1b.float()[:, None, :] * w2b.float()[None, :, :]).reshape(r1 * r2, -1)
    return low_rank_if_cheaper(up, down, kind="loha", scale=scale)
