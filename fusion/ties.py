"""TIES-Merging (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models", Algorithm 1).

Per layer, with task vectors τ_i = ΔW_i (each LoRA's exact delta at weight 1) and weights w_i (LoRA weight ×
block weight), PEFT's ``merge_utils.ties`` computes

1. *trim*: keep the top-``density`` fraction of |τ_i| entries of each τ_i (the paper's top-k%, k = 20);
2. *elect sign*: γ = sgn(Σ_i τ̂_i) per entry ("total"; "frequency" counts signs instead);
3. *disjoint merge*: τ = Σ_{i ∈ A} w_i τ̂_i / |A| over the LoRAs A whose sign agrees with γ.

The merged dense delta is then factored by truncated SVD to ``rank`` (PEFT's ``ties_svd``), or kept dense with
``rank=-1``. Differences from the paper: trimming is per layer (PEFT) rather than over the whole flattened task
vector, and the paper's final scale λ is the LoRA weights here (λ = 1 by default). Bias deltas, which TIES does
not cover, are summed with the weights.
"""

from __future__ import annotations

import torch
from peft.utils.merge_utils import ties

from pipelines.adapters.delta import LayerDelta

from .base import Param
from .weightspace import RANK_PARAM, LayerPart, WeightMerge, factor_dense, resolve_rank, split_parts


class Ties(WeightMerge):
    name = "ties"
    summary = "TIES-Merging on the LoRA deltas: trim, elect sign, disjoint mean (PEFT merge_utils)"
    citation = "Yadav et al. 2023, TIES-Merging: Resolving Interference When Merging Models"
    params = (
        Param("density", 0.2, "fraction of each delta's largest entries kept (the paper's top-20%)", min=1e-6, max=1.0),
        Param("majority_sign_method", "total", "sign election: 'total' (sum of values, the paper) or 'frequency'",
              type=str, choices=("total", "frequency")),
        RANK_PARAM,
    )

    def merge_layer(self, key: str, parts: list[LayerPart], base_weight: torch.Tensor) -> LayerDelta | None:
        device = base_weight.device if base_weight.device.type != "meta" else "cpu"
        tasks = [p.dense(base_weight, device) for p in parts]
        weights = torch.tensor([p.weight for p in parts], device=device)
        merged = ties(tasks, weights, self.density, self.majority_sign_method)
        _, _, bias = split_parts(parts, base_weight, device)
        return factor_dense(merged, resolve_rank(self.rank, parts), bias, "ties")
