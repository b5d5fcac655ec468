"""LoRA Switch (Zhong et al. 2024, "Multi-LoRA Composition for Image Generation", Sec. 3.1).

One LoRA is active at a time and the active LoRA rotates every τ denoising steps, in the user's order:

    active(t) = ⌊t / τ⌋ mod N

The paper's ablation finds τ = 5 best (composition win-rate ~38% at τ=1, ~59% at τ=5, flat after) and putting
the subject/character LoRA first. Differences from the released code: there the first LoRA runs τ+1 steps (the
switch callback fires after the first step's update), here exactly τ; and the prompt is encoded per active
LoRA, so a LoRA's text-encoder part is used only while that LoRA is active.
"""

from __future__ import annotations

import torch

from .base import Param, StepContext, StepPlan, Strategy, one_lane


class Switch(Strategy):
    name = "switch"
    summary = "one LoRA at a time, rotating every tau steps in stack order"
    citation = "Zhong et al. 2024, Multi-LoRA Composition for Image Generation (LoRA Switch)"
    params = (Param("tau", 5, "steps each LoRA stays active before the next takes over", type=int, min=1),)

    def active_index(self, step: int, count: int) -> int:
        return (step // self.tau) % count

    def text_lanes(self, weights: torch.Tensor) -> torch.Tensor:
        return torch.diag(weights)

    def plan(self, ctx: StepContext) -> StepPlan:
        k = self.active_index(ctx.step, len(ctx.weights))
        gains = torch.zeros_like(ctx.weights)
        gains[k] = ctx.weights[k]
        return one_lane(gains, text_lane=k)
