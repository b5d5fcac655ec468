"""LoRA and LoCon (Hu et al. 2021; kohya / LyCORIS "locon"): ``ΔW = (alpha / r) · up @ down``.

For convolutions ``down`` is a kh x kw conv to r channels and ``up`` a 1x1 conv. LyCORIS' Tucker variant
(``lora_mid``) uses a 1x1 ``down``, a kh x kw ``mid`` core and a 1x1 ``up``; ``mid ∘ down`` is folded into one
kh x kw ``down`` here, which is exact because both are linear and ``down`` is pointwise.
"""

from __future__ import annotations

import torch

from ..delta import LayerDelta

SUFFIXES = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")


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
