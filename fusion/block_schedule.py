"""Training-free gates: each LoRA's gain per denoiser block as a function of denoising progress.

A schedule is a table per LoRA *role* (or per LoRA name, or stack index): block selectors mapped to a gain or
to keyframes ``[[progress, gain], ...]`` (piecewise linear, constant beyond the ends). Selectors are the
family's block names, groups and ranges (``down.2``, ``up``, ``double.0-9``, ...) plus two depth groups:

* ``deep``: the middle of the denoiser (SDXL: the last down block, ``mid``, the first up block; FLUX: the middle
  half of the dual- and single-stream blocks in execution order);
* ``outer``: the rest of the denoiser blocks.

Selectors apply in the order written (put broad ones first); blocks not named keep gain 1; text encoders and
the embedders (``other``) are never scheduled. Written as TOML::

    [subject]                                   # a role, a LoRA name, or a stack index ("0")
    outer = 0.7
    deep = [[0.0, 1.0], [0.5, 1.0], [1.0, 0.5]]   # strong in the deep blocks early, fading late
    [style]
    deep = 0.3
    outer = [[0.0, 0.3], [0.5, 1.0]]              # the outer blocks take over in the second half

The presets follow the block-wise findings that content lives in the deep, low-resolution blocks and style in
the outer, high-resolution ones (B-LoRA, Frenkel et al. 2024) and that structure forms early in denoising while
texture forms late. ``neutral`` (gain 1 everywhere) is always available as a role.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from pipelines.errors import StrategyError, StudioError
from pipelines.families import FAMILIES, Family, blocks_matching

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "flat": {"subject": {}, "style": {}},
    "subject-deep-early": {
        "subject": {"outer": 0.7, "deep": [[0.0, 1.0], [0.5, 1.0], [1.0, 0.5]]},
        "style": {"deep": 0.3, "outer": [[0.0, 0.3], [0.5, 1.0]]},
    },
    "b-lora": {
        "subject": {"outer": 0.0, "deep": 1.0},
        "style": {"deep": 0.0, "outer": 1.0},
    },
}
NEUTRAL = "neutral"


@dataclass(frozen=True)
class Curve:
    """A gain over progress: keyframes ``(progress, gain)``, linear in between, constant outside."""

    points: tuple[tuple[float, float], ...]

    def __call__(self, progress: float) -> float:
        xs, ys = zip(*self.points)
        return float(np.interp(progress, xs, ys))

    @classmethod
    def parse(cls, value: Any, where: str) -> "Curve":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            points = ((0.0, float(value)),)
        elif isinstance(value, (list, tuple)) and value and all(
                isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
            try:
                points = tuple((float(p), float(g)) for p, g in value)
            except (TypeError, ValueError):
                raise StrategyError(f"{where}: keyframes must be numbers, got {value!r}") from None
        else:
            raise StrategyError(f"{where}: expected a gain or keyframes [[progress, gain], ...], got {value!r}")
        if any(not math.isfinite(x) for pt in points for x in pt):
            raise StrategyError(f"{where}: keyframes must be finite, got {value!r}")
        if any(not 0.0 <= p <= 1.0 for p, _ in points):
            raise StrategyError(f"{where}: keyframe progress must lie in [0, 1], got {value!r}")
        if any(b[0] <= a[0] for a, b in zip(points, points[1:])):
            raise StrategyError(f"{where}: keyframe progress must increase, got {value!r}")
        return cls(points)


def depth_groups(family: Family, blocks: list[str]) -> dict[str, list[str]]:
    """``deep`` and ``outer`` denoiser blocks of a model (see the module docstring)."""
    denoiser = [b for b in blocks if not b.startswith("te") and b != "other"]
    if family.name == "sdxl":
        downs = [b for b in denoiser if b.startswith("down.")]
        ups = [b for b in denoiser if b.startswith("up.")]
        deep = [*downs[-1:], *(["mid"] if "mid" in denoiser else []), *ups[:1]]
    else:
        quarter = len(denoiser) // 4
        deep = denoiser[quarter:len(denoiser) - quarter]
    return {"deep": deep, "outer": [b for b in denoiser if b not in deep]}


class BlockSchedule:
    """Tables of curves per role / LoRA name / stack index, from a preset, a TOML file or a dict."""

    def __init__(self, tables: Mapping[str, Mapping[str, Any]], source: str = "<dict>"):
        if not isinstance(tables, Mapping):
            raise StrategyError(f"{source}: a schedule maps roles to tables of block gains")
        self.source = source
        self.tables: dict[str, list[tuple[str, Curve]]] = {}
        for role, table in tables.items():
            if not isinstance(table, Mapping):
                raise StrategyError(f"{source}: [{role}] must be a table of block = gain entries")
            self.tables[str(role)] = [(str(sel), Curve.parse(v, f"{source}: [{role}] {sel}"))
                                      for sel, v in table.items()]
        self.tables.setdefault(NEUTRAL, [])

    @classmethod
    def load(cls, spec: str) -> "BlockSchedule":
        """A preset name or the path of a TOML file."""
        if spec in PRESETS:
            return cls(PRESETS[spec], source=f"preset '{spec}'")
        path = Path(spec).expanduser()
        if path.suffix.lower() != ".toml":
            raise StrategyError(f"unknown schedule '{spec}': give a preset ({', '.join(PRESETS)}) or a .toml file")
        try:
            tables = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise StrategyError(f"{path}: cannot read the schedule ({e.strerror or e})") from None
        except tomllib.TOMLDecodeError as e:
            raise StrategyError(f"{path}: not valid TOML ({e})") from None
        return cls(tables, source=str(path))

    def bind(self, family_name: str, blocks: list[str], candidates: list[list[str]]) -> "BoundSchedule":
        """Resolve the tables for K LoRAs; LoRA k uses the first of ``candidates[k]`` that has a table."""
        family = FAMILIES[family_name]
        groups = depth_groups(family, blocks)
        allowed = {b for group in groups.values() for b in group}
        index = {b: i for i, b in enumerate(blocks)}
        per_lora = []
        for keys in candidates:
            table = next((self.tables[k] for k in keys if k in self.tables), None)
            if table is None:
                raise StrategyError(f"schedule {self.source} has no table for {' / '.join(map(repr, keys))}; "
                                    f"it has: {', '.join(self.tables)}")
            entries = []
            for selector, curve in table:
                try:
                    chosen = groups[selector] if selector in groups else blocks_matching(family, blocks, selector)
                except StudioError as e:
                    raise StrategyError(f"schedule {self.source}: {e}") from None
                rows = [index[b] for b in chosen if b in allowed]
                if not rows:
                    raise StrategyError(f"schedule {self.source}: '{selector}' names no denoiser block "
                                        "(text encoders and embedders are not scheduled)")
                entries.append((rows, curve))
            per_lora.append(entries)
        return BoundSchedule(len(blocks), per_lora)


class BoundSchedule:
    """``gains(progress) -> [blocks, K]`` for one stack on one model."""

    def __init__(self, blocks: int, per_lora: list[list[tuple[list[int], Curve]]]):
        self.blocks = blocks
        self.per_lora = per_lora

    def gains(self, progress: float) -> torch.Tensor:
        out = torch.ones(self.blocks, len(self.per_lora))
        for k, entries in enumerate(self.per_lora):
            for rows, curve in entries:
                out[rows, k] = curve(progress)
        return out
