"""Errors the studio raises for bad input.

Every error names the offending file (or value) and says what is wrong with it, so the CLI and the UI can
show it as is. All of them derive from :class:`StudioError`; anything else escaping the studio is a bug.
"""

from __future__ import annotations

from pathlib import Path


class StudioError(Exception):
    """Base class of every user-facing error of the studio."""


class LoraFileError(StudioError):
    """A LoRA file that cannot be read: missing, corrupt, truncated, pickled or holding non-finite numbers."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class IncompatibleLoraError(StudioError):
    """A readable LoRA that does not fit the loaded model (another base model, no matching keys, bad shapes)."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ModelLoadError(StudioError):
    """A model that cannot be loaded (unknown name, unsupported architecture, unsafe file)."""


class StrategyError(StudioError):
    """Unknown strategy, unknown parameter or a parameter value of the wrong type or range."""


class RecipeError(StudioError):
    """A recipe (TOML, PNG chunk or A1111 parameters) that cannot be parsed or reproduced."""


class OutOfMemoryError(StudioError):
    """The accelerator ran out of memory; nothing was changed and the pipeline is usable again."""
