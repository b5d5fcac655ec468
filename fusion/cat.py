"""Concatenation merge (``cat``): the exact weighted sum of the LoRAs as one LoRA of rank Σ r_i.

    ΔW = Σ_i w_i B_i A_i = [w_1 B_1, …, w_N B_N] · [A_1; …; A_N]

Stacking the factors is exact (PEFT ``add_weighted_adapter(combination_type="cat")``, kohya
``merge_lora.py --concat``), so the image equals ``merge``; the point is a single adapter — one file to share,
one branch to run. Deltas that are not low-rank (dense LyCORIS deltas, DoRA's rescaling) are added exactly as a
dense part (``studio merge`` factors it by SVD to save the merge as a LoRA file). Sparse SHiRA deltas are summed
as a sparse sum (Bhardwaj et al. 2024: fusing SHiRAs touches only the union of their supports); how much the
supports overlap is reported per pair of adapters.
"""

from __future__ import annotations

import torch

from pipelines.adapters.delta import LayerDelta
from pipelines.adapters.kinds import shira

from .weightspace import LayerPart, WeightMerge, split_parts


class Cat(WeightMerge):
    name = "cat"
    summary = "exact merge into one LoRA by stacking the factors (rank = sum of ranks)"
    citation = "PEFT add_weighted_adapter 'cat'; kohya merge_lora --concat"

    def begin_merge(self, names: list[str]) -> None:
        self._overlap: dict[tuple[str, str], list[int]] = {}  # pair -> [layers, shared entries, smaller supports]

    def end_merge(self, names: list[str]) -> dict:
        if not self._overlap:
            return {}
        pairs = [{"pair": list(pair), "layers": n, "shared": shared, "share_of_smaller": shared / max(smaller, 1)}
                 for pair, (n, shared, smaller) in self._overlap.items()]
        return {"sparse_overlap": pairs}

    def merge_layer(self, key: str, parts: list[LayerPart], base_weight: torch.Tensor) -> LayerDelta | None:
        sparse = [p for p in parts if p.is_sparse]
        low, dense, bias = split_parts([p for p in parts if not p.is_sparse], base_weight, "cpu")
        up = down = None
        if low:
            up = torch.cat([w * b for w, b, _ in low], dim=1)  # [w_1 B_1, …, w_N B_N]
            down = torch.cat([a for _, _, a in low], dim=0)  # [A_1; …; A_N]
        if sparse:
            shape = tuple(base_weight.shape)
            for p in sparse:
                if p.delta.bias is not None:
                    bias = p.weight * p.delta.bias if bias is None else bias + p.weight * p.delta.bias
            self._record_overlap(sparse, shape[1])
            indices, values = shira.sparse_sum(  # Σ_i w_i ΔW_i over the union of the supports
                [(p.weight, p.delta.sparse_indices, p.delta.sparse_values) for p in sparse], shape)
            return shira.SparseDelta(down=down, up=up, dense=dense, bias=bias, sparse_indices=indices,
                                     sparse_values=values, sparse_shape=shape, kind="cat")
        if up is None and dense is None and bias is None:
            return None
        return LayerDelta(down=down, up=up, dense=dense, bias=bias, kind="cat")

    def _record_overlap(self, sparse: list[LayerPart], columns: int) -> None:
        for i, a in enumerate(sparse):
            for b in sparse[i + 1:]:
                shared, _ = shira.support_overlap(a.delta.sparse_indices, b.delta.sparse_indices, columns)
                smaller = min(a.delta.sparse_values.numel(), b.delta.sparse_values.numel())
                row = self._overlap.setdefault((a.name, b.name), [0, 0, 0])
                row[0] += 1
                row[1] += shared
                row[2] += smaller
