"""Previews of the image while it is being denoised, decoded from the pipeline's intermediate latents.

:class:`LatentPreview` is a step callback for :meth:`studio.Studio.compose` (``callback=``): every
``every`` steps it decodes the current latents with the pipeline's own VAE exactly as the stock SDXL / FLUX.1
pipelines decode their final latents (FLUX latents are unpacked first; the VAE's scaling and shift factors
and SDXL's optional latents mean/std are applied), so the preview of the last step *is* the final image.
Large images are previewed at a reduced size: the latents are average-pooled by an integer factor before
decoding, which keeps the cost of a preview a fraction of a full decode.

    >>> preview = LatentPreview(studio, on_preview=lambda step, total, image: image.save(f"step{step}.png"),
    ...                         every=5, max_side=384).set_size(1024, 1024)
    >>> studio.compose("a fox", loras, "composite", callback=preview, width=1024, height=1024)

FLUX latents are packed, so the callback needs the image size: give it with :meth:`LatentPreview.set_size`
(``compose`` passes the callback only the step and the latents).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from PIL import Image

__all__ = ["LatentPreview", "decode_latents"]


def decode_latents(pipe, family_name: str, latents: torch.Tensor, width: int, height: int,
                   max_side: int | None = None) -> list[Image.Image] | None:
    """Decode a pipeline's latents (as ``callback_on_step_end`` sees them) to PIL images.

    ``max_side`` bounds the longer side of the preview: the latents are average-pooled by the smallest integer
    factor that brings it under the bound. Returns ``None`` when the decode is not finite (an fp16 VAE that
    overflows mid-denoise; the final decode of the stock pipeline upcasts instead).
    """
    from diffusers.utils.torch_utils import get_module_execution_device

    vae = pipe.vae
    config = vae.config
    with torch.no_grad():
        if family_name == "flux":
            latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
            latents = latents / config.scaling_factor + config.shift_factor
        else:
            mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
            if mean is not None and std is not None:
                channels = latents.shape[1]
                mean = torch.tensor(mean).view(1, channels, 1, 1).to(latents.device, latents.dtype)
                std = torch.tensor(std).view(1, channels, 1, 1).to(latents.device, latents.dtype)
                latents = latents * std / config.scaling_factor + mean
            else:
                latents = latents / config.scaling_factor
        if max_side:
            factor = math.ceil(max(width, height) / max_side)
            if factor > 1:
                latents = torch.nn.functional.avg_pool2d(latents, factor, ceil_mode=True)
        latents = latents.to(get_module_execution_device(vae), vae.dtype)
        image = vae.decode(latents, return_dict=False)[0]
    if not torch.isfinite(image).all():
        return None
    return pipe.image_processor.postprocess(image, output_type="pil")


class LatentPreview:
    """A ``compose`` step callback that turns every ``every``-th step's latents into a preview image.

    ``on_preview(step, num_steps, image)`` receives the first image of the batch; ``on_step(step, num_steps)``
    (optional) is called on every step, for progress bars. ``every=0`` turns previews off. The final step is
    always previewed when previews are on.
    """

    def __init__(self, studio, on_preview: Callable[[int, int, Image.Image], None] | None = None, *,
                 every: int = 1, max_side: int | None = 512,
                 on_step: Callable[[int, int], None] | None = None):
        self.pipe, self.family = studio.pipe, studio.family.name
        self.on_preview, self.on_step = on_preview, on_step
        self.every, self.max_side = int(every), max_side
        self.width = self.height = None

    def set_size(self, width: int, height: int) -> "LatentPreview":
        self.width, self.height = int(width), int(height)
        return self

    def __call__(self, step: int, num_steps: int, callback_kwargs: dict) -> None:
        if self.on_step is not None:
            self.on_step(step, num_steps)
        if self.on_preview is None or self.every <= 0:
            return
        last = step == num_steps - 1
        if not last and (step + 1) % self.every:
            return
        latents = callback_kwargs.get("latents")
        if latents is None or self.width is None:
            return
        images = decode_latents(self.pipe, self.family, latents[:1], self.width, self.height, self.max_side)
        if images:
            self.on_preview(step, num_steps, images[0])
