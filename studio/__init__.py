"""LoRA Composition Studio: compose several LoRAs on one SDXL or FLUX.1 model.

Public API: :func:`compose`, :class:`Studio`, :class:`Lora`, :class:`Result`, :class:`Recipe`.
"""

__version__ = "0.1.0"

from pipelines.errors import StudioError  # noqa: E402

# The public names load on first use (PEP 562), so `studio library` and `studio strategies` do not pay for
# torch and diffusers: `from studio import Studio` imports studio.api only then.
_LAZY = {"Result": ".api", "Studio": ".api", "compose": ".api", "Lora": ".lora", "Recipe": ".recipe"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Lora", "Recipe", "Result", "Studio", "StudioError", "__version__", "compose"]
