"""FLUX.1 control LoRAs (BFL's FLUX.1-Canny-dev-lora / FLUX.1-Depth-dev-lora and files trained like them):
recognised in both layouts and refused with the reason, before anything attaches.

A control LoRA is not a style LoRA. It is trained for diffusers' ``FluxControlPipeline``, which concatenates the
control image's latents to the image latents along the channels, so the transformer's input embedder
``x_embedder`` must take twice its usual input (128 instead of 64 channels on FLUX.1-dev). diffusers'
``FluxControlPipeline.load_lora_weights`` replaces ``x_embedder`` by a wider ``Linear`` (the old weight in the
first columns, zeros after), raises ``config.in_channels``, loads the LoRA and writes the file's normalisation
scales (``norm_q`` / ``norm_k`` / ``norm_added_q`` / ``norm_added_k``) straight into the transformer. None of
that fits the studio's composition (one low-rank branch per existing layer, per-sample gains): the widened layer
changes the denoiser's input, the norm scales are replacements rather than low-rank deltas, and every other
pipeline (text-to-image, img2img, ...) would be fed half the channels it now expects.

So the studio refuses these files clearly (:func:`control_lora_problem`), in BFL's own layout (``img_in``,
``query_norm.scale``) and in diffusers' layout (``transformer.x_embedder.lora_A`` wider than the model's
``x_embedder``, or norm-scale keys next to LoRA keys), instead of failing later with a shape or key error.
Applying them through ``FluxControlPipeline`` is not available yet (see the README's modes section).
"""

from __future__ import annotations

from typing import Mapping

import torch

# the normalisation weights diffusers' FluxControlPipeline loads from a control LoRA (written, not low-rank)
NORM_KEYS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")
NOT_YET = ("the studio does not support FluxControlPipeline yet, so control LoRAs cannot be composed; use "
           "diffusers' FluxControlPipeline.load_lora_weights for them")


def _norm_keys(keys) -> list[str]:
    """Keys like ``transformer.transformer_blocks.0.attn.norm_q.weight``."""
    out = []
    for key in keys:
        parts = key.split(".")
        if len(parts) >= 2 and parts[-2] in NORM_KEYS and parts[-1] == "weight" and "lora" not in key:
            out.append(key)
    return out


def _input_width(transformer) -> int | None:
    embedder = getattr(transformer, "x_embedder", None)
    weight = getattr(embedder, "weight", None)
    return int(weight.shape[1]) if isinstance(weight, torch.Tensor) and weight.ndim == 2 else None


def control_lora_problem(tensors: Mapping[str, torch.Tensor], file_format: str, pipe=None) -> str | None:
    """Why ``tensors`` (a LoRA file's state dict, ``file_format`` as :func:`pipelines.adapters.metadata.
    detect_format` labels it) is a FLUX control LoRA the studio cannot compose, or ``None`` for other files.

    ``pipe``: the loaded pipeline, whose transformer's ``x_embedder`` width tells a widened input apart."""
    if file_format == "bfl-control":
        return ("this is a FLUX control LoRA in BFL's layout (Canny/Depth: img_in and query_norm.scale keys): it "
                "widens the transformer's image input embedder and replaces normalisation scales, and needs a "
                f"control image through diffusers' FluxControlPipeline; {NOT_YET}")
    lora_keys = [k for k in tensors if "lora_A" in k or "lora_B" in k]
    if not lora_keys:
        return None
    norms = _norm_keys(tensors)
    if norms:
        return (f"this is a FLUX control LoRA in diffusers' layout: besides LoRA factors it holds normalisation "
                f"scales ({norms[0]}, ...) that FluxControlPipeline writes into the transformer; {NOT_YET}")
    embedder = next((k for k in tensors if k.removeprefix("transformer.") == "x_embedder.lora_A.weight"), None)
    width = _input_width(getattr(pipe, "transformer", None)) if pipe is not None else None
    if embedder is not None and width is not None and tensors[embedder].ndim == 2 \
            and int(tensors[embedder].shape[1]) > width:
        return (f"this is a FLUX control LoRA in diffusers' layout: its x_embedder takes "
                f"{int(tensors[embedder].shape[1])} input channels, the model's {width} (the control image's latents "
                f"are concatenated to the image latents, as diffusers' FluxControlPipeline does); {NOT_YET}")
    return None
