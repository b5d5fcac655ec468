"""Strategy choices and parameter controls, generated from the strategy registry.

Nothing here knows a strategy by name: the dropdown lists the strategy registry (``studio.strategies.REGISTRY``) and every control comes from a
strategy's declared ``Param`` (name, default, type, range, choices, help), so a strategy that
registers itself appears in the app with its controls and nothing in ``ui/`` changes.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import gradio as gr

from studio.strategies import REGISTRY, Param, strategy_class

# a slider needs a range; an integer range wider than this is clearer as a number box
_MAX_INT_SLIDER_SPAN = 1000


def strategy_names() -> list[str]:
    return list(REGISTRY)


def strategy_label(name: str) -> str:
    cls = strategy_class(name)
    return f"**{cls.name}**: {cls.summary}" + (f"  \n*{cls.citation}*" if cls.citation else "")


def params_of(name: str) -> tuple[Param, ...]:
    return tuple(strategy_class(name).params)


def defaults(name: str) -> dict[str, Any]:
    return {p.name: p.default for p in params_of(name)}


def values_for(name: str, store: Mapping[str, Mapping[str, Any]] | None) -> dict[str, Any]:
    """The current values of ``name``'s parameters: the user's edits over the declared defaults."""
    values = defaults(name)
    edited = (store or {}).get(name, {})
    values.update({k: v for k, v in edited.items() if k in values})
    return values


def parse_value(strategy: str, param_name: str, value: Any) -> Any:
    """Validate a value typed into a control with the parameter's own rules (raises ``StrategyError``)."""
    params = {p.name: p for p in params_of(strategy)}
    if param_name not in params:
        from studio import StudioError

        raise StudioError(f"strategy '{strategy}' has no parameter '{param_name}'")
    param = params[param_name]
    if param.type is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    return param.parse(value)


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def control(param: Param, value: Any, key: str | None = None) -> gr.components.Component:
    """The Gradio control for one declared parameter."""
    common = dict(label=param.name, info=param.help, key=key, interactive=True, elem_classes=["strategy-param"])
    if param.choices is not None:
        return gr.Dropdown(choices=list(param.choices), value=value, **common)
    if param.type is bool:
        return gr.Checkbox(value=bool(value), **common)
    if param.type in (int, float):
        bounded = _finite(param.min) and _finite(param.max)
        if bounded and (param.type is float or param.max - param.min <= _MAX_INT_SLIDER_SPAN):
            step = 1 if param.type is int else _float_step(param.min, param.max)
            return gr.Slider(minimum=param.min, maximum=param.max, step=step, value=value, **common)
        return gr.Number(value=value, precision=0 if param.type is int else None, minimum=param.min,
                         maximum=param.max, **common)
    return gr.Textbox(value="" if value is None else str(value), **common)


def _float_step(lo: float, hi: float) -> float:
    span = hi - lo
    return 10 ** math.floor(math.log10(span / 100)) if span > 0 else 0.01
