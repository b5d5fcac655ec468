"""LoRA and LoCon (Hu et al. 2021; kohya / LyCORIS "locon"): ``ΔW = (alpha / r) · up @ down``.

For convolutions ``down`` is a kh x kw conv to r channels and ``up`` a 1x1 conv. LyCORIS' Tucker variant
(``lora_mid``) uses a 1x1 ``down``, a kh x kw ``mid`` core and a 1x1 ``up``; ``mid ∘ down`` is folded into one
kh x kw ``down`` here, which is exact because both are linear and ``down`` is pointwise.
"""

from __future__ import annotations

import torch

from ..delta import LayerDelta
from ..factors import PlannedDelta, factor, flat, same

SUFFIXES = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")


def validate(tensors: dict[str, torch.Tensor]) -> PlannedDelta:
    """Check the factors' presence, ranks and inner sizes; ``ΔW``'s size from the shapes alone."""
    down = factor(tensors, "lora_down.weight", (2, 4))
    up = factor(tensors, "lora_up.weight", (2, 4))
    if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
        raise ValueError(f"'lora_up.weight' must be a 1x1 convolution, got shape {tuple(up.shape)}")
    rank = down.shape[0]
    inputs = flat(down.shape[1:])
    if "lora_mid.weight" in tensors:
        mid = factor(tensors, "lora_mid.weight", (4,))
        if down.dim() == 4 and tuple(down.shape[2:]) != (1, 1):
            raise ValueError(f"with 'lora_mid.weight', 'lora_down.weight' must be 1x1, got {tuple(down.shape)}")
        same("'lora_mid.weight' input channels and 'lora_down.weight' rank", mid.shape[1], rank)
        rank, inputs = mid.shape[0], down.shape[1] * flat(mid.shape[2:])
    same("'lora_up.weight' rank and 'lora_down.weight' rank", up.shape[1], rank)
    return PlannedDelta(out=up.shape[0], inputs=inputs)


def build(tensors: dict[str, torch.Tensor], alpha: float | None) -> LayerDelta:
    down = tensors["lora_down.weight"]
    up = tensors["lora_up.weight"]
    rank = down.shape[0]
    if "lora_mid.weight" in tensors:
        mid = tensors["lora_mid.weight"]  # (r, r, kh, kw); down is (r, in, 1, 1)
        down = torch.einsum("rskl,si->rikl", mid.float(), down.float().reshape(rank, -1)).to(down.dtype)
    up = up.reshape(up.shape[0], -1)
    scale = 1.0 if alpha is None else float(alpha) / rank
    return LayerDelta(down=down, up=up, scale=scale, kind="lora")
