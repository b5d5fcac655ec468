"""The strategy registry as the studio exposes it to front ends (the UI and the CLI read it from here).

Front ends list strategies and their declared parameters from this registry, never from a hard-coded list.
"""

from fusion import REGISTRY, Param, Strategy, make_strategy, strategy_class

__all__ = ["REGISTRY", "Param", "Strategy", "make_strategy", "strategy_class"]
