"""Per-lane text conditioning: each lane's prompt embeddings, computed with that lane's text-encoder gains.

When adapters carry text-encoder parts, a strategy that gives different lanes different adapters must also
give them different prompt embeddings; otherwise one LoRA's text-encoder part leaks into another's lane (a
bug of the Multi-LoRA Composition reference code, which encodes the prompt once). All T text lanes are encoded
in **one** batched call of the pipeline's own ``encode_prompt``, with per-sample text gains in the mix state.
"""

from __future__ import annotations

import torch

from .families import Family
from .mix_state import MixState
from .seam import LaneConditioning


def encode_lanes(
    pipe,
    family: Family,
    state: MixState,
    text_lanes: torch.Tensor,
    *,
    prompt: str,
    negative_prompt: str | None,
    do_cfg: bool,
    max_sequence_length: int | None = None,
    prompts: list[str] | None = None,
) -> tuple[dict, LaneConditioning]:
    """Encode ``prompt`` once per row of ``text_lanes`` ([T, N] gains).

    ``prompts`` (one per text lane) gives each lane its own prompt instead, e.g. a regional lane's
    "global prompt, region prompt"; each is still encoded with only its own lane's text-encoder gains.

    Returns the pipeline keyword arguments for lane 0 (``prompt_embeds`` and friends, to pass instead of
    ``prompt``) and the :class:`LaneConditioning` that swaps in lane j's rows inside the denoiser call.
    """
    lanes = text_lanes.shape[0]
    if prompts is None:
        prompts = [prompt] * lanes
    elif len(prompts) != lanes:
        raise ValueError(f"{len(prompts)} lane prompts for {lanes} text lanes")
    prompts = list(prompts)
    device = pipe._execution_device
    saved = state.text_gains.clone()
    state.set_gains(text=text_lanes)
    try:
        with torch.no_grad():
            if family.name == "sdxl":
                pe, npe, ppe, nppe = pipe.encode_prompt(
                    prompt=prompts,
                    device=device,
                    num_images_per_prompt=1,
                    do_classifier_free_guidance=do_cfg,
                    negative_prompt=[negative_prompt or ""] * lanes,
                )
                kwargs = {"prompt_embeds": pe[:1], "pooled_prompt_embeds": ppe[:1]}
                if do_cfg:
                    kwargs |= {"negative_prompt_embeds": npe[:1], "negative_pooled_prompt_embeds": nppe[:1]}
                rows = {
                    "encoder_hidden_states": [_stack(pe[j], npe[j] if do_cfg else None) for j in range(lanes)],
                    "added_cond_kwargs.text_embeds": [_stack(ppe[j], nppe[j] if do_cfg else None) for j in range(lanes)],
                }
            else:
                extra = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
                pe, ppe, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device,
                                                num_images_per_prompt=1, **extra)
                kwargs = {"prompt_embeds": pe[:1], "pooled_prompt_embeds": ppe[:1]}
                npe = nppe = None
                if do_cfg:
                    npe, nppe, _ = pipe.encode_prompt(prompt=[negative_prompt or ""] * lanes, prompt_2=None,
                                                      device=device, num_images_per_prompt=1, **extra)
                    kwargs |= {"negative_prompt_embeds": npe[:1], "negative_pooled_prompt_embeds": nppe[:1]}
                rows = {
                    "encoder_hidden_states": [_stack(pe[j], npe[j] if do_cfg else None) for j in range(lanes)],
                    "pooled_projections": [_stack(ppe[j], nppe[j] if do_cfg else None) for j in range(lanes)],
                }
    finally:
        state.set_gains(text=saved)
    return kwargs, LaneConditioning(rows)


def _stack(pos: torch.Tensor, neg: torch.Tensor | None) -> torch.Tensor:
    return pos[None] if neg is None else torch.stack([pos, neg])
