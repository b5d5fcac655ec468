"""`LayerDelta`: one adapter's exact update to one layer, in the cheapest exact form.

Every adapter kind the studio reads (LoRA/LoCon, LoHa, LoKr, full diffs, each optionally with DoRA) becomes a
``LayerDelta`` on each layer it touches:

* low-rank: ``ΔW = scale · up @ down`` with ``down`` (r × in [× kh × kw]) and ``up`` (out × r). LoHa and LoKr
  become low-rank too when their exact rank (r1·r2 for LoHa, rank(w1)·rank(w2) for LoKr) makes that cheaper
  than a dense matrix, which is the common case;
* dense: ``ΔW = scale · dense`` otherwise;
* an optional bias delta, and an optional DoRA magnitude (weight decomposition, Liu et al. 2024) that the
  composed layer resolves against the base weight when it is attached.

The composed layer concatenates the low-rank deltas of all adapters on a layer into one branch
(see :mod:`pipelines.composed`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class LayerDelta:
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    dense: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    scale: float = 1.0
    magnitude: torch.Tensor | None = None  # DoRA m, one value per output row or per input column
    magnitude_axis: str = "out"  # "out": norm over each output row (PEFT, LyCORIS default); "in": per column
    kind: str = "lora"

    def __post_init__(self):
        if (self.down is None) != (self.up is None):
            raise ValueError("a low-rank delta needs both down and up")
        if self.down is None and self.dense is None and self.bias is None:
            raise ValueError("empty delta")
        problem = self._shape_problem()
        if problem:
            raise ValueError(problem)

    def _shape_problem(self) -> str | None:
        """Why the parts cannot form one delta (ranks or row counts disagree), from shapes alone."""
        if self.down is not None:
            if self.down.dim() not in (2, 4) or self.up.dim() != 2 or 0 in self.down.shape or 0 in self.up.shape:
                return f"low-rank factors of shapes {tuple(self.up.shape)} @ {tuple(self.down.shape)} are malformed"
            if self.up.shape[1] != self.down.shape[0]:
                return (f"the up factor has rank {self.up.shape[1]} but the down factor has rank "
                        f"{self.down.shape[0]} (shapes {tuple(self.up.shape)} and {tuple(self.down.shape)})")
        if self.dense is not None and (self.dense.dim() not in (2, 4) or 0 in self.dense.shape):
            return f"a dense delta must be a non-empty 2-D or 4-D tensor, got shape {tuple(self.dense.shape)}"
        if self.bias is not None:
            if self.bias.dim() != 1:
                return f"a bias delta must be 1-D, got shape {tuple(self.bias.shape)}"
            rows = self.up.shape[0] if self.up is not None else (self.dense.shape[0] if self.dense is not None else None)
            if rows is not None and self.bias.shape[0] != rows:
                return f"the bias delta has {self.bias.shape[0]} values for {rows} output rows"
        return None

    @property
    def is_low_rank(self) -> bool:
        return self.down is not None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0]) if self.down is not None else 0

    @property
    def out_features(self) -> int:
        if self.up is not None:
            return int(self.up.shape[0])
        if self.dense is not None:
            return int(self.dense.shape[0])
        return int(self.bias.shape[0])

    @property
    def in_features(self) -> int | None:
        if self.down is not None:
            return int(self.down.shape[1])
        if self.dense is not None:
            return int(self.dense.shape[1])
        return None

    def weight(self, kernel_shape: tuple[int, ...] | None = None) -> torch.Tensor | None:
        """The dense ``ΔW`` (scale applied, DoRA not applied), in float32.

        ``kernel_shape`` is the base conv weight's shape; low-rank conv deltas built from a 1x1 ``up`` and a
        kh x kw ``down`` come out in that shape.
        """
        if self.down is not None:
            down = self.down.float()
            up = self.up.float().reshape(self.up.shape[0], -1)
            w = up @ down.reshape(down.shape[0], -1)
            w = w.reshape(up.shape[0], *down.shape[1:])
        elif self.dense is not None:
            w = self.dense.float()
        else:
            return None
        if kernel_shape is not None and w.dim() != len(kernel_shape):
            w = w.reshape(kernel_shape)
        return w * self.scale

    def select_rows(self, index: torch.Tensor | slice) -> "LayerDelta":
        """The part of this delta that lands on output rows ``index`` (for fused source layers, e.g. qkv)."""
        return replace(
            self,
            up=self.up[index] if self.up is not None else None,
            dense=self.dense[index] if self.dense is not None else None,
            bias=self.bias[index] if self.bias is not None else None,
            magnitude=(
                self.magnitude.reshape(-1)[index]
                if self.magnitude is not None and self.magnitude_axis == "out"
                else self.magnitude
            ),
        )

    def to(self, device=None, dtype=None) -> "LayerDelta":
        def move(t):
            return None if t is None else t.to(device=device, dtype=dtype)

        return replace(
            self,
            down=move(self.down),
            up=move(self.up),
            dense=move(self.dense),
            bias=move(self.bias),
            # DoRA magnitudes stay float32: they are divided by a norm computed in float32.
            magnitude=None if self.magnitude is None else self.magnitude.to(device=device, dtype=torch.float32),
        )


def low_rank_if_cheaper(up: torch.Tensor, down: torch.Tensor, *, kind: str, scale: float) -> LayerDelta:
    """Keep an exact factorization when it costs fewer multiply-adds than the dense matrix."""
    out_f, r = up.shape[0], up.shape[1]
    in_f = down[0].numel()
    if r * (out_f + in_f) < out_f * in_f:
        return LayerDelta(down=down, up=up, scale=scale, kind=kind)
    dense = (up.float() @ down.float().reshape(r, -1)).reshape(out_f, *down.shape[1:])
    return LayerDelta(dense=dense, scale=scale, kind=kind)
