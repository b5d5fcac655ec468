"""Package attributes that import their module on first use (PEP 562), so light commands (`studio library`,
`studio strategies`) never pay for torch and diffusers just by importing a package."""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def lazy_getattr(package: str, table: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``table`` maps a public name to the relative module defining it;
    the first access imports that module and caches the value on the package."""

    def __getattr__(name: str) -> Any:
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(table[name], package), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
