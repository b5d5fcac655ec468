"""LoHa (LyCORIS; Hyeon-Woo et al. 2022, FedPara): ``ΔW = (alpha / r) · (w1a @ w1b) ⊙ (w2a @ w2b)``.

The Hadamard product of two rank-r matrices has rank at most r², with the exact factorization
``B[o, (i, j)] = w1a[o, i] · w2a[o, j]`` and ``A[(i, j), c] = w1b[i, c] · w2b[j, c]`` (a row-wise and a
column-wise Khatri-Rao product). That keeps LoHa in the concatenated low-rank branch whenever r² is small
against the layer size. The Tucker variant (``hada_t1``/``hada_t2``, conv layers) is rebuilt densely.
"""

from __future__ import annotations

import torch

from ..delta import LayerDelta, low_rank_if_cheaper

SUFFIXES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")


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
    up = (w1a.float()[:, :, None] * w2a.float()[:, None, :]).reshape(w1a.shape[0], r1 * r2)
    down = (w1b.float()[:, None, :] * w2b.float()[None, :, :]).reshape(r1 * r2, -1)
    return low_rank_if_cheaper(up, down, kind="loha", scale=scale)
