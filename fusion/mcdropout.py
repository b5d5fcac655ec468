"""Orthogonal Monte Carlo Dropout (Zhang et al. 2025, "Rethinking Inter-LoRA Orthogonality in Adapter Merging:
Insights from Orthogonal Monte Carlo Dropout"): disjoint dropout masks make the merged LoRAs' outputs exactly
orthogonal.

Each LoRA i's output ``o_i = ΔW_i x`` is dropped out with rate ``p_i`` and rescaled by ``1 / (1 − p_i)`` (so
``E[ô_i] = o_i``, as in ordinary dropout), but the masks are *disjoint*: every output element is kept by at
most one LoRA. The paper draws them with chained Bernoulli variables, which with ``Σ_i (1 − p_i) = 1`` amounts to
giving each output element to exactly one LoRA, LoRA i with probability ``1 − p_i``; its merges use
``p_i = 1 − 1/N`` for N LoRAs (p = 0.5 for two), i.e. a uniform assignment and a rescaling by N:

    y = W x + Σ_i N · m_i ⊙ (w_i ΔW_i x),   m_i ∈ {0, 1}^out,  Σ_i m_i = 1,

so ``⟨m_i ⊙ o_i, m_j ⊙ o_j⟩ = 0`` for i ≠ j, for every input: the merged LoRAs cannot interfere directly. (The
paper's finding, which ComposLoRA-mini measures here too, is that this orthogonality does not make the concepts
compose any better.)

Two strategies, by where the masks live:

* ``mcdropout`` (weight space): one mask per layer over its **output channels** (each output row of the layer
  belongs to one LoRA), seeded by ``seed + crc32(key)``: the outputs are orthogonal for every token, step and
  input, and the merge is a fixed LoRA (``B_i ← N · m_i ⊙ B_i``, rank Σ r_i) that renders at ``merge``'s cost and
  can be saved with ``studio merge``. N counts the LoRAs present on each layer. Dense, DoRA and sparse parts are
  masked the same way (as dense rows), and so are bias deltas (part of the output).
* ``mcdropout-mc`` (the released code's Monte Carlo form): a fresh mask for every output element of every
  LoRA'd linear layer at every forward pass (denoiser and text encoders), drawn from one generator seeded with
  ``seed`` at the start of the run; each element of the layer's output change is N times the output of the one
  LoRA that owns it. It runs through the composed layer's gate seam, which computes every LoRA's output
  separately (slower than ``merge``). Like the released code it masks linear layers only; LoRA parts on
  convolutions (which the released code does not load at all) are summed as in ``merge``.
"""

from __future__ import annotations

import torch

from pipelines.adapters.delta import LayerDelta
from pipelines.errors import StrategyError

from .base import Param, RunContext, StepContext, StepPlan, Strategy, one_lane
from .dare import layer_seed
from .weightspace import LayerPart, WeightMerge


def channel_owners(out_features: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """Which of ``count`` LoRAs keeps each output channel (uniform, i.e. keep probability 1/count each)."""
    return torch.randint(count, (out_features,), generator=generator)


class MCDropout(WeightMerge):
    name = "mcdropout"
    summary = "orthogonal Monte Carlo dropout: each output channel kept by one LoRA (x N), outputs exactly orthogonal"
    citation = "Zhang et al. 2025, Rethinking Inter-LoRA Orthogonality in Adapter Merging (orthogonal MC dropout)"
    params = (Param("seed", 0, "seed of the disjoint channel masks", type=int, min=0),)

    def merge_layer(self, key: str, parts: list[LayerPart], base_weight: torch.Tensor) -> LayerDelta | None:
        count = len(parts)
        out_f = base_weight.shape[0]
        generator = torch.Generator().manual_seed(layer_seed(self.seed, key))
        owners = channel_owners(out_f, count, generator)
        ups, downs, dense, bias = [], [], None, None
        for i, p in enumerate(parts):
            keep = (owners == i).float() * (count * p.weight)  # m_i / (1 - p_i) · w_i, with 1 - p_i = 1/N
            if p.is_low_rank:
                ups.append(keep[:, None] * p.up("cpu"))
                downs.append(p.down("cpu"))
                rest = None if p.delta.dense is None else p.delta.dense.flatten(1)
            else:
                rest = p.dense(base_weight, "cpu")
            if rest is not None:
                dense = _plus(dense, keep[:, None] * rest)
            if p.delta.bias is not None:
                bias = _plus(bias, keep * p.delta.bias)
        up = torch.cat(ups, dim=1) if ups else None
        down = torch.cat(downs, dim=0) if downs else None
        if up is None and dense is None and bias is None:
            return None
        return LayerDelta(down=down, up=up, dense=dense, bias=bias, kind="mcdropout")


class OrthogonalDropoutGate:
    """The gate of ``mcdropout-mc``: each output element goes to one of the layer's N LoRA outputs, chosen
    uniformly at random per call, times N (the paper's rescaling 1/(1 − p) with p = 1 − 1/N)."""

    def __init__(self, seed: int):
        self.seed = seed
        self.generators: dict[torch.device, torch.Generator] = {}

    def __call__(self, x: torch.Tensor, y: torch.Tensor, outputs: torch.Tensor, columns: list[int]) -> torch.Tensor:
        count = outputs.shape[0]
        generator = self.generators.get(y.device)
        if generator is None:
            generator = self.generators[y.device] = torch.Generator(y.device).manual_seed(self.seed)
        owner = torch.randint(count, tuple(y.shape), generator=generator, device=y.device)
        return count * torch.gather(outputs, 0, owner[None]).squeeze(0)


class MCDropoutRuntime(Strategy):
    name = "mcdropout-mc"
    summary = "orthogonal MC dropout as released: fresh disjoint masks over every output element at every pass (x N)"
    citation = MCDropout.citation
    params = (Param("seed", 0, "seed of the mask generator (one per run)", type=int, min=0),)

    def prepare(self, run: RunContext) -> None:
        self._branches = []
        if run.composer is None:
            raise StrategyError(f"strategy '{self.name}' needs the pipeline's composer")
        gate = OrthogonalDropoutGate(self.seed)
        for layer in run.composer.layers.values():
            if isinstance(layer, torch.nn.Conv2d):
                continue  # the gate seam covers linear layers; convolutions keep the plain sum
            layer.studio_branch.set_gate(gate)
            self._branches.append(layer.studio_branch)

    def finish(self, run: RunContext) -> None:
        for branch in getattr(self, "_branches", []):
            branch.set_gate(None)
        self._branches = []

    def plan(self, ctx: StepContext) -> StepPlan:
        return one_lane(ctx.weights)


def _plus(total: torch.Tensor | None, term: torch.Tensor) -> torch.Tensor:
    return term if total is None else total + term
