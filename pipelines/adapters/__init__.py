"""LoRA files -> exact per-layer deltas (see :mod:`.parse`)."""

from .delta import LayerDelta
from .metadata import LoraInfo, describe
from .parse import ParsedLora, parse_lora

__all__ = ["LayerDelta", "LoraInfo", "ParsedLora", "describe", "parse_lora"]
