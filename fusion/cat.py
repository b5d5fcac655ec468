"""Concatenation merge (``cat``): the exact weighted sum of the LoRAs as one LoRA of rank Σ r_i.

    ΔW = Σ_i w_i B_i A_i = [w_1 B_1, …, w_N B_N] · [A_1; …; A_N]

Stacking the factors is exact (PEFT ``add_weighted_adapter(combination_type="cat")``, kohya
``merge_lora.py --concat``), so the image equals ``merge``; the point is a single adapter — one file to share,
one branch to run. Deltas that are not low-rank (dense LyCORIS deltas, DoRA's rescaling) are added exactly as a
dense part; such a merge renders exactly but is not saved as a LoRA file (use ``svd`` to factor it).
"""

from __future__ import annotations

import torch

from pipelines.adapters.delta import LayerDelta

from .weightspace import LayerPart, WeightMerge, split_parts


class Cat(WeightMerge):
    name = "cat"
    summary = "exact merge into one LoRA by stacking the factors (rank = sum of ranks)"
    citation = "PEFT add_weighted_adapter 'cat'; kohya merge_lora --concat"

    def merge_layer(self, key: str, parts: list[LayerPart], base_weight: torch.Tensor) -> LayerDelta | None:
        low, dense, bias = split_parts(parts, base_weight, "cpu")
        up = down = None
        if low:
            up = torch.cat([w * b for w, b, _ in low], dim=1)  # [w_1 B_1, …, w_N B_N]
            down = torch.cat([a for _, _, a in low], dim=0)  # [A_1; …; A_N]
        if up is None and dense is None and bias is None:
            return None
        return LayerDelta(down=down, up=up, dense=dense, bias=bias, kind="cat")
