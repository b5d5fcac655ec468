"""Fusion strategies: one module per strategy, registered here by name.

A new strategy is a new file with one :class:`~fusion.base.Strategy` subclass plus one line in ``_BUILTIN``.
The CLI and the UI list strategies and their parameters from this registry.
"""

from __future__ import annotations

from typing import Any, Mapping

from pipelines.errors import StrategyError

from .base import Param, RunContext, StepContext, StepPlan, Strategy
from .cat import Cat
from .clora import CLoRA
from .cmlora import CMLoRA
from .composite import Composite
from .dare import Dare
from .gated import Gated
from .klora import KLora
from .lego import Lego
from .mcdropout import MCDropout, MCDropoutRuntime
from .merge import Merge
from .qr import QRMerge
from .regional import Regional
from .svd import SVD
from .switch import Switch
from .ties import Ties
from .weightspace import WeightMerge, merge_stack

_BUILTIN: tuple[type[Strategy], ...] = (Merge, Switch, Composite, CMLoRA, Gated, QRMerge, Cat, SVD, Ties, Dare,
                                        KLora, Lego, MCDropout, MCDropoutRuntime, Regional, CLoRA)

REGISTRY: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Add a strategy class to the registry (usable as a decorator)."""
    if not cls.name:
        raise ValueError("a strategy needs a name")
    REGISTRY[cls.name] = cls
    return cls


for _cls in _BUILTIN:
    register(_cls)


def strategy_class(name: str) -> type[Strategy]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise StrategyError(f"unknown strategy '{name}'; available: {', '.join(REGISTRY)}") from None


def make_strategy(name: str, params: Mapping[str, Any] | None = None) -> Strategy:
    return strategy_class(name)(**dict(params or {}))


__all__ = [
    "Param", "REGISTRY", "RunContext", "StepContext", "StepPlan", "Strategy", "WeightMerge",
    "make_strategy", "merge_stack", "register", "strategy_class",
]
