"""DoRA, weight-decomposed low-rank adaptation (Liu et al. 2024, "DoRA", eq. 5):

    W' = m · (W + ΔW) / ‖W + ΔW‖

with the norm taken per output row (PEFT's ``lora_magnitude_vector``; LyCORIS' default ``wd_on_out``) or per
input column (LyCORIS ``wd_on_out=False``). kohya/LyCORIS files store ``m`` as ``dora_scale``; diffusers drops
those keys, the studio applies them.

A studio weight g scales the whole change linearly, ``W + g·(W' − W)`` (as ComfyUI does), so DoRA adapters mix
with per-sample gains like any other. With ``s = m / ‖W + ΔW‖`` and the row norm,

    W' − W = (s − 1) ⊙ W + s ⊙ ΔW,

i.e. a rescaling of the base layer's own output plus ``ΔW`` with its output rows scaled by ``s``: the low-rank
part stays low-rank (s folds into ``up``) and no dense copy of W is kept. The column-norm variant folds
``s`` into ``down`` and needs ``W((s − 1) ⊙ x)``, one extra base product.
"""

from __future__ import annotations

import torch

from ..delta import LayerDelta


def attach_magnitude(delta: LayerDelta, dora_scale: torch.Tensor) -> LayerDelta:
    """Record ``m`` on ``delta`` with its axis, read from the stored shape."""
    shape = tuple(dora_scale.shape)
    out_f, in_f = delta.out_features, delta.in_features
    if dora_scale.numel() == 0:
        raise ValueError(f"dora_scale is empty (shape {shape})")
    if dora_scale.dim() <= 1 or (shape[0] == out_f and all(s == 1 for s in shape[1:])):
        axis, wanted = "out", out_f
    elif shape[0] == 1 and all(s == 1 for s in shape[2:]):
        axis, wanted = "in", in_f
    else:
        raise ValueError(f"dora_scale of shape {shape} fits neither output rows nor input columns")
    if dora_scale.numel() != wanted:
        side = "output rows" if axis == "out" else "input channels"
        raise ValueError(f"dora_scale has {dora_scale.numel()} values but the layer delta has {wanted} {side}")
    delta.magnitude, delta.magnitude_axis = dora_scale.reshape(-1).float(), axis
    delta.kind = f"do{delta.kind}" if not delta.kind.startswith("do") else delta.kind
    return delta


def norm_scale(base_weight: torch.Tensor, delta: LayerDelta) -> torch.Tensor:
    """``s = m / ‖W + ΔW‖`` as a 1-D float32 tensor along the magnitude's axis."""
    w = base_weight.float()
    merged = w + delta.weight(tuple(w.shape)).to(w.device)
    flat = merged.reshape(merged.shape[0], -1)
    if delta.magnitude_axis == "out":
        norm = flat.norm(dim=1)
    else:
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)
    eps = torch.finfo(torch.float32).eps
    return delta.magnitude.to(norm.device) / (norm + eps)
