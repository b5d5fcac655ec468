"""Regional composition: each subject LoRA acts in its own region of the image, with its own region prompt.

The noise-prediction form of MultiDiffusion (Bar-Tal et al. 2023, Eq. 3-5 for fixed masks) and of latent couple /
A1111 Regional Prompter's *latent* mode: every step runs one lane per region and one base lane, and combines
their predictions with masks that sum to one at every position,

    ε = M_0 ⊙ ε_0 + Σ_i M_i ⊙ ε_i,        M_0 + Σ_i M_i = 1,

where lane i runs the global LoRAs plus region i's LoRAs, conditioned on "global prompt, region prompt"
encoded with only those LoRAs' text-encoder parts, and the base lane runs the global LoRAs (entries without a
region: style, background) on the global prompt and fills what no region covers. LoRAs given the same region
share a lane. Masks live on the denoiser's grid (latent pixels for SDXL, packed 2×2 tokens for FLUX), see
:mod:`fusion.region_masks`; ``feather`` blurs their edges (Gaussian, σ in latent pixels). All lanes run as one
batched forward through the seam (in chunks when memory is short); with classifier-free guidance the masked sum
is linear, so it commutes with the pipeline's ``u + s (c − u)``.

``regional_until`` ends the regional phase early: from that fraction of the steps on, the step is a plain merge
of every LoRA on the global prompt (one lane), the usual way to let late, detail-forming steps blend the seams.

``region=auto`` (or the parameter ``auto``, which makes every given region automatic) draws a region from the
cross-attention of the LoRA's concept tokens (its trigger words in its lane's prompt, else its region prompt)
over the first ``auto_steps`` of the schedule, as CLoRA masks its LoRAs (Meral et al., ICCV 2025); the exact
procedure, its source and where it differs is in :mod:`fusion.concept_masks`. Those warm-up steps run every lane
and average them; the masks then stay fixed. Masks of every render are in ``Result.region_masks``.
"""

from __future__ import annotations

import torch

from .base import Param, RunContext, StepContext, StepPlan, Strategy
from .concept_masks import ConceptMasks, concept_positions, lora_triggers, uses_guidance
from .region_masks import AUTO, describe_region, is_auto, lane_weights, rasterise


class Regional(Strategy):
    name = "regional"
    summary = "each LoRA in its own image region (box or mask) with its own region prompt, one batched forward"
    citation = ("Bar-Tal et al. 2023, MultiDiffusion (masked sum of predictions); A1111 Regional Prompter, "
                "latent mode")
    params = (
        Param("feather", 0.0, "soft region edges: Gaussian sigma in latent pixels (0 = hard edges)", min=0.0, max=64.0),
        Param("regional_until", 1.0, "fraction of the steps run regionally; the rest merge every LoRA on the "
              "global prompt", min=0.0, max=1.0),
        Param("auto", False, "make every given region automatic (region=auto: masks from the cross-attention of "
              "each LoRA's trigger words or region prompt)", type=bool),
        Param("auto_steps", 0.16, "automatic regions: fraction of the first steps whose cross-attention makes the "
              "masks (all lanes averaged meanwhile; CLoRA's released example: 8 of 50)", min=0.0, max=1.0),
        Param("auto_threshold", 0.3, "automatic regions: a position joins a concept's mask where its normalised "
              "attention is highest and above this (CLoRA's released default 0.3)", min=0.0, max=1.0),
    )
    uses_regions = True

    def prepare(self, run: RunContext) -> None:
        k = len(run.names)
        regions = list(run.regions) + [None] * (k - len(run.regions))
        prompts = list(run.region_prompts) + [None] * (k - len(run.region_prompts))
        keys = [None if r is None else (AUTO if self.auto or is_auto(r) else str(r).strip()) for r in regions]
        self._names, self._keys, self._run = list(run.names), keys, run
        self._triggers = lora_triggers(run)
        self.masker: ConceptMasks | None = None
        self._last_step = -1
        self.groups = list(dict.fromkeys(r for r in keys if r is not None))
        self.info.clear()
        self.region_masks = {}
        if not self.groups:  # nothing regional: every step is the merge lane (stated in the result's info)
            self.info["fallback"] = ("no LoRA has a region (e.g. 'subject.safetensors:region=left:prompt=a red "
                                     "cube'): rendered as merge")
        # each automatic region is a lane of its own (its own concept), even when several LoRAs say 'auto'
        self.groups = [g for g in self.groups if g != AUTO] + [f"{AUTO}:{i}" for i, key in enumerate(keys) if key == AUTO]
        keys = [f"{AUTO}:{i}" if key == AUTO else key for i, key in enumerate(keys)]
        self._keys = keys
        self.members = torch.tensor([[key == g for key in keys] for g in self.groups], dtype=torch.float32)  # [R, K]
        self.global_ = torch.tensor([key is None for key in keys], dtype=torch.float32)  # [K]
        self.global_words = [p.strip() for p, key in zip(prompts, keys) if key is None and p and p.strip()]
        self.group_words = [list(dict.fromkeys(p.strip() for p, key in zip(prompts, keys) if key == g and p and p.strip()))
                            for g in self.groups]
        self._tokenizer = getattr(run.pipe, "tokenizer", None)  # CLIP: to say when a region prompt is cut off
        self.auto_groups: list[int] = []
        if not self.groups:
            return
        height, width, tokens = self._grid(run)
        self._tokens, self._grid_hw = tokens, (height, width)
        self.box_masks = [None if g.startswith(AUTO) else rasterise(g, height, width, f"region of LoRA "
                                                                      f"{self._label(run, keys, g)}")
                          for g in self.groups]
        self.info["grid"] = f"{height}x{width} {'tokens' if tokens else 'latent pixels'}"
        self.auto_groups = [i for i, g in enumerate(self.groups) if g.startswith(AUTO)]
        # at least one warm-up step, and at least one masked step when there are two or more
        self.warmup = min(max(1, round(self.auto_steps * run.num_steps)), max(1, run.num_steps - 1)) \
            if self.auto_groups else 0
        if not self.auto_groups:
            self._set_masks(self.box_masks)

    def _set_masks(self, masks: list[torch.Tensor]) -> None:
        """Lane weights from the regions' masks (boxes, mask files, and automatic masks once made)."""
        run, keys = self._run, self._keys
        height, width = self._grid_hw
        tokens = self._tokens
        scale = 0.5 if tokens else 1.0  # feather is in latent pixels; a FLUX token is 2x2 of them
        maps = lane_weights(masks, self.feather * scale)  # [1 + R, h, w]
        self.keep_base = bool(maps[0].max() > 0)
        maps = maps if self.keep_base else maps[1:]  # regions that cover everything together need no base lane
        self.maps = maps.flatten(1) if tokens else maps  # FLUX: [L, tokens], row-major like the packed latents
        self.info["regions"] = [
            {"loras": [n for n, key in zip(run.names, keys) if key == g], "region": g.split(":")[0],
             "shape": describe_region(g.split(":")[0]), "grid": [height, width], "coverage": round(float(m.mean()), 4)}
            for g, m in zip(self.groups, masks)]
        lane_maps = maps[1:] if self.keep_base else maps  # the regions' lane weights, as the reduce applies them
        if not self.region_masks:  # the first image's (automatic masks differ from image to image)
            self.region_masks = {self._label(run, keys, g): m.clone() for g, m in zip(self.groups, lane_maps)}

    @staticmethod
    def _label(run: RunContext, keys: list, group: str) -> str:
        return ", ".join(n for n, key in zip(run.names, keys) if key == group)

    def _latent_grid(self) -> tuple[int, int]:
        height, width = self._grid_hw
        return (height * 2, width * 2) if self._tokens else (height, width)

    @staticmethod
    def _grid(run: RunContext) -> tuple[int, int, bool]:
        scale = int(getattr(run.pipe, "vae_scale_factor", 8)) if run.pipe is not None else 8
        height, width = int(run.settings["height"]) // scale, int(run.settings["width"]) // scale
        if run.family == "flux":
            return height // 2, width // 2, True
        return height, width, False

    # text lanes: 0 = base (global LoRAs, global prompt), 1..R = regions, R+1 = merge of all (global prompt)
    def text_lanes(self, weights: torch.Tensor) -> torch.Tensor:
        rows = [self.global_, *[torch.maximum(self.global_, m) for m in self.members], torch.ones_like(self.global_)]
        return torch.stack(rows) * weights[None]

    def lane_prompts(self, prompt: str) -> list[str]:
        base = ", ".join([prompt, *self.global_words]) if prompt else ", ".join(self.global_words)
        regional = [", ".join(w for w in [base, *words] if w) for words in self.group_words]
        self._note_truncation(regional)
        self._auto_positions = [  # checked here, before anything renders: every automatic region needs a concept
            concept_positions(self._run, regional[g], self._group_triggers(g), ", ".join(self.group_words[g]) or None,
                              self._label(self._run, self._keys, self.groups[g]))
            for g in getattr(self, "auto_groups", [])]
        return [base, *regional, base]

    def _group_triggers(self, group: int) -> list[str]:
        return [w for key, words in zip(self._keys, self._triggers) if key == self.groups[group] for w in words]

    def _note_truncation(self, prompts: list[str]) -> None:
        """CLIP reads 77 tokens: a region prompt after a long global prompt would be cut off without a word."""
        tokenizer = getattr(self, "_tokenizer", None)
        limit = getattr(tokenizer, "model_max_length", None)
        if tokenizer is None or not isinstance(limit, int) or limit > 100_000:
            return
        cut = [p for p in prompts if len(tokenizer(p, truncation=False)["input_ids"]) > limit]
        if cut:
            self.info["truncated"] = (f"{len(cut)} region lane prompt(s) are longer than the text encoder's {limit} "
                                      "tokens and were cut off at the end (global prompt first, region prompt last): "
                                      "shorten the global prompt")

    def plan(self, ctx: StepContext) -> StepPlan:
        merge_lane = len(self.groups) + 1
        if ctx.progress >= self.regional_until or not self.groups:
            return StepPlan(gains=ctx.weights[None].clone(), weights=torch.ones(1), text_lanes=[merge_lane])
        rows = [torch.maximum(self.global_, m) for m in self.members]
        lanes = list(range(1, len(self.groups) + 1))
        if self.auto_groups and (self.masker is None or ctx.step <= self._last_step):  # a new image: its own maps
            self.masker = ConceptMasks(self._run.family, self._latent_grid(), self._grid_hw,
                                       [1 + g for g in self.auto_groups], self._auto_positions, 1 + len(self.groups),
                                       uses_guidance(self._run), self.auto_threshold)
            # img2img starts at the strength's step: the warm-up counts from the first step run
            self._mask_step = min(ctx.step + self.warmup, max(ctx.step + 1, self._run.num_steps - 1))
        self._last_step = ctx.step
        if self.auto_groups and ctx.step < self._mask_step:  # warm-up: every lane, averaged, attention captured
            gains = torch.stack([self.global_, *rows]) * ctx.weights[None]
            count = gains.shape[0]
            return StepPlan(gains=gains, weights=torch.full((count,), 1.0 / count), text_lanes=[0, *lanes],
                            extras={"attention_capture": self.masker.capture()})
        if self.auto_groups and ctx.step == self._mask_step:
            made = self.masker.masks()
            masks = list(self.box_masks)
            for g, mask in zip(self.auto_groups, made):
                masks[g] = mask
            self._set_masks(masks)
        if self.keep_base:
            rows, lanes = [self.global_, *rows], [0, *lanes]
        gains = torch.stack(rows) * ctx.weights[None]
        return StepPlan(gains=gains, weights=self.maps.clone(), text_lanes=lanes)
