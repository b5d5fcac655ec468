"""SVD merge (``svd``): the weighted sum of the deltas, truncated to a chosen rank by SVD.

    ΔW = Σ_i w_i ΔW_i,    U Σ Vᵀ = svd(ΔW),    B = U_k Σ_k,  A = V_kᵀ

The best rank-k approximation of the merge (Eckart–Young), as in PEFT's ``add_weighted_adapter(
combination_type="svd")`` and kohya's ``svd_merge_lora.py --new_rank``. The sum is formed with PEFT's
``merge_utils.task_arithmetic``. When every delta on a layer is low-rank the SVD is taken of the factored form
(QR of ``[w_i B_i]`` and ``[A_i]ᵀ``, SVD of the small core), which gives the same result without building the
dense matrix. With ``rank`` ≥ Σ r_i the result is exact. PEFT's optional quantile clamp of the factors
(``svd_clamp``) is not applied.
"""

from __future__ import annotations

import torch
from peft.utils.merge_utils import task_arithmetic

from pipelines.adapters.delta import LayerDelta

from .weightspace import RANK_PARAM, LayerPart, WeightMerge, factor_dense, factored_svd, resolve_rank, split_parts


class SVD(WeightMerge):
    name = "svd"
    summary = "weighted sum of the deltas, truncated to a chosen rank by SVD"
    citation = "PEFT add_weighted_adapter 'svd'; kohya svd_merge_lora (Eckart-Young truncation)"
    params = (RANK_PARAM,)

    def merge_layer(self, key: str, parts: list[LayerPart], base_weight: torch.Tensor) -> LayerDelta | None:
        device = base_weight.device if base_weight.device.type != "meta" else "cpu"
        rank = resolve_rank(self.rank, parts)
        if rank is not None and all(p.is_low_rank and p.delta.dense is None for p in parts):
            _, _, bias = split_parts(parts, base_weight, device)
            up = torch.cat([p.weight * p.up(device) for p in parts], dim=1)
            down = torch.cat([p.down(device) for p in parts], dim=0)
            up, down = factored_svd(up, down, rank)
            return LayerDelta(down=down.cpu(), up=up.cpu(), bias=None if bias is None else bias.cpu(), kind="svd")
        weights = torch.tensor([p.weight for p in parts], device=device)
        merged = task_arithmetic([p.dense(base_weight, device) for p in parts], weights)  # Σ w_i ΔW_i
        _, _, bias = split_parts(parts, base_weight, device)
        return factor_dense(merged, rank, bias, "svd")
