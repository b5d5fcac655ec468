"""LoRA Composition Studio: compose several LoRAs on one SDXL or FLUX.1 model.

Public API: :func:`compose`, :class:`Studio`, :class:`Lora`, :class:`Result`, :class:`Recipe`.
"""

__version__ = "0.1.0"

from pipelines.errors import StudioError  # noqa: E402

from .api import Result, Studio, compose  # noqa: E402
from .lora import Lora  # noqa: E402
from .recipe import Recipe  # noqa: E402

__all__ = ["Lora", "Recipe", "Result", "Studio", "StudioError", "__version__", "compose"]
