"""Weight-space merges: fuse the stack's deltas into one new adapter before the first step.

A weight-space merge sees, for every layer, the deltas the K LoRAs put there and their weights, and returns
one new per-layer delta (:meth:`WeightMerge.merge_layer`); the per-layer results form a *derived adapter* that
is attached through the :class:`~pipelines.composer.Composer` like any LoRA and rendered through the normal
single-lane path, so a merged stack costs one adapter's branch at inference (none, once saved and fused).

* Each LoRA's effective weight on a layer is its weight times its per-block weight there (block weights are
  baked into the merge, exactly).
* Step windows are honoured exactly: one merged adapter is built per distinct set of active LoRAs over the
  steps (usually one), and each step uses the one for its set. Text-encoder layers are merged once, with the
  LoRAs' weights (step windows apply to the denoiser, as everywhere in the studio).
* Derived adapters are cached in ``composer.cache`` by what they were computed from (strategy, parameters,
  LoRAs, weights, block weights) and removed with their source LoRAs; at most :data:`MAX_DERIVED` are kept.

The merged adapter of a stack can be saved as a diffusers/PEFT LoRA file (:func:`save_merged_lora`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from pipelines.adapters.delta import LayerDelta
from pipelines.adapters.metadata import LoraInfo
from pipelines.adapters.parse import ParsedLora
from pipelines.composed import PreparedDelta
from pipelines.errors import StrategyError

from .base import Param, RunContext, StepContext, StepPlan, Strategy

MAX_DERIVED = 4  # merged adapters kept attached per pipeline (older ones are rebuilt on demand)

RANK_PARAM = Param(
    "rank", 0, "merged rank per layer: 0 = the largest input rank (PEFT's default), -1 = keep the merged delta "
    "dense (exact, not savable as a LoRA)", type=int, min=-1,
)


@dataclass
class LayerPart:
    """One LoRA's exact change to one layer (scale and DoRA folded in) and its effective weight there."""

    index: int  # position in the stack
    name: str
    weight: float  # LoRA weight x its block weight on this layer
    delta: PreparedDelta
    kind: str  # the adapter kind it came from ("lora", "qr", "loha", ...)

    @property
    def is_low_rank(self) -> bool:
        """Exactly ``up @ down`` plus at most a dense and a bias part (no DoRA rescaling, no sparse part)."""
        d = self.delta
        return d.down is not None and d.dora_out is None and d.dora_in is None and d.sparse_values is None

    @property
    def is_sparse(self) -> bool:
        """Only a sparse (SHiRA) part, plus at most a bias."""
        d = self.delta
        return (d.sparse_values is not None and d.down is None and d.dense is None and d.dora_out is None
                and d.dora_in is None)

    @property
    def rank(self) -> int:
        return int(self.delta.down.shape[0]) if self.delta.down is not None else 0

    def up(self, device) -> torch.Tensor:
        return self.delta.up.to(device)

    def down(self, device) -> torch.Tensor:
        """``down`` as a matrix (r x in·kh·kw for convolutions)."""
        return self.delta.down.to(device).flatten(1)

    def dense(self, base_weight: torch.Tensor, device) -> torch.Tensor:
        """The exact dense ``ΔW`` at weight 1, as a matrix (out x in·kh·kw)."""
        return self.delta.weight(base_weight, device).flatten(1)


def split_parts(parts: list[LayerPart], base_weight: torch.Tensor, device):
    """``(low_rank, dense_sum, bias_sum)``: the weighted low-rank factors ``[(w, up, down)]`` of the parts that
    have them, the weighted sum of everything that is not low-rank (dense deltas, DoRA), and of bias deltas."""
    low, dense, bias = [], None, None
    for p in parts:
        rest = None
        if p.is_low_rank:
            low.append((p.weight, p.up(device), p.down(device)))
            if p.delta.dense is not None:
                rest = p.delta.dense.to(device).flatten(1)
        else:
            rest = p.dense(base_weight, device)
        if rest is not None:
            dense = p.weight * rest if dense is None else dense + p.weight * rest
        if p.delta.bias is not None:
            b = p.weight * p.delta.bias.to(device)
            bias = b if bias is None else bias + b
    return low, dense, bias


def truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up, down)`` with ``up @ down`` the best rank-``rank`` approximation of ``matrix`` (Eckart–Young);
    singular values go into ``up``, as PEFT's and kohya's SVD merges do."""
    u, s, vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    k = max(1, min(rank, s.numel()))
    return u[:, :k] * s[:k], vh[:k]


def factored_svd(up: torch.Tensor, down: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`truncated_svd` of ``up @ down`` without forming it: QR of both factors, SVD of the small core."""
    qb, rb = torch.linalg.qr(up.float())
    qa, ra = torch.linalg.qr(down.float().T)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    k = max(1, min(rank, s.numel()))
    return qb @ (u[:, :k] * s[:k]), vh[:k] @ qa.T


def resolve_rank(rank: int, parts: list[LayerPart]) -> int | None:
    """The rank to truncate to (``None``: keep dense). 0 means the largest rank among ``parts``."""
    if rank < 0:
        return None
    if rank == 0:
        ranks = [p.rank for p in parts if p.delta.down is not None]
        return max(ranks) if ranks else None
    return rank


def factor_dense(matrix: torch.Tensor, rank: int | None, bias: torch.Tensor | None, kind: str) -> LayerDelta:
    """A ``LayerDelta`` for a dense merged ``ΔW``: truncated to ``rank`` by SVD, or kept dense."""
    if rank is None:
        return LayerDelta(dense=matrix.cpu(), bias=None if bias is None else bias.cpu(), kind=kind)
    up, down = truncated_svd(matrix, rank)
    return LayerDelta(down=down.cpu(), up=up.cpu(), bias=None if bias is None else bias.cpu(), kind=kind)


class WeightMerge(Strategy):
    """Base class of strategies that fuse the stack into one adapter (``cat``, ``svd``, ``ties``, ``dare``, ``qr``).

    Subclasses implement :meth:`merge_layer`, with the paper's rule visible in it.
    """

    def merge_layer(self, key: str, parts: list[LayerPart], base_weight: torch.Tensor) -> LayerDelta | None:
        raise NotImplementedError

    def begin_merge(self, names: list[str]) -> None:
        """Called before the layers of one merge (subclasses reset their per-merge statistics here)."""

    def end_merge(self, names: list[str]) -> dict[str, Any]:
        """Called after the layers of one merge; returns what to report in ``info``."""
        return {}

    # --------------------------------------------------------------------------------------------- merging
    def merged_adapter(
        self,
        composer,
        names: list[str],
        denoiser_weights: Iterable[float] | None,
        text_weights: Iterable[float] | None,
    ) -> ParsedLora:
        """The merged adapter of ``names`` (all loaded in ``composer``): denoiser layers merged with
        ``denoiser_weights``, text-encoder layers with ``text_weights`` (``None`` leaves that part out)."""
        state, family = composer.state, composer.family
        den = None if denoiser_weights is None else [float(w) for w in denoiser_weights]
        txt = None if text_weights is None else [float(w) for w in text_weights]
        columns = [state.column(n) for n in names]
        self.begin_merge(names)
        deltas: dict[str, LayerDelta] = {}
        for key, layer in composer.layers.items():
            weights = den if key.startswith(family.denoiser + ".") else txt
            if weights is None:
                continue
            branch = layer.studio_branch
            parts = []
            for i, (name, col) in enumerate(zip(names, columns)):
                entry = branch.entries.get(name)
                w = weights[i] * float(state.block_weights[branch.block_id, col])
                if entry is None or w == 0.0:
                    continue
                kind = composer.adapters[name].parsed.deltas[key].kind
                parts.append(LayerPart(i, name, w, entry, kind))
            if parts:
                merged = self.merge_layer(key, parts, layer.weight)
                if merged is not None and not _is_empty(merged):
                    deltas[key] = merged
        self.info.update(self.end_merge(names))
        params = ", ".join(f"{k}={v}" for k, v in self.values.items())
        label = f"<{self.name}({params}) of {', '.join(names)}>"
        ranks = [d.rank for d in deltas.values() if d.down is not None]
        info = LoraInfo(path=None, name=label, format=f"merged-{self.name}", base=family.name,
                        base_evidence="studio merge", rank=max(ranks) if ranks else None, alpha=None)
        return ParsedLora(name=label, source=label, sha256=None, info=info, deltas=deltas)

    # --------------------------------------------------------------------------------------------- protocol
    def prepare(self, run: RunContext) -> None:
        composer = run.composer
        if composer is None:
            raise StrategyError(f"strategy '{self.name}' needs the pipeline's composer")
        names = list(run.names)
        if not names:
            return
        vectors: list[tuple[float, ...]] = []
        for row in run.step_weights.tolist():
            if any(row) and tuple(row) not in vectors:
                vectors.append(tuple(row))
        # derived adapter 0 also carries the text-encoder layers (merged with the LoRAs' weights)
        plans = [(vectors[0] if vectors else None, tuple(run.weights.tolist()))]
        plans += [(v, None) for v in vectors[1:]]
        derived = [self._derived(composer, names, den, txt) for den, txt in plans]
        self._evict(composer, keep=set(derived))
        self._segment = {v: j for j, v in enumerate(vectors)}
        self._count = len(derived)
        run.stack = derived

    def text_lanes(self, weights: torch.Tensor) -> torch.Tensor:
        lanes = torch.zeros(1, self._count)
        lanes[0, 0] = 1.0
        return lanes

    def plan(self, ctx: StepContext) -> StepPlan:
        gains = torch.zeros(self._count)
        key = tuple(ctx.weights.tolist())
        if any(key):
            gains[self._segment[key]] = 1.0
        return StepPlan(gains=gains[None], weights=torch.ones(1), text_lanes=[0])

    # --------------------------------------------------------------------------------------------- caching
    def _derived(self, composer, names, den, txt) -> str:
        state = composer.state
        blocks = tuple(tuple(state.block_weights[:, state.column(n)].tolist()) for n in names)
        sources = tuple(id(composer.adapters[n].parsed) for n in names)
        key = (tuple(names), "weight-merge", self.name, tuple(sorted(self.values.items())), sources, den, txt, blocks)
        cached = composer.cache.get(key)
        if cached is not None and cached[0] in composer.adapters:
            self.info.update(cached[1])
            return cached[0]
        parsed = self.merged_adapter(composer, names, den, txt)
        digest = hashlib.sha1(repr(key).encode()).hexdigest()[:10]
        name = f"<{self.name} merge {digest}>"
        if name in composer.adapters:
            composer.remove(name)
        composer.add(name, parsed, derived_from=tuple(names))
        composer.cache[key] = (name, dict(self.info))
        return name

    @staticmethod
    def _evict(composer, keep: set[str]) -> None:
        derived = [n for n, a in composer.adapters.items() if a.derived_from and n not in keep]
        for name in derived[: max(0, len(derived) + len(keep) - MAX_DERIVED)]:
            composer.remove(name)


def _is_empty(delta: LayerDelta) -> bool:
    """A merged layer with nothing left (rank 0, e.g. LoRA factors that are all zero in that layer)."""
    return (delta.dense is None and delta.bias is None and (delta.down is None or delta.down.shape[0] == 0)
            and getattr(delta, "sparse_values", None) is None)


def weight_merge_names() -> list[str]:
    """The registered weight-space merges (the strategies ``studio merge`` can save), in registry order."""
    from . import REGISTRY

    return [name for name, cls in REGISTRY.items() if issubclass(cls, WeightMerge)]


def merge_stack(strategy: WeightMerge, composer, names: list[str], weights: Iterable[float]) -> ParsedLora:
    """The merged adapter of ``names`` at ``weights`` (denoiser and text encoders) without attaching it."""
    if not isinstance(strategy, WeightMerge):
        raise StrategyError(f"strategy '{strategy.name}' is not a weight-space merge; it cannot be saved as a LoRA "
                            f"(weight-space merges: {', '.join(weight_merge_names())})")
    weights = list(weights)
    return strategy.merged_adapter(composer, names, weights, weights)
