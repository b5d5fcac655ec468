"""LoRA files -> exact per-layer deltas (see :mod:`.parse`).

Names load on first use (PEP 562): listing a library (:mod:`.metadata`, headers only) needs no torch.
"""

from ..lazy_exports import lazy_getattr

_LAZY = {"LayerDelta": ".delta", "LoraInfo": ".metadata", "describe": ".metadata", "ParsedLora": ".parse",
         "parse_lora": ".parse"}

__getattr__ = lazy_getattr(__name__, _LAZY)

__all__ = ["LayerDelta", "LoraInfo", "ParsedLora", "describe", "parse_lora"]
