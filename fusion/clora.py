"""CLoRA: contrastive test-time composition of LoRAs (Meral, Simsar, Tombari, Yanardag, ICCV 2025, arXiv 2403.19776).

Each LoRA whose trigger words occur in the prompt is a *concept* (with ``max_concepts=N`` only the first N of
the stack can be: a style or background LoRA whose trigger is in the prompt would otherwise be confined to where
its word attends; on the tiny world's waves-background scene no half showed the waves background, 2 seeds). The
prompt breaks down into a base lane (the prompt with no concept LoRA; the other LoRAs act in every lane like the
released code's ``style_lora``) and one lane per concept (the prompt with that LoRA, its text-encoder part
included), all run as one batched forward through the seam. Two mechanisms:

1. **Contrastive latent update** (Sec. 3.2). From the cross-attention maps (:mod:`pipelines.attention_maps`) of
   each concept's tokens, one embedding per token map, flattened and min-max normalised; the *group* of concept
   ``c`` holds its token maps in the base lane and in lane ``c``. InfoNCE with cosine similarity ``s`` and
   temperature τ = 0.5 over every ordered positive pair ``(a, p)`` of a group, negatives ``n`` all maps of other
   groups (:func:`info_nce`)::

       L = mean_(a,p)  −log( exp(s_ap/τ) / (exp(s_ap/τ) + Σ_n exp(s_an/τ)) )

   and ``z_t ← z_t − α_t ∇_z L`` with ``α_t = α · √(1 − 0.5 · i/(S−1))`` (the Attend-and-Excite / CONFORM step-size
   schedule CLoRA builds on; α = 20 as the released code's ``step_size``). The paper updates the latents at every
   step before step 25 of 50 and iterates at steps {0, 10, 20}; with S steps this is every step before
   ``update_until · S`` (0.5) and ``refine_iters`` updates at steps round({0, 0.2, 0.4} · S). The update of step i
   runs in the callback after step i − 1 (:mod:`pipelines.latent_update`: the pipelines stay stock), so the
   first update is at step 1, not 0.
2. **Masked fusion** (Sec. 3.3): ``ε = M_0 ⊙ ε_0 + Σ_c M_c ⊙ ε_c`` with masks from the concepts' attention in their
   own lanes; since every lane steps from the same ``z_t`` and the scheduler update is linear in ε, this equals
   the paper's fusion of the lanes' latents ``z = Σ_c M_c ⊙ z^c``. Masks are made as for ``region=auto``
   (:mod:`fusion.concept_masks`): after the first ``mask_after`` of the steps (the released example: 8 of 50;
   lanes averaged before), then fixed (``masks=fixed``, the default) or, as the paper does, made again at every
   later step from the attention of the step before (``masks=every_step``: the seam sets a step's fusion weights
   before its forward, so a step's own maps come one step late).

Where the released code (read through public ports of ``gemlab-vt/CLoRA``'s pipeline; the repository itself could
not be fetched here) differs: it computes each step's noise predictions *before* the latent update and steps the
scheduler from the updated latents with them (here, as in Attend-and-Excite, the step predicts on the updated
latents); it uses a constant step size; it recomputes masks every step from that step's maps (here one step late
with ``masks=every_step``, fixed after the warm-up by default), binarises at 0.3 · max and averages overlaps (here
min-max, argmax); its base lane runs only the style LoRA, as here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipelines.attention_maps import AttentionCapture, concept_token_positions, text_tokenizer
from pipelines.latent_update import gradient_step
from pipelines.seam import StepPlan

from .base import Param, RunContext, StepContext, Strategy
from .concept_masks import ConceptMasks, lora_triggers, uses_guidance
from .region_masks import concept_map, lane_weights

__all__ = ["CLoRA", "info_nce"]


def info_nce(embeddings: torch.Tensor, groups: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """InfoNCE / NT-Xent over ``embeddings [n, d]`` (cosine similarity) with ``groups [n]`` labels.

    Mean over ordered positive pairs (same group, a ≠ p) of ``−log(e^{s_ap/τ} / (e^{s_ap/τ} + Σ_n e^{s_an/τ}))``,
    ``n`` over other groups. Zero (without a graph) when there is no positive pair or no negative."""
    unit = F.normalize(embeddings, dim=1)
    logits = unit @ unit.T / temperature
    same = groups[:, None] == groups[None, :]
    positive = same & ~torch.eye(len(groups), dtype=torch.bool, device=groups.device)
    negative = ~same
    if not positive.any() or not negative.any():
        return torch.zeros(())
    negatives = torch.where(negative, logits, torch.full_like(logits, -torch.inf)).logsumexp(1, keepdim=True)
    per_pair = -(logits - torch.logaddexp(logits, negatives.expand_as(logits)))
    return per_pair[positive].mean()


def min_max(flat: torch.Tensor) -> torch.Tensor:
    low, high = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
    return (flat - low) / (high - low + 1e-6)


class CLoRA(Strategy):
    name = "clora"
    summary = ("contrastive test-time composition: latent updates that separate the LoRAs' attention, then each "
               "LoRA's lane in its own attention mask")
    citation = "Meral et al., ICCV 2025, CLoRA: Contrastive Test-Time Composition of Multiple LoRA Models"
    params = (
        Param("step_size", 20.0, "α of the latent update z ← z − α_t ∇L (released code: 20)", min=0.0, max=1e4),
        Param("temperature", 0.5, "InfoNCE temperature τ (paper: 0.5)", min=1e-3, max=10.0),
        Param("update_until", 0.5, "latent updates at every step before this fraction (paper: 25 of 50 steps)",
              min=0.0, max=1.0),
        Param("refine_iters", 5, "updates at each refinement step round({0, 0.2, 0.4}·steps) (paper: iterations at "
              "steps 0, 10, 20 of 50)", type=int, min=1, max=50),
        Param("mask_after", 0.16, "masks from the attention of the steps before this fraction, then fixed; lanes "
              "averaged before (released example: 8 of 50)", min=0.0, max=1.0),
        Param("masks", "fixed", "fixed: masks from the warm-up's attention, kept for the rest of the render; "
              "every_step: made again at every later step from the previous step's attention (the paper)", type=str,
              choices=("fixed", "every_step")),
        Param("mask_threshold", 0.3, "a position joins a concept's mask where its normalised attention is highest "
              "and above this (released default 0.3)", min=0.0, max=1.0),
        Param("max_concepts", 0, "only the first N LoRAs of the stack can be concepts (subjects first); the rest act in "
              "every lane like the released code's style LoRA (0: every LoRA whose trigger is in the prompt)",
              type=int, min=0, max=64),
    )

    def prepare(self, run: RunContext) -> None:
        self.info.clear()
        self.region_masks = {}
        self._run = run
        self.triggers = lora_triggers(run)
        self.steps = run.num_steps
        height, width = self._grid(run)
        self._tokens = run.family == "flux"
        self.mask_grid = (height // 2, width // 2) if self._tokens else (height, width)
        self.latent_grid = (height, width)
        self.guidance = uses_guidance(run)
        self.masker: ConceptMasks | None = None
        self._last_step = -1
        self.concepts: list[int] = []  # the stack indices of the concept LoRAs (see _find_concepts)
        self.warmup = min(max(1, round(self.mask_after * self.steps)), max(1, self.steps - 1))
        refine = {max(1, round(f * self.steps)) for f in (0.0, 0.2, 0.4)}
        self.updates = {i: (self.refine_iters if i in refine else 1)
                        for i in range(1, self.steps) if i < self.update_until * self.steps}
        self._find_concepts(str(run.settings.get("prompt", "")))

    @staticmethod
    def _grid(run: RunContext) -> tuple[int, int]:
        scale = int(getattr(run.pipe, "vae_scale_factor", 8)) if run.pipe is not None else 8
        return int(run.settings["height"]) // scale, int(run.settings["width"]) // scale

    # ------------------------------------------------------------------------------------------ lanes
    def _find_concepts(self, prompt: str) -> None:
        """Which LoRAs are concepts: those whose trigger words occur in ``prompt`` (checked before rendering)."""
        tokenizer = text_tokenizer(self._run.pipe, self._run.family)
        self.positions = [concept_token_positions(tokenizer, prompt, words) if words else []
                          for words in self.triggers]
        limit = self.max_concepts or len(self.positions)
        self.concepts = [k for k, pos in enumerate(self.positions) if pos and k < limit]
        if not self.concepts:  # nothing to separate: a merge, said in the result (as regional without regions)
            described = "; ".join(f"{n}: {', '.join(w) or 'none declared'}" for n, w in zip(self._run.names, self.triggers))
            self.info["fallback"] = ("no LoRA's trigger words occur in the prompt (each such LoRA is a concept with "
                                     f"its own lane and mask): rendered as merge. Trigger words: {described}")
        self.global_ = torch.tensor([0.0 if k in self.concepts else 1.0 for k in range(len(self.triggers))])
        self.info["concepts"] = [self._run.names[k] for k in self.concepts]
        self.info["global"] = [n for k, n in enumerate(self._run.names) if k not in self.concepts]
        if len(self.concepts) == 1:
            self.info["note"] = "one concept: no negatives for the contrastive loss, so no latent update"
        self.info["updates"] = {"steps": sorted(self.updates) if len(self.concepts) > 1 else [],
                                "iterations": sum(self.updates.values()) if len(self.concepts) > 1 else 0}

    def lane_prompts(self, prompt: str) -> list[str]:
        return [prompt] * self._rows().shape[0]  # the base prompt and one per concept (its trigger bound in it)

    def _rows(self) -> torch.Tensor:
        if not self.concepts:  # the merge fallback: one lane with every LoRA
            return torch.ones(1, len(self.triggers))
        rows = [self.global_]
        for k in self.concepts:
            row = self.global_.clone()
            row[k] = 1.0
            rows.append(row)
        return torch.stack(rows)

    def text_lanes(self, weights: torch.Tensor) -> torch.Tensor:
        return self._rows() * weights[None]

    def _new_masker(self) -> ConceptMasks:
        return ConceptMasks(self._run.family, self.latent_grid, self.mask_grid,
                            [1 + i for i in range(len(self.concepts))], [self.positions[k] for k in self.concepts],
                            1 + len(self.concepts), self.guidance, self.mask_threshold)

    # ------------------------------------------------------------------------------------------ steps
    def plan(self, ctx: StepContext) -> StepPlan:
        if not self.concepts:
            return StepPlan(gains=ctx.weights[None].clone(), weights=torch.ones(1), text_lanes=[0])
        gains = self._rows() * ctx.weights[None]
        lanes = list(range(gains.shape[0]))
        extras = {}
        if self.masker is None or ctx.step <= self._last_step:  # a new image (img2img: from the strength's step)
            self._first_image = self.masker is None
            self.masker = self._new_masker()
            self._mask_step = min(ctx.step + self.warmup, max(ctx.step + 1, self.steps - 1))
            self._previous: AttentionCapture | None = None
        self._last_step = ctx.step
        if ctx.step + 1 in self.updates and len(self.concepts) > 1:
            extras["between_steps"] = self._latent_update(ctx, gains)
        if ctx.step < self._mask_step:
            extras["attention_capture"] = self.masker.capture()
            return StepPlan(gains=gains, weights=torch.full((len(lanes),), 1.0 / len(lanes)), text_lanes=lanes,
                            extras=extras)
        every_step = self.masks == "every_step"
        if ctx.step == self._mask_step or (every_step and self._previous is not None):
            captures = [self._previous] if ctx.step > self._mask_step else None  # None: the warm-up's
            weights = lane_weights(list(self.masker.masks(captures)))  # [1 + C, h, w]: base lane, then concepts
            self.maps = weights.flatten(1) if self._tokens else weights
            if self._first_image:  # the masks the first image used last (every_step: its last step's)
                self.region_masks = {self._run.names[k]: m.clone() for k, m in zip(self.concepts, weights[1:])}
                self.info["coverage"] = {self._run.names[k]: round(float(m.mean()), 4)
                                         for k, m in zip(self.concepts, weights[1:])}
        if every_step:  # this step's maps make the next step's masks
            self._previous = extras["attention_capture"] = AttentionCapture(self._run.family, self.latent_grid)
        return StepPlan(gains=gains, weights=self.maps.clone(), text_lanes=lanes, extras=extras)

    def _latent_update(self, ctx: StepContext, gains: torch.Tensor):
        """The callback that updates the latents step ``ctx.step + 1`` starts from (``refine_iters`` times at a
        refinement step)."""
        target = ctx.step + 1
        alpha = self.step_size * math.sqrt(1.0 - 0.5 * target / max(self.steps - 1, 1))
        lanes = list(range(gains.shape[0]))

        def update(seam, pipe, callback_kwargs: dict) -> dict:
            latents = callback_kwargs["latents"]
            losses = []
            step_plan = seam.plans[seam.step - 1]  # the step just run, in the adapter columns the seam addresses
            for _ in range(self.updates[target]):
                capture = AttentionCapture(self._run.family, self.latent_grid)  # this update's maps, with graph
                plan = StepPlan(gains=step_plan.gains, weights=torch.full((len(lanes),), 1.0 / len(lanes)),
                                text_lanes=step_plan.text_lanes, extras={"attention_capture": capture})
                latents, loss = gradient_step(seam, plan, latents, lambda: self.loss(capture.calls[0]), alpha)
                losses.append(round(loss, 5))
            self.info.setdefault("loss", {})[target] = losses
            return {"latents": latents}

        return update

    def loss(self, call_maps: torch.Tensor) -> torch.Tensor:
        """InfoNCE over the concept groups' token maps: group c = c's tokens in the base lane and in lane c."""
        lanes = 1 + len(self.concepts)
        embeddings, groups = [], []
        for group, k in enumerate(self.concepts):
            for lane in (0, 1 + group):
                for position in self.positions[k]:
                    token_map = concept_map(call_maps, lane, lanes, [position], self.guidance)
                    embeddings.append(min_max(token_map.flatten()))
                    groups.append(group)
        return info_nce(torch.stack(embeddings), torch.tensor(groups), self.temperature)
