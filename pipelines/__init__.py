"""Model side of the studio: pipeline loading, LoRA file parsing, composed layers and the denoising seam.

Never imports :mod:`fusion` or :mod:`studio` (the layers point one way: ui -> studio -> fusion -> pipelines).
"""

from .composer import Composer
from .errors import (
    IncompatibleLoraError,
    LoraFileError,
    ModelLoadError,
    OutOfMemoryError,
    RecipeError,
    StrategyError,
    StudioError,
)
from .families import FAMILIES, FLUX, SDXL, Family
from .loading import DEFAULT_MODEL, load_pipeline
from .mix_state import MixState
from .seam import DenoiserSeam, StepPlan

__all__ = [
    "Composer", "DEFAULT_MODEL", "DenoiserSeam", "FAMILIES", "FLUX", "Family", "IncompatibleLoraError",
    "LoraFileError", "MixState", "ModelLoadError", "OutOfMemoryError", "RecipeError", "SDXL", "StepPlan",
    "StrategyError", "StudioError", "load_pipeline",
]
