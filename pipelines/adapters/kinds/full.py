"""Full weight differences (LyCORIS "full" / kohya "diff"): ``ΔW = diff`` and ``Δb = diff_b``, no scaling."""

from __future__ import annotations

import torch

from ..delta import LayerDelta

SUFFIXES = ("diff", "diff_b")


def build(tensors: dict[str, torch.Tensor], alpha: float | None) -> LayerDelta:
    return LayerDelta(dense=tensors.get("diff"), bias=tensors.get("diff_b"), kind="full")
