"""Structural checks of the tensors one file stores for one layer, before any product is computed.

Each adapter kind (:mod:`.kinds`) calls these in its ``validate`` to say, from shapes alone, whether its tensors
form a well-defined delta and how large that delta is (``out`` rows × ``in`` flattened columns). The parser
compares that size with the layers of the loaded model before the kind computes anything (a Kronecker or
Khatri-Rao product of hostile factors could otherwise need gigabytes), and refuses with the module and the
problem named. Errors are :class:`ValueError` with a message meant for the user; the parser adds the file name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PlannedDelta:
    """What a module's tensors will become: ``ΔW`` of ``out`` × ``inputs`` (flattened in × kh × kw)."""

    out: int
    inputs: int

    @property
    def numel(self) -> int:
        return self.out * self.inputs


def factor(tensors: dict[str, torch.Tensor], key: str, ndims: tuple[int, ...] = (2,)) -> torch.Tensor:
    """``tensors[key]``, which must exist, have one of ``ndims`` dimensions and no empty axis."""
    if key not in tensors:
        present = ", ".join(sorted(tensors))
        raise ValueError(f"'{key}' is missing (the module has {present}): an incomplete adapter cannot be applied")
    value = tensors[key]
    if value.dim() not in ndims:
        wanted = " or ".join(f"{n}-D" for n in ndims)
        raise ValueError(f"'{key}' must be a {wanted} tensor, got shape {tuple(value.shape)}")
    if value.numel() == 0:
        raise ValueError(f"'{key}' has an empty axis (shape {tuple(value.shape)})")
    return value


def pair(tensors: dict[str, torch.Tensor], first: str, second: str) -> bool:
    """Whether the factor pair ``first``/``second`` is present; exactly one of them is an error."""
    has_first, has_second = first in tensors, second in tensors
    if has_first != has_second:
        given, missing = (first, second) if has_first else (second, first)
        raise ValueError(f"'{given}' has no matching '{missing}': an incomplete adapter cannot be applied")
    return has_first


def same(what: str, a: int, b: int) -> None:
    if a != b:
        raise ValueError(f"{what} disagree ({a} vs {b})")


def flat(shape: torch.Size | tuple[int, ...]) -> int:
    return int(math.prod(shape))


def alpha_value(alpha: torch.Tensor) -> float:
    """A module's ``alpha``: one finite number (a vector or an empty tensor is refused)."""
    if alpha.numel() != 1:
        raise ValueError(f"'alpha' must be a single number, got a tensor of shape {tuple(alpha.shape)}")
    value = float(alpha.reshape(()).float())
    if not math.isfinite(value):
        raise ValueError(f"'alpha' is not finite ({value})")
    return value
