"""Training objectives of the two families, written against the stock pipelines' own encoders.

Prompts are encoded with the pipeline's ``encode_prompt`` (so training and inference see the same text path);
latents are the VAE posterior means, scaled the way each pipeline un-scales them when decoding.

* SDXL: DDPM on the pipeline scheduler's own schedule and prediction type (the world's: SDXL's scaled-linear
  betas rescaled to zero terminal SNR, v-prediction, :mod:`.models`; an ε-prediction base trains on ε);
  dropped captions get the all-zero embeddings SDXL's pipeline uses for an empty negative prompt
  (``force_zeros_for_empty_prompt``), which is what classifier-free guidance will pair them with.
* FLUX.1: rectified flow, ``x_t = (1 - σ) x_0 + σ ε`` with σ from a logit-normal, target ``ε - x_0``. The
  guidance embedding receives random scales in [1, 5] and the target does not depend on them, so the freshly
  trained base ignores it; :mod:`.distill` then guidance-distills it, as FLUX.1-dev is. Adapters trained on the
  distilled model see guidance 1 (where it predicts the plain conditional flow, the target of this loss), as
  kohya's and ai-toolkit's FLUX.1-dev LoRA trainers do.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.families import ddpm_target

from .models import T5_MAX_LENGTH

SIZE_IDS = (64, 64, 0, 0, 64, 64)


def scale_latents(family: str, vae, raw: torch.Tensor) -> torch.Tensor:
    if family == "flux":
        return (raw - vae.config.shift_factor) * vae.config.scaling_factor
    return raw * vae.config.scaling_factor


def sdxl_loss(pipe, raw_latents: torch.Tensor, captions: list[str], gen: torch.Generator,
              noise_scheduler, guidance: float | None = None) -> torch.Tensor:
    latents = scale_latents("sdxl", pipe.vae, raw_latents)
    b = latents.shape[0]
    prompt_embeds, _, pooled, _ = pipe.encode_prompt(captions, device=latents.device, num_images_per_prompt=1,
                                                     do_classifier_free_guidance=False)
    dev = latents.device
    keep = torch.tensor([1.0 if c else 0.0 for c in captions], device=dev)
    prompt_embeds = prompt_embeds * keep.view(b, 1, 1)
    pooled = pooled * keep.view(b, 1)
    noise = torch.randn(latents.shape, generator=gen).to(dev)  # CPU generators: same draws on every device
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), generator=gen).to(dev)
    noisy = noise_scheduler.add_noise(latents, noise, t)
    time_ids = torch.tensor([SIZE_IDS] * b, dtype=latents.dtype, device=dev)
    pred = pipe.unet(noisy, t, encoder_hidden_states=prompt_embeds,
                     added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    return F.mse_loss(pred, ddpm_target(noise_scheduler, latents, noise, t))


def flux_noised(pipe, raw_latents: torch.Tensor, gen: torch.Generator):
    """A rectified-flow training sample: packed ``x_t``, packed target ``ε - x_0``, σ and the image position ids."""
    latents = scale_latents("flux", pipe.vae, raw_latents)
    b, c, h, w = latents.shape
    dev = latents.device
    noise = torch.randn(latents.shape, generator=gen).to(dev)
    sigma = torch.sigmoid(torch.randn(b, generator=gen)).to(dev)
    noisy = (1 - sigma.view(b, 1, 1, 1)) * latents + sigma.view(b, 1, 1, 1) * noise
    packed = pipe._pack_latents(noisy, b, c, h, w)
    target = pipe._pack_latents(noise - latents, b, c, h, w)
    img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, dev, latents.dtype)
    return packed, target, sigma, img_ids


def flux_encode(pipe, captions: list[str], dev) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    prompt_embeds, pooled, text_ids = pipe.encode_prompt(captions, prompt_2=None, device=dev, num_images_per_prompt=1,
                                                         max_sequence_length=T5_MAX_LENGTH)
    return prompt_embeds, pooled, text_ids


GUIDANCE_RANGE = (1.0, 5.0)  # FLUX guidance scales drawn in base training and in distillation


def random_guidance(b: int, gen: torch.Generator) -> torch.Tensor:
    low, high = GUIDANCE_RANGE
    return low + (high - low) * torch.rand(b, generator=gen)


def flux_loss(pipe, raw_latents: torch.Tensor, captions: list[str], gen: torch.Generator, noise_scheduler=None,
              guidance: float | None = None) -> torch.Tensor:
    """``guidance=None``: random scales in [1, 5] (base training); a number: that scale for every sample."""
    dev = raw_latents.device
    prompt_embeds, pooled, text_ids = flux_encode(pipe, captions, dev)
    packed, target, sigma, img_ids = flux_noised(pipe, raw_latents, gen)
    b = packed.shape[0]
    scales = random_guidance(b, gen) if guidance is None else torch.full((b,), float(guidance))
    pred = pipe.transformer(hidden_states=packed, timestep=sigma, guidance=scales.to(dev), pooled_projections=pooled,
                            encoder_hidden_states=prompt_embeds, txt_ids=text_ids, img_ids=img_ids).sample
    return F.mse_loss(pred, target)


LOSSES = {"sdxl": sdxl_loss, "flux": flux_loss}


def noise_scheduler_for(family: str, pipe):
    """SDXL's training noise: a DDPM scheduler with the pipeline's own betas, terminal-SNR rescaling and
    prediction type, so training and sampling agree. FLUX draws its σ itself (:func:`flux_noised`)."""
    from diffusers import DDPMScheduler

    if family == "sdxl":
        return DDPMScheduler.from_config(pipe.scheduler.config)
    return None


def denoiser_step_fn(family: str, pipe, data, latents: torch.Tensor, *, seed: int, batch_size: int,
                     drop_rate: float, params, optimizer, guidance: float | None = None,
                     loss_fn: Callable | None = None) -> Callable[[int], float]:
    """The training step shared by the base, LoRA, QR-LoRA and distillation stages: a batch drawn from
    ``(seed, step)``, ``drop_rate`` of its captions emptied, the family's loss (or ``loss_fn``, same signature),
    clipped gradients on ``params``, one optimizer step. ``guidance`` is the FLUX guidance input (None: random,
    see :func:`flux_loss`); SDXL has none."""
    from .data import drop_captions
    from .trainer import device

    loss_fn, noise_scheduler, params = loss_fn or LOSSES[family], noise_scheduler_for(family, pipe), list(params)

    def step_fn(step: int) -> float:
        rng = np.random.default_rng([seed, step])
        index = rng.integers(len(data), size=batch_size)
        _, captions, _ = data.take(index)
        captions = drop_captions(captions, drop_rate, seed, step)
        gen = torch.Generator().manual_seed(seed * 100_003 + step)
        loss = loss_fn(pipe, latents[index].to(device()), captions, gen, noise_scheduler, guidance)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step_fn
