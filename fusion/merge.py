"""Merge: the weighted sum of the LoRA deltas, ``W' = W + Σ_i w_i ΔW_i``.

The baseline of every multi-LoRA paper and what diffusers' ``set_adapters`` does; one lane, every LoRA at its
weight at every step. (Zhong et al. 2024 use it with a global scale of 0.8 as their "Merge" baseline.)
"""

from __future__ import annotations

from .base import StepContext, StepPlan, Strategy, one_lane


class Merge(Strategy):
    name = "merge"
    summary = "weighted sum of all LoRA deltas (diffusers' set_adapters)"
    citation = "Hu et al. 2021 (LoRA); baseline in Zhong et al. 2024"

    def plan(self, ctx: StepContext) -> StepPlan:
        return one_lane(ctx.weights)
