"""LoRA-LEGO (Zhao et al., ICLR 2025, "Merging LoRAs like Playing LEGO: Pushing the Modularity of LoRA to Extremes
Through Rank-Wise Clustering"): rank-wise clustering of the LoRAs' minimal semantic units.

A LoRA ``ΔW = B A = Σ_j b_j a_jᵀ`` is a sum of rank-one *minimal semantic units* (MSUs) ``u_j = (b_j, a_j)``: a
column of B with its row of A. The paper's two properties make them LEGO bricks: the units of a LoRA can be
permuted freely (permutation invariance), and concatenating the units of several LoRAs is summing the LoRAs
(concatenation-summation equivalence, i.e. ``cat``). Per layer, with the LoRA weight ``w_i`` (× block weight)
and the LoRA's scale folded into b:

1. *disassemble*: the pool of n = Σ r_i units ``u = [w_i b_j ; a_j]`` of every LoRA on the layer;
2. *cluster*: k-means on the pool (the units' concatenated parameters, k-means++ initialisation, Lloyd
   iterations), k = ``rank`` (0: the largest input rank, as for ``svd``; at most n);
3. *assemble*: each centroid ``c = mean of its members`` is one rank of the merged LoRA, ``ΔW = Σ_c b_c a_cᵀ``;
4. *dual reweighting* of the merged scale:
   - parameter reweighting (the paper's "norm decay": averaging units that point different ways shrinks the
     centroid): ``b_c ← b_c · mean‖b_m‖ / ‖b_c‖`` and ``a_c ← a_c · mean‖a_m‖ / ‖a_c‖`` over the members m;
   - output reweighting (the paper's "variance expansion": the output variance of a sum of rank-one terms grows
     with their number): the merged delta is scaled by ``√(n / k)``, so that k roughly uncorrelated centroid
     outputs have the output variance of the n units they stand for. The paper states the issue for a merged
     LoRA standing in for its inputs; its exact constant was not available here, and the studio's target is the
     weighted *sum* that ``merge``/``cat`` compute (each LoRA at its weight), hence this factor.

Both factors are 1 when every cluster holds one unit, so with ``rank`` ≥ n the result is exactly ``cat`` with its
ranks permuted. Clustering is deterministic: layer ``key`` seeds its k-means++ draws with
``seed + crc32(key)``. Parts that are not low-rank (dense LyCORIS deltas, DoRA's rescaling, sparse SHiRA deltas)
are added exactly as a dense part, as ``cat`` does; bias deltas are summed with the weights.
"""

from __future__ import annotations

import torch

from pipelines.adapters.delta import LayerDelta

from .base import Param
from .dare import layer_seed
from .weightspace import LayerPart, WeightMerge, split_parts

MAX_ITERATIONS = 100  # Lloyd iterations; the tiny pools here converge in a handful


def kmeans(points: torch.Tensor, k: int, generator: torch.Generator,
           iterations: int = MAX_ITERATIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """``(centroids [k, d], labels [n])`` of k-means (Lloyd) on ``points [n, d]`` from a k-means++ start.

    Deterministic for a given generator state. ``k`` must be between 1 and n; a cluster that loses all its
    members keeps its previous centroid.
    """
    n = points.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= {n} points, got k = {k}")
    points = points.double()
    first = int(torch.randint(n, (1,), generator=generator))
    chosen = [first]
    dist = ((points - points[first]) ** 2).sum(1)
    for _ in range(1, k):
        if dist.sum() > 0:
            nxt = int(torch.multinomial(dist / dist.sum(), 1, generator=generator))
        else:  # every remaining point coincides with a chosen one: take the first unchosen index
            nxt = next(i for i in range(n) if i not in chosen)
        chosen.append(nxt)
        dist = torch.minimum(dist, ((points - points[nxt]) ** 2).sum(1))
    centroids = points[chosen].clone()
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iterations):
        new = torch.cdist(points, centroids).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
        for c in range(k):
            members = labels == c
            if members.any():
                centroids[c] = points[members].mean(0)
    return centroids, labels


def lego_factors(ups: torch.Tensor, downs: torch.Tensor, k: int, generator: torch.Generator,
                 reweight: str = "both") -> tuple[torch.Tensor, torch.Tensor]:
    """The merged ``(up [out, k], down [k, in])`` of the units ``ups[:, j] downs[j]`` (already weighted).

    ``reweight``: ``"both"`` (the paper's dual reweighting), ``"parameter"``, ``"output"`` or ``"none"``.
    """
    n, out_f = downs.shape[0], ups.shape[0]
    k = min(k, n)
    points = torch.cat([ups.T, downs], dim=1)  # one row per unit: [b_j ; a_j]
    centroids, labels = kmeans(points, k, generator)
    up, down = centroids[:, :out_f].T.clone(), centroids[:, out_f:].clone()
    if reweight in ("both", "parameter"):
        for c in range(k):
            members = labels == c
            if not members.any():
                continue
            for factor, norms in ((up[:, c], ups[:, members].double().norm(dim=0)),
                                  (down[c], downs[members].double().norm(dim=1))):
                norm = factor.norm()
                if norm > 0:
                    factor.mul_(norms.mean() / norm)
    if reweight in ("both", "output"):
        up = up * (n / k) ** 0.5
    return up.float(), down.float()


class Lego(WeightMerge):
    name = "lego"
    summary = "LoRA-LEGO: k-means of all LoRAs' rank-one units, centroids form the merged LoRA (dual reweighting)"
    citation = "Zhao et al. 2025 (ICLR), Merging LoRAs like Playing LEGO: rank-wise clustering"
    params = (
        Param("rank", 0, "k, the merged rank per layer: 0 = the largest input rank (as svd); at most "
              "the total number of units (then the merge is exact, cat with permuted ranks)", type=int, min=0),
        Param("reweight", "both", "dual reweighting of the merged scale: 'both' (the paper), 'parameter' (norm "
              "decay only), 'output' (variance only) or 'none'", type=str,
              choices=("both", "parameter", "output", "none")),
        Param("seed", 0, "seed of the k-means++ initialisation", type=int, min=0),
    )

    def merge_layer(self, key: str, parts: list[LayerPart], base_weight: torch.Tensor) -> LayerDelta | None:
        low, dense, bias = split_parts(parts, base_weight, "cpu")
        up = down = None
        if low:
            ups = torch.cat([w * b for w, b, _ in low], dim=1).double()
            downs = torch.cat([a for _, _, a in low], dim=0).double()
            k = self.rank or max(a.shape[0] for _, _, a in low)
            generator = torch.Generator().manual_seed(layer_seed(self.seed, key))
            up, down = lego_factors(ups, downs, k, generator, self.reweight)
        if up is None and dense is None and bias is None:
            return None
        return LayerDelta(down=down, up=up, dense=dense, bias=bias, kind="lego")
