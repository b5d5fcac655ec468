"""The strategy protocol: how a fusion strategy tells the denoiser what to run at each step.

A strategy sees the stack of K LoRAs in the user's order and answers three questions:

* ``text_lanes(weights) -> [T, K]``: the text-encoder gains to encode the prompt with (one row per distinct
  text conditioning the strategy will need);
* ``plan(ctx) -> StepPlan``: for denoising step ``ctx.step``, the lanes to run (``gains[L, K]``), the weights
  that reduce the L predictions to one, and which text lane each denoiser lane uses;
* optionally ``lane_prompts(prompt) -> [T]``: a prompt per text lane (regional composition), else one prompt;
* optionally ``prepare(run)``: one-off work before the first step (profiling, caches, attaching gates), and
  ``finish(run)``: undo what ``prepare`` attached (called even when rendering fails). A strategy that fuses
  the stack into new adapters (weight-space merges) attaches them through ``run.composer`` and sets
  ``run.stack`` to their names; ``plan`` and ``text_lanes`` then address those columns instead of the K LoRAs.

What a strategy measures about a run (e.g. the interference between LoRAs before and after an orthogonal merge)
goes into ``strategy.info``; the studio returns it as ``Result.strategy_info``. The masks of a regional render
(``strategy.region_masks``: lane label -> ``[h, w]`` map on the denoiser's grid) come back as ``Result.region_masks``.

``ctx.weights`` already holds each LoRA's weight at this step (0 outside its step window); per-block weights
are applied inside the layers. Like k-diffusion's samplers, each strategy is a short class with the paper's
rule visible in ``plan``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from pipelines.errors import StrategyError
from pipelines.seam import StepPlan

__all__ = ["Param", "RunContext", "StepContext", "StepPlan", "Strategy"]


@dataclass(frozen=True)
class Param:
    """A declared strategy parameter: name, default (from the paper that introduced it), type and range."""

    name: str
    default: Any
    help: str
    type: type = float
    min: float | None = None
    max: float | None = None
    choices: tuple | None = None

    def parse(self, value: Any) -> Any:
        try:
            if self.type is bool and isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(value)
                out = value.lower() in ("1", "true", "yes", "on")
            elif self.type is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            else:
                out = self.type(value)
        except (TypeError, ValueError):
            raise StrategyError(f"parameter '{self.name}' expects {self.type.__name__}, got {value!r}") from None
        if isinstance(out, float) and (out != out or out in (float("inf"), float("-inf"))):
            raise StrategyError(f"parameter '{self.name}' must be a finite number, got {value!r}")
        if self.min is not None and out < self.min:
            raise StrategyError(f"parameter '{self.name}' must be >= {self.min}, got {out}")
        if self.max is not None and out > self.max:
            raise StrategyError(f"parameter '{self.name}' must be <= {self.max}, got {out}")
        if self.choices is not None and out not in self.choices:
            raise StrategyError(f"parameter '{self.name}' must be one of {self.choices}, got {out!r}")
        return out


@dataclass
class StepContext:
    step: int
    num_steps: int
    weights: torch.Tensor  # [K]: each LoRA's weight at this step

    @property
    def progress(self) -> float:
        return self.step / max(self.num_steps, 1)


@dataclass
class RunContext:
    """What ``prepare`` may use: the stack, the pipeline, and a way to render with a sub-stack.

    ``render(weights[K], *, steps=None, prompt=None, seed=None)`` renders one image with the LoRAs at
    ``weights`` (stack space; 0 leaves a LoRA out) at the run's size, guidance and negative prompt, and returns
    it as a float array ``[H, W, 3]`` in [0, 1]. ``hashes`` are the LoRA files' SHA-256 (``None`` for in-memory
    state dicts), ``model`` the model id the studio loaded, ``cache_dir`` where strategies may keep derived
    data (profiles, scores) between runs, ``settings`` what ``render`` renders with (for cache keys).
    """

    names: list[str]
    weights: torch.Tensor
    num_steps: int
    family: str
    pipe: Any = None
    composer: Any = None
    sources: list[str] = field(default_factory=list)
    render: Callable[..., Any] | None = None
    seam: Any = None
    model: str = ""
    hashes: list[str | None] = field(default_factory=list)
    cache_dir: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # width, height, guidance, (negative_)prompt of render
    step_weights: torch.Tensor | None = None  # [num_steps, K]: each LoRA's weight at each step (0 outside window)
    stack: list[str] | None = None  # the adapter columns plan() addresses; prepare() may replace it
    regions: list[str | None] = field(default_factory=list)  # per LoRA: its region (fusion.region_masks) or None
    region_prompts: list[str | None] = field(default_factory=list)  # per LoRA: its region prompt or None

    def __post_init__(self):
        if self.stack is None:
            self.stack = list(self.names)
        if self.step_weights is None:
            self.step_weights = self.weights[None].repeat(max(self.num_steps, 1), 1)


class Strategy:
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    citation: ClassVar[str] = ""
    params: ClassVar[tuple[Param, ...]] = ()
    max_loras: ClassVar[int | None] = None  # a strategy defined for a fixed number of LoRAs says how many
    uses_regions: ClassVar[bool] = False  # only a strategy that reads LoRAs' regions may be given a stack with them

    def __init__(self, **values: Any):
        known = {p.name: p for p in self.params}
        unknown = sorted(set(values) - set(known))
        if unknown:
            valid = ", ".join(known) or "none"
            raise StrategyError(f"strategy '{self.name}' has no parameter {', '.join(map(repr, unknown))} (valid: {valid})")
        self.values = {p.name: p.parse(values.get(p.name, p.default)) for p in self.params}
        self.info: dict[str, Any] = {}
        # masks a regional render used, for the user to see (Result.region_masks): lane label -> [h, w] in [0, 1]
        self.region_masks: dict[str, torch.Tensor] = {}

    def __getattr__(self, item: str) -> Any:
        values = self.__dict__.get("values", {})
        if item in values:
            return values[item]
        raise AttributeError(item)

    def prepare(self, run: RunContext) -> None:
        """One-off work before the first step; nothing by default."""

    def finish(self, run: RunContext) -> None:
        """Undo what :meth:`prepare` attached to the pipeline; nothing by default."""

    def text_lanes(self, weights: torch.Tensor) -> torch.Tensor:
        """Text-encoder gains ``[T, K]``; by default every LoRA at its weight (one lane)."""
        return weights[None].clone()

    def lane_prompts(self, prompt: str) -> list[str] | None:
        """One prompt per text lane (rows of :meth:`text_lanes`), or ``None``: every lane uses ``prompt``."""
        return None

    def plan(self, ctx: StepContext) -> StepPlan:
        raise NotImplementedError


def one_lane(gains: torch.Tensor, text_lane: int = 0) -> StepPlan:
    """A single lane with ``gains[K]``."""
    return StepPlan(gains=gains[None].clone(), weights=torch.ones(1), text_lanes=[text_lane])
