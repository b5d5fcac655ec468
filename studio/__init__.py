"""LoRA Composition Studio: compose several LoRAs on one SDXL or FLUX.1 model.

Public API: :func:`compose`, :class:`Studio`, :class:`Lora`, :class:`Result`, :class:`Recipe`.
"""

__version__ = "0.1.0"

from pipelines.errors import StudioError  # noqa: E402
from pipelines.lazy_exports import lazy_getattr  # noqa: E402

# The public names load on first use (PEP 562), so `studio library` and `studio strategies` do not pay for
# torch and diffusers: `from studio import Studio` imports studio.api only then.
_LAZY = {"Result": ".api", "Studio": ".api", "compose": ".api", "Lora": ".lora", "Recipe": ".recipe"}

__getattr__ = lazy_getattr(__name__, _LAZY)

__all__ = ["Lora", "Recipe", "Result", "Studio", "StudioError", "__version__", "compose"]
