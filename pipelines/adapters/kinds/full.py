"""Full weight differences (LyCORIS "full" / kohya "diff"): ``ΔW = diff`` and ``Δb = diff_b``, no scaling."""

from __future__ import annotations

import torch

from ..delta import LayerDelta
from ..factors import PlannedDelta, factor, flat, same

SUFFIXES = ("diff", "diff_b")


def validate(tensors: dict[str, torch.Tensor]) -> PlannedDelta:
    """A 2-D/4-D ``diff`` and/or a 1-D ``diff_b`` with as many rows."""
    diff = factor(tensors, "diff", (2, 4)) if "diff" in tensors else None
    bias = factor(tensors, "diff_b", (1,)) if "diff_b" in tensors else None
    if diff is not None and bias is not None:
        same("'diff' rows and 'diff_b' length", diff.shape[0], bias.shape[0])
    if diff is None:
        return PlannedDelta(out=bias.shape[0], inputs=1)
    return PlannedDelta(out=diff.shape[0], inputs=flat(diff.shape[1:]))


def build(tensors: dict[str, torch.Tensor], alpha: float | None) -> LayerDelta:
    return LayerDelta(dense=tensors.get("diff"), bias=tensors.get("diff_b"), kind="full")
