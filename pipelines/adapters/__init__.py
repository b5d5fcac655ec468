"""LoRA files -> exact per-layer deltas (see :mod:`.parse`).

Names load on first use (PEP 562): listing a library (:mod:`.metadata`, headers only) needs no torch.
"""

_LAZY = {"LayerDelta": ".delta", "LoraInfo": ".metadata", "describe": ".metadata", "ParsedLora": ".parse",
         "parse_lora": ".parse"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["LayerDelta", "LoraInfo", "ParsedLora", "describe", "parse_lora"]
