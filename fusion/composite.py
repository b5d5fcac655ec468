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

``reduce="sum"`` is Composable Diffusion's AND (Liu et al. 2022, "Compositional Visual Generation with Composable
Diffusion Models", ECCV, Eq. 10 with unit weights), read with LoRAs as the conditions:

    ε = ε_0 + Σ_i (ε_i − ε_0)

where ε_0 is the prediction with no LoRA. It is one more lane (no adapters, the prompt encoded without any
text-encoder part) with reduce weight 1 − N, and the N LoRA lanes with weight 1: each LoRA keeps its full
strength where the mean gives it 1/N. The reduce is linear, so it commutes with classifier-free guidance.
"""

from __future__ import annotations

import torch

from .base import Param, StepContext, StepPlan, Strategy


class Composite(Strategy):
    name = "composite"
    summary = "average of each LoRA's guided prediction, all LoRAs in one batched forward"
    citation = ("Zhong et al. 2024, Multi-LoRA Composition for Image Generation (LoRA Composite); reduce=sum: "
                "Liu et al. 2022, Composable Diffusion (AND)")
    params = (Param("reduce", "mean", "mean: LoRA Composite's average of the LoRA lanes; sum: Composable "
                    "Diffusion's eps_0 + sum_i (eps_i - eps_0) with a base lane", type=str, choices=("mean", "sum")),)

    def text_lanes(self, weights: torch.Tensor) -> torch.Tensor:
        lanes = torch.diag(weights)
        if self.reduce == "sum":  # row K: the base lane's conditioning, no text-encoder part
            lanes = torch.cat([lanes, torch.zeros(1, len(weights))])
        return lanes

    def plan(self, ctx: StepContext) -> StepPlan:
        active = [i for i, w in enumerate(ctx.weights.tolist()) if w != 0.0]
        base_text = len(ctx.weights) if self.reduce == "sum" else 0
        if not active:
            return StepPlan(gains=torch.zeros(1, len(ctx.weights)), weights=torch.ones(1), text_lanes=[base_text])
        gains = torch.diag(ctx.weights)[active]
        if self.reduce == "sum" and len(active) > 1:  # one LoRA: ε_0 + (ε_1 − ε_0) = ε_1, no base lane needed
            k, n = len(ctx.weights), len(active)
            weights = torch.tensor([1.0 - n] + [1.0] * n)
            return StepPlan(gains=torch.cat([torch.zeros(1, k), gains]), weights=weights, text_lanes=[k, *active])
        return StepPlan(gains=gains, weights=torch.full((len(active),), 1.0 / len(active)), text_lanes=active)
