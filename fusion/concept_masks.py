"""Masks from the cross-attention of LoRAs' concept tokens, collected over the first steps of a render.

Shared by ``regional`` with ``region=auto`` and by ``clora``. The procedure (CLoRA, Meral et al., ICCV 2025,
arXiv 2403.19776, Sec. 3.3 "masked fusion"; the released code's ``attention_map_to_mask``, read through public
ports of its pipeline since the repository itself could not be fetched here):

1. during the *warm-up* steps (the first ``mask_after`` fraction of the schedule; CLoRA's released example
   starts masking after 8 of 50 steps) every lane runs and the lanes' predictions are averaged (the released
   code blends with all-ones masks before ``apply_mask_after``); the seam captures each step's cross-attention
   (:mod:`pipelines.attention_maps`: SDXL ``attn2`` at the coarsest level with ≥ 16 cells a side, FLUX double-stream joint
   attention), and for each concept its lane's conditional rows' attention to the concept's token positions
   (summed over the tokens) is averaged over the warm-up steps;
2. at the first step after the warm-up the maps become masks (:func:`fusion.region_masks.auto_masks`: resize to
   the denoiser's grid, divide by the maximum, argmax across concepts, keep values above ``threshold``; 0.3 is the
   released default) and stay fixed for the rest of the render; a base lane fills what no concept took.

CLoRA's paper recomputes the masks at every step from that step's maps; ``clora`` does so with
``masks=every_step`` (each step's masks from the previous step's maps: the seam sets a step's fusion weights
before its forward). Fixing them after the warm-up (as regional boxes are fixed) is the default here and the only
form of ``region=auto``: the capture then costs only the warm-up steps, and the masks the user sees are the masks
every later step used.

Concept tokens of a LoRA: its trigger words (the file's ``modelspec.trigger_phrase``, else its most frequent
training tags) where they occur in the lane's prompt; else its region prompt as a phrase; a LoRA with neither
cannot get an automatic mask (:class:`~pipelines.errors.StrategyError` before rendering).
"""

from __future__ import annotations

import torch

from pipelines.attention_maps import AttentionCapture, concept_token_positions, text_tokenizer
from pipelines.errors import StrategyError

from .base import RunContext
from .region_masks import auto_masks, concept_map

__all__ = ["ConceptMasks", "lora_triggers", "concept_positions", "uses_guidance"]


def lora_triggers(run: RunContext) -> list[list[str]]:
    """Each stack LoRA's trigger words, as its file declares them (empty when it declares none)."""
    adapters = getattr(run.composer, "adapters", {}) if run.composer is not None else {}
    out = []
    for name in run.names:
        attached = adapters.get(name)
        info = getattr(getattr(attached, "parsed", None), "info", None)
        out.append(list(getattr(info, "triggers", []) or []))
    return out


def uses_guidance(run: RunContext) -> bool:
    """Whether an SDXL lane's rows are ``[uncond; cond]`` (classifier-free guidance on)."""
    if run.family != "sdxl":
        return False
    unet = getattr(run.pipe, "unet", None)
    distilled = unet is not None and getattr(unet.config, "time_cond_proj_dim", None) is not None
    return float(run.settings.get("guidance", 5.0)) > 1.0 and not distilled


def concept_positions(run: RunContext, prompt: str, words: list[str], phrase: str | None, label: str) -> list[int]:
    """Token positions of ``words`` (trigger words) in ``prompt``, else of ``phrase`` (a region prompt); a
    :class:`StrategyError` naming ``label`` when neither is found."""
    tokenizer = text_tokenizer(run.pipe, run.family)
    limit = run.settings.get("max_sequence_length") if run.family == "flux" else None
    positions = concept_token_positions(tokenizer, prompt, words, limit) if words else []
    if not positions and phrase:
        positions = concept_token_positions(tokenizer, prompt, [phrase], limit)
    if not positions:
        said = f"its trigger words ({', '.join(words)}) do not occur in the prompt" if words else \
            "its file declares no trigger words"
        raise StrategyError(
            f"LoRA {label}: an automatic mask needs the LoRA's concept in the prompt, but {said} and it has no "
            "region prompt. Put its trigger word in the prompt, give it a region prompt (prompt=...), or a box")
    return positions


class ConceptMasks:
    """Warm-up capture and the masks made from it, for one image.

    ``lanes[i]``: the plan lane (index in the step plan's lanes) whose attention defines concept ``i``;
    ``positions[i]``: its token positions in that lane's prompt; ``lane_count``: lanes in the warm-up plan.
    """

    def __init__(self, family: str, latent_grid: tuple[int, int], mask_grid: tuple[int, int], lanes: list[int],
                 positions: list[list[int]], lane_count: int, guidance: bool, threshold: float):
        self.family, self.latent_grid, self.mask_grid = family, latent_grid, mask_grid
        self.lanes, self.positions, self.lane_count = lanes, positions, lane_count
        self.guidance, self.threshold = guidance, threshold
        self.captures: list[AttentionCapture] = []

    def capture(self) -> AttentionCapture:
        """A capture for one warm-up step (put it in the step plan's ``extras["attention_capture"]``)."""
        capture = AttentionCapture(self.family, self.latent_grid)
        self.captures.append(capture)
        return capture

    def concept_maps(self, capture: AttentionCapture) -> torch.Tensor:
        """``[R, h, w]``: each concept's map in one step's first denoiser call (FLUX true CFG: the positive one)."""
        if not capture.calls:
            raise RuntimeError("the warm-up step captured no attention (the denoiser did not run)")
        maps = capture.calls[0]
        return torch.stack([concept_map(maps, lane, self.lane_count, pos, self.guidance)
                            for lane, pos in zip(self.lanes, self.positions)])

    def masks(self, captures: list[AttentionCapture] | None = None) -> torch.Tensor:
        """``[R, H, W]`` disjoint 0/1 masks on the denoiser's grid from the mean maps of ``captures`` (default: the
        warm-up's)."""
        captures = self.captures if captures is None else captures
        if not captures:
            raise RuntimeError("no warm-up step ran before the masks were asked for")
        maps = torch.stack([self.concept_maps(c).detach().float().cpu() for c in captures]).mean(0)
        return auto_masks(maps, self.mask_grid, self.threshold)
