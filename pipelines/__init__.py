"""Model side of the studio: pipeline loading, LoRA file parsing, composed layers and the denoising seam.

Never imports :mod:`fusion` or :mod:`studio` (the layers point one way: ui -> studio -> fusion -> pipelines).
"""

from .errors import (
    IncompatibleLoraError,
    LoraFileError,
    ModelLoadError,
    OutOfMemoryError,
    RecipeError,
    StrategyError,
    StudioError,
)
from .lazy_exports import lazy_getattr

# The torch-backed names load on first use (PEP 562): importing pipelines.errors for a listing command must
# not import torch and diffusers.
_LAZY = {"Composer": ".composer", "FAMILIES": ".families", "FLUX": ".families", "SDXL": ".families",
         "Family": ".families", "DEFAULT_MODEL": ".loading", "load_pipeline": ".loading", "MixState": ".mix_state",
         "DenoiserSeam": ".seam", "StepPlan": ".seam"}

__getattr__ = lazy_getattr(__name__, _LAZY)

__all__ = [
    "Composer", "DEFAULT_MODEL", "DenoiserSeam", "FAMILIES", "FLUX", "Family", "IncompatibleLoraError",
    "LoraFileError", "MixState", "ModelLoadError", "OutOfMemoryError", "RecipeError", "SDXL", "StepPlan",
    "StrategyError", "StudioError", "load_pipeline",
]
