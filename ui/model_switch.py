"""Switching the web app's model: the model it was started with, or one of the built-in tiny world models.

The choices are a fixed list made at launch (``studio ui --model M`` offers ``M``, ``tiny-sdxl`` and
``tiny-flux``): a browser cannot make the server load an arbitrary path or Hub id. The new model loads while the
old one still serves (a failed load leaves the app as it was) and under the GPU lock, so no job runs across the
switch. The stack is emptied (its LoRAs were checked against the old model), and the library filter, the
settings' defaults and the model line follow the new model.
"""

from __future__ import annotations

import gc
from typing import Any

from pipelines.errors import StudioError

from .callbacks import Callbacks

BUILT_IN = ("tiny-sdxl", "tiny-flux")


def model_choices(launch_model: str) -> list[str]:
    """The models a browser may switch to: the launch model first, then the built-in world models."""
    return list(dict.fromkeys([launch_model, *BUILT_IN]))


def switch_model(callbacks: Callbacks, name: str, choices: list[str], options: dict[str, Any]) -> str:
    """Load ``name`` (one of ``choices``) in place of the app's model; returns a status line."""
    from studio import Studio

    if name not in choices:
        raise StudioError(f"model '{str(name)[:200]}' is not offered here (choices: {', '.join(choices)})")
    if name == callbacks.studio.model:
        return f"Model {name} is already loaded."
    with callbacks.gpu:
        new = Studio(name, **options)  # the old model keeps serving if this fails
        old, callbacks.studio = callbacks.studio, new
        del old
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover - torch is a dependency
            pass
    return f"Loaded {name} ({new.family.name.upper()}); the stack was emptied."


__all__ = ["BUILT_IN", "model_choices", "switch_model"]
