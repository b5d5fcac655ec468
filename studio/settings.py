"""One validation and one source of defaults for every render setting, shared by the API, CLI, batch, recipes
and the web app.

**Validation** (:func:`check_settings`) runs before any model loads: a value of the wrong type, a non-finite
number or one outside the :class:`Limits` is refused with a :class:`SettingsError` naming the setting, the
value and the allowed range, so ``steps=10**9``, ``width=height=65536``, ``guidance=nan``, ``seed=1e30``,
``scheduler=5``, ``prompt=123`` or ``strategy_params="abc"`` end in one clear message, never after seconds of
loading, never in a raw exception. Checks that need the loaded model (a size that is a multiple of its VAE
factor, a scheduler compatible with the pipeline) run in :meth:`studio.Studio.compose`.

**Limits** (:class:`Limits`) bound the work one request may cause: ``max_steps`` (default 1000), ``max_side``
(4096 px) and ``max_pixels`` (2048 × 2048: the activations of SDXL and FLUX grow with the pixel count, and
4 MP is four times their native 1 MP), ``max_count`` images per call and ``max_prompt_chars``. The CLI raises
them with ``--max-steps`` / ``--max-size``; Python callers pass ``Studio(..., limits=Limits(...))``.

**Defaults** (:func:`render_defaults`): what a setting left out means, per model, from one place: the model
folder's ``studio_defaults.json`` (the tiny world ships one: 25 steps, guidance 4.0 for tiny-sdxl, 3.5 for
tiny-flux, 64 px), else the family's (SDXL: 30 steps, guidance 5.0; FLUX.1: 28 steps, guidance 3.5), and the
size from the model. The CLI's progress bar, the web app's initial values and ``Studio.compose`` all read it.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Mapping

from pipelines.errors import StudioError

SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes unsigned 64-bit seeds
GUIDANCE_MAX = 100.0


class SettingsError(StudioError):
    """A render setting of the wrong type or outside its range; the message names the setting."""


@dataclass(frozen=True)
class Limits:
    """How much work one render request may ask for (see the module docstring for the reasons)."""

    max_steps: int = 1000
    max_side: int = 4096
    max_pixels: int = 2048 * 2048
    max_count: int = 100
    max_prompt_chars: int = 20_000

    @classmethod
    def from_options(cls, max_steps: int | None = None, max_size: int | None = None) -> "Limits":
        """The CLI's ``--max-steps`` / ``--max-size`` (largest side; the pixel cap becomes its square)."""
        limits = cls()
        if max_steps is not None:
            if max_steps < 1:
                raise SettingsError(f"--max-steps must be at least 1, got {max_steps}")
            limits = cls(max_steps=max_steps, max_side=limits.max_side, max_pixels=limits.max_pixels,
                         max_count=limits.max_count, max_prompt_chars=limits.max_prompt_chars)
        if max_size is not None:
            if max_size < 8:
                raise SettingsError(f"--max-size must be at least 8 pixels, got {max_size}")
            limits = cls(max_steps=limits.max_steps, max_side=max_size, max_pixels=max_size * max_size,
                         max_count=limits.max_count, max_prompt_chars=limits.max_prompt_chars)
        return limits


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class RenderDefaults:
    """What ``steps``, ``guidance`` and the size mean when left out, for one model."""

    steps: int
    guidance: float
    width: int
    height: int
    source: str  # where they come from, shown by the front ends ("studio_defaults.json of tiny-sdxl", ...)


def render_defaults(model: str, family, *, size: int, shipped: Mapping[str, Any] | None = None) -> RenderDefaults:
    """The defaults of ``model``: its ``studio_defaults.json`` (``shipped``) where it has one, else ``family``'s;
    ``size`` is the model's native size (the caller reads it from the loaded pipeline)."""
    shipped = dict(shipped or {})
    steps = shipped.get("steps", family.default_steps)
    guidance = shipped.get("guidance", family.default_guidance)
    source = f"studio_defaults.json of {model}" if shipped else f"{family.name.upper()} family defaults"
    return RenderDefaults(steps=int(steps), guidance=float(guidance), width=int(size), height=int(size),
                          source=source)


# ------------------------------------------------------------------------------------------------ checks
def _whole(name: str, value: Any, low: int, high: int | None, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
        raise SettingsError(f"{name} must be a whole number, got {_show(value)}")
    try:
        number = int(value) if isinstance(value, numbers.Integral) else float(value)
    except ValueError:
        raise SettingsError(f"{name} must be a whole number, got {_show(value)}") from None
    if isinstance(number, float) and (not math.isfinite(number) or not number.is_integer()):
        raise SettingsError(f"{name} must be a whole number, got {_show(value)}")
    number = int(number)
    if number < low or (high is not None and number > high):
        upper = f" and at most {high}" if high is not None else ""
        raise SettingsError(f"{name} must be at least {low}{upper}, got {_show(value)}{hint}")
    return number


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _text(name: str, value: Any, limit: int | None) -> str:
    if not isinstance(value, str):
        raise SettingsError(f"{name} must be text, got {type(value).__name__} {_show(value)}")
    if limit is not None and len(value) > limit:
        raise SettingsError(f"{name} has {len(value)} characters; at most {limit} are accepted")
    return value


def check_guidance(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
        raise SettingsError(f"guidance must be a number, got {_show(value)}")
    try:
        number = float(value)
    except ValueError:
        raise SettingsError(f"guidance must be a number, got {_show(value)}") from None
    if not math.isfinite(number) or not 0.0 <= number <= GUIDANCE_MAX:
        raise SettingsError(f"guidance must be a finite number from 0 to {GUIDANCE_MAX:g}, got {_show(value)}")
    return number


def check_scheduler(value: Any) -> str:
    """A diffusers scheduler class name (compatibility with the loaded pipeline is checked when it renders)."""
    name = _text("scheduler", value, 100)
    import diffusers

    cls = getattr(diffusers, name, None) if name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise SettingsError(f"scheduler {_show(name)} is not a diffusers scheduler class "
                            "(e.g. EulerDiscreteScheduler, DPMSolverMultistepScheduler)")
    return name


def check_strategy(strategy: Any, params: Any) -> None:
    """A registered strategy name and a table of its parameters (each checked by the strategy's declaration)."""
    from fusion import make_strategy

    check_strategy_types(strategy, params)
    make_strategy(strategy, params)  # StrategyError: unknown name or parameter, wrong type, NaN/inf, range


def check_strategy_types(strategy: Any, params: Any) -> None:
    """A strategy name (text) and parameters (a table of numbers, text or booleans), registry not consulted."""
    if not isinstance(strategy, str):
        raise SettingsError(f"strategy must be a name, got {type(strategy).__name__} {_show(strategy)}")
    if len(strategy) > 100:
        raise SettingsError(f"strategy name {_show(strategy)} is too long")
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise SettingsError(f"strategy parameters must be a table of name = value, got {_show(params)}")
    for key, value in params.items():
        if not isinstance(key, str):
            raise SettingsError(f"strategy parameter names must be text, got {_show(key)}")
        if not isinstance(value, (str, numbers.Real, bool)):
            raise SettingsError(f"strategy parameter '{key}' must be a number, text or true/false, got {_show(value)}")


def check_blocks(blocks: Any, label: str = "LoRA") -> None:
    """A per-block weight spec: a preset name / ``"block=weight,..."`` text, or a table of finite numbers."""
    if blocks is None or isinstance(blocks, str):
        return
    if not isinstance(blocks, Mapping):
        raise SettingsError(f"{label}: blocks must be a preset name, 'block=weight,...' text or a table, "
                            f"got {type(blocks).__name__} {_show(blocks)}")
    for key, value in blocks.items():
        if not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, numbers.Real) \
                or not math.isfinite(float(value)):
            raise SettingsError(f"{label}: block weight {_show(key)} = {_show(value)} must be a finite number")


def check_settings(
    *,
    prompt: Any = None,
    negative_prompt: Any = None,
    steps: Any = None,
    guidance: Any = None,
    width: Any = None,
    height: Any = None,
    seed: Any = None,
    count: Any = None,
    scheduler: Any = None,
    strategy: Any = None,
    strategy_params: Any = None,
    strength: Any = None,
    limits: Limits | None = DEFAULT_LIMITS,
) -> dict[str, Any]:
    """Check the given settings (``None`` means "the default", which is always valid) and return them
    normalised (whole numbers as ``int``, guidance as ``float``). ``limits=None`` checks types and basic ranges
    but no work limits (for reading a recipe before the caller's limits are known).

    Raises :class:`SettingsError` (or :class:`~pipelines.errors.StrategyError`) naming the setting.
    """
    lim = limits or Limits(max_steps=10**9, max_side=10**9, max_pixels=10**18, max_count=10**9,
                           max_prompt_chars=10**9)
    out: dict[str, Any] = {}
    if prompt is not None:
        out["prompt"] = _text("prompt", prompt, lim.max_prompt_chars)
    if negative_prompt is not None:
        out["negative_prompt"] = _text("negative prompt", negative_prompt, lim.max_prompt_chars)
    if steps is not None:
        out["steps"] = _whole("steps", steps, 1, lim.max_steps,
                              " (raise the limit with --max-steps)" if limits is not None else "")
    if guidance is not None:
        out["guidance"] = check_guidance(guidance)
    hint = " (raise the limit with --max-size)" if limits is not None else ""
    for name, value in (("width", width), ("height", height)):
        if value is not None:
            out[name] = _whole(name, value, 8, lim.max_side, hint)
    if "width" in out and "height" in out and out["width"] * out["height"] > lim.max_pixels:
        raise SettingsError(f"{out['width']}x{out['height']} is {out['width'] * out['height']} pixels; at most "
                            f"{lim.max_pixels} are allowed{hint}")
    if count is not None:
        out["count"] = _whole("count", count, 1, lim.max_count)
    if seed is not None:
        out["seed"] = _whole("seed", seed, 0, SEED_MAX)
        if out["seed"] + out.get("count", 1) - 1 > SEED_MAX:
            raise SettingsError(f"seed {out['seed']} + {out['count']} images runs past the largest seed {SEED_MAX}")
    if scheduler is not None:
        out["scheduler"] = check_scheduler(scheduler)
    if strength is not None:
        out["strength"] = check_strength(strength)
    if strategy is not None or strategy_params is not None:
        check_strategy("merge" if strategy is None else strategy, strategy_params)
    return out


def check_strength(value: Any) -> float:
    """img2img / inpainting ``strength``: a finite number in (0, 1] (:func:`pipelines.mode_inputs.check_strength`)."""
    from pipelines.mode_inputs import ModeInputError
    from pipelines.mode_inputs import check_strength as check

    try:
        return check(value)
    except ModeInputError as e:
        raise SettingsError(str(e)) from None


def check_number(name: str, value: Any, low: float | None = None, high: float | None = None) -> float:
    """A finite number (not a boolean) within ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise SettingsError(f"{name} must be a finite number, got {_show(value)}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise SettingsError(f"{name} must be from {low:g} to {high:g}, got {_show(value)}")
    return float(value)
