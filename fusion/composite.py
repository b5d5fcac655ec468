"""LoRA Composite (Zhong et al. 2024, "Multi-LoRA Composition for Image Generation", Sec. 3.2, Eq. 3-4).

At every step each LoRA i gives its own guided prediction and the step uses their mean:

    ε = (1/N) Σ_i [ ε_u^i + s (ε_c^i − ε_u^i) ]  =  ε̄_u + s (ε̄_c − ε̄_u)

The studio runs all N single-LoRA passes as **one** batched forward: the batch is replicated N times and
replica i carries only LoRA i's gains (the concatenated-branch layers make that free), then the N predictions
are averaged before the pipeline applies guidance (equal, by linearity, to averaging guided predictions). On
guidance-distilled FLUX.1-dev there is no unconditional pass and the mean of conditional predictions is used.
Each replica is conditioned on the prompt encoded with only its own LoRA's text-encoder part; the released
code encodes the prompt once with all adapters, leaking text-encoder parts across replicas. LoRAs outside
their step window leave the average for those steps.
"""

from __future__ import annotations

import torch

from .base import StepContext, StepPlan, Strategy


class Composite(Strategy):
    name = "composite"
    summary = "average of each LoRA's guided prediction, all LoRAs in one batched forward"
    citation = "Zhong et al. 2024, Multi-LoRA Composition for Image Generation (LoRA Composite)"

    def text_lanes(self, weights: torch.Tensor) -> torch.Tensor:
        return torch.diag(weights)

    def plan(self, ctx: StepContext) -> StepPlan:
        active = [i for i, w in enumerate(ctx.weights.tolist()) if w != 0.0]
        if not active:
            return StepPlan(gains=torch.zeros(1, len(ctx.weights)), weights=torch.ones(1), text_lanes=[0])
        gains = torch.diag(ctx.weights)[active]
        return StepPlan(gains=gains, weights=torch.full((len(active),), 1.0 / len(active)), text_lanes=active)
