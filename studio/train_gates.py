"""``studio train-gates``: train AutoLoRA's fusion gates for one stack of LoRAs, the model frozen.

    studio train-gates --lora subject.safetensors --lora style.safetensors --model stabilityai/... \\
        [--images 0=photos/subject/ --caption 0="sks dog"] [--steps 400] [--lr 1e-4] [--seed 0]

Only the gate parameters of :mod:`fusion.gates` train (one gate per LoRA'd linear layer of the denoiser); the
base model and the LoRAs stay frozen. Training data: for each LoRA, images of its concept with a caption — a
folder you pass (``--images K=DIR``), or, by default, ``--renders`` images rendered with that LoRA alone
(merge, seeds ``seed``, ``seed+1``, ...; captions: ``--caption``, else the file's trigger words, else its
name). Each step draws one image of LoRA k, noises it at a random timestep and, with **all** LoRAs of the stack
active through their gates, minimises AutoLoRA's objective (Li et al. 2025, Sec. 3.3):

    L = MSE(ε̂(x_t, t, c_k), target) + max(0, m − MSE(ε̂(x_t, t, c_j), target)),   j ≠ k random

(target: the noise ε for SDXL, ``ε − x_0`` for FLUX's flow matching; margin m = 0.5); with probability 0.3 the
caption is dropped (empty prompt, no hinge term). AdamW with a cosine learning-rate decay, as in the paper
(which trains 20 epochs × 400 steps in bf16 on pairs of LoRAs); both predictions run as one batch of two.
The gates are saved beside the stack (:func:`fusion.gates.gates_path`), where ``strategy="gated"`` finds them.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from fusion.gates import GateSet, gates_path, stack_metadata
from pipelines.errors import StudioError
from pipelines.families import ddpm_target

from .lora import Lora

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@dataclass
class GateTraining:
    """Hyper-parameters (defaults: the paper's, one epoch of 400 steps)."""

    steps: int = 400
    lr: float = 1e-4
    margin: float = 0.5
    caption_dropout: float = 0.3
    seed: int = 0
    renders: int = 4  # images rendered per LoRA when no folder is given
    render_steps: int | None = None  # denoising steps of those renders (model default if None)
    size: int | None = None  # training image size (the studio's default size if None)


@dataclass
class TrainedGates:
    path: Path
    losses: list[float]
    data: list[str] = field(default_factory=list)  # per LoRA: where its images came from


def _load_folder(folder: Path, size: int) -> list[np.ndarray]:
    from PIL import Image, ImageOps

    if not folder.is_dir():
        raise StudioError(f"{folder}: not a folder of training images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise StudioError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) to train on")
    images = []
    for path in files:
        try:
            with Image.open(path) as im:
                im = ImageOps.fit(im.convert("RGB"), (size, size), Image.Resampling.BICUBIC)
                images.append(np.asarray(im, dtype=np.float32) / 255.0)
        except OSError as e:
            raise StudioError(f"{path}: cannot read the image ({e})") from None
    return images


class _Denoiser:
    """Noising, conditioning and one batched prediction for the studio's model family."""

    def __init__(self, studio, size: int):
        self.pipe, self.family, self.state = studio.pipe, studio.family, studio.composer.state
        self.device = studio.device
        self.size = size
        self.module = getattr(self.pipe, self.family.denoiser)
        self.dtype = next(self.module.parameters()).dtype
        if self.family.name == "sdxl":
            from diffusers import DDPMScheduler

            self.noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)

    @torch.no_grad()
    def encode_image(self, image: np.ndarray, generator: torch.Generator) -> torch.Tensor:
        vae = self.pipe.vae
        pixels = torch.from_numpy(image).permute(2, 0, 1)[None].to(self.device, vae.dtype) * 2 - 1
        latents = vae.encode(pixels).latent_dist.sample(generator)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * vae.config.scaling_factor).to(self.dtype)

    @torch.no_grad()
    def encode_text(self, prompt: str) -> dict:
        pipe = self.pipe
        if self.family.name == "sdxl":
            pe, _, ppe, _ = pipe.encode_prompt(prompt=prompt, device=self.device, num_images_per_prompt=1,
                                               do_classifier_free_guidance=False)
            time_ids = pipe._get_add_time_ids((self.size, self.size), (0, 0), (self.size, self.size), dtype=pe.dtype,
                                              text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
            return {"encoder_hidden_states": pe, "text_embeds": ppe, "time_ids": time_ids.to(self.device)}
        pe, ppe, text_ids = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=self.device,
                                               num_images_per_prompt=1)
        return {"encoder_hidden_states": pe, "pooled_projections": ppe, "txt_ids": text_ids}

    def noise(self, x0: torch.Tensor, generator: torch.Generator):
        """``(x_t, timestep argument, noise level in [0, 1], target)``."""
        eps = torch.randn(x0.shape, generator=generator, device="cpu").to(x0.device, x0.dtype)
        if self.family.name == "sdxl":
            sched = self.noise_scheduler
            t = torch.randint(0, sched.config.num_train_timesteps, (1,), generator=generator).to(x0.device)
            x_t = sched.add_noise(x0, eps, t)
            return x_t, t, t.float() * self.family.timestep_scale, ddpm_target(sched, x0, eps, t)
        sigma = torch.rand((1,), generator=generator).to(x0.device, x0.dtype)
        x_t = (1 - sigma) * x0 + sigma * eps
        return x_t, sigma, sigma.float(), eps - x0

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, level: torch.Tensor, conds: list[dict]) -> torch.Tensor:
        """Predictions for ``x_t`` under each conditioning in ``conds`` (one batched forward)."""
        n = len(conds)
        self.state.timestep = level.reshape(-1).repeat(n).cpu()

        def cat(key):
            return torch.cat([c[key] for c in conds], dim=0)

        if self.family.name == "sdxl":
            return self.module(x_t.repeat(n, 1, 1, 1), t.repeat(n), encoder_hidden_states=cat("encoder_hidden_states"),
                               added_cond_kwargs={"text_embeds": cat("text_embeds"), "time_ids": cat("time_ids")},
                               return_dict=False)[0]
        b, c, h, w = x_t.shape
        packed = self.pipe._pack_latents(x_t, b, c, h, w).repeat(n, 1, 1)
        image_ids = self.pipe._prepare_latent_image_ids(b, h // 2, w // 2, x_t.device, x_t.dtype)
        guidance = None
        if self.module.config.guidance_embeds:
            guidance = torch.full((n,), 3.5, device=x_t.device, dtype=x_t.dtype)
        out = self.module(hidden_states=packed, timestep=t.repeat(n), guidance=guidance,
                          pooled_projections=cat("pooled_projections"),
                          encoder_hidden_states=cat("encoder_hidden_states"), txt_ids=conds[0]["txt_ids"],
                          img_ids=image_ids, return_dict=False)[0]
        return out

    def pack_target(self, target: torch.Tensor) -> torch.Tensor:
        if self.family.name == "sdxl":
            return target
        b, c, h, w = target.shape
        return self.pipe._pack_latents(target, b, c, h, w)


def autolora_loss(pred_own: torch.Tensor, pred_other: torch.Tensor | None, target: torch.Tensor,
                  margin: float) -> torch.Tensor:
    """``MSE(pred_own, target) + max(0, margin − MSE(pred_other, target))`` (no hinge without ``pred_other``)."""
    loss = F.mse_loss(pred_own.float(), target.float())
    if pred_other is not None:
        loss = loss + torch.relu(margin - F.mse_loss(pred_other.float(), target.float()))
    return loss


def train_gates(
    studio,
    loras: Iterable,
    *,
    captions: Mapping[int, str] | None = None,
    image_dirs: Mapping[int, str | Path] | None = None,
    config: GateTraining | None = None,
    out: str | Path | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> TrainedGates:
    """Train and save gates for the stack ``loras`` on ``studio``'s model (see the module docstring)."""
    config = config or GateTraining()
    if config.steps < 1 or config.renders < 1:
        raise StudioError("training needs at least one step and one image per LoRA")
    if not (config.lr > 0 and config.margin >= 0 and 0 <= config.caption_dropout < 1):
        raise StudioError(f"bad training settings: lr {config.lr} (> 0), margin {config.margin} (>= 0), "
                          f"caption dropout {config.caption_dropout} (in [0, 1))")
    specs = [Lora.parse(spec) for spec in loras]
    if len(specs) < 2:
        raise StudioError("gates fuse several LoRAs: give at least two")
    captions, image_dirs = dict(captions or {}), dict(image_dirs or {})
    for k in [*captions, *image_dirs]:
        if not 0 <= k < len(specs):
            raise StudioError(f"LoRA index {k} is out of range for a stack of {len(specs)}")
    names = studio.load(specs)
    loaded = studio.loaded()
    sources = [loaded[n].source for n in names]
    hashes = [loaded[n].sha256 for n in names]
    path = Path(out) if out else gates_path(sources, studio.model, hashes)
    size = int(config.size or studio.default_size)
    texts = [captions.get(k) or ", ".join(loaded[n].info.triggers) or n for k, n in enumerate(names)]

    # 1. images of each LoRA's concept: a folder, or renders with that LoRA alone
    data, images = [], []
    for k, spec in enumerate(specs):
        if k in image_dirs:
            images.append(_load_folder(Path(image_dirs[k]).expanduser(), size))
            data.append(f"{len(images[-1])} images from {image_dirs[k]}")
        else:
            result = studio.compose(texts[k], [spec], "merge", seed=config.seed, count=config.renders,
                                    steps=config.render_steps, width=size, height=size, output_type="np")
            images.append(result.latents)
            data.append(f"{config.renders} renders with this LoRA alone")

    composer, state = studio.composer, studio.composer.state
    den = _Denoiser(studio, size)
    generator = torch.Generator("cpu").manual_seed(config.seed)
    rng = random.Random(config.seed)
    gates = GateSet.for_stack(composer, names).to(studio.device)
    frozen = {p: p.requires_grad for m in studio.pipe.components.values() if isinstance(m, torch.nn.Module)
              for p in m.parameters()}
    saved_gains = (state.text_gains.clone(), state.denoiser_gains.clone())
    losses: list[float] = []
    try:
        for p in frozen:
            p.requires_grad_(False)
        state.set_active(names)
        row = state.gains_row({n: s.weight for n, s in zip(names, specs)})[None]
        state.set_gains(text=row, denoiser=row)
        latents = [[den.encode_image(im, generator) for im in per_lora] for per_lora in images]
        conds = [den.encode_text(t) for t in texts]
        empty = den.encode_text("")
        gates.attach(composer)
        params = [p for g in gates.gates for p in g.parameters()]
        optimizer = torch.optim.AdamW(params, lr=config.lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.steps)
        with torch.enable_grad():
            for step in range(config.steps):
                k = step % len(names) if step < len(names) else rng.randrange(len(names))
                x0 = latents[k][rng.randrange(len(latents[k]))]
                x_t, t, level, target = den.noise(x0, generator)
                target = den.pack_target(target)
                if rng.random() < config.caption_dropout:
                    pred = den.predict(x_t, t, level, [empty])
                    loss = autolora_loss(pred, None, target, config.margin)
                else:
                    other = rng.choice([j for j in range(len(names)) if j != k])
                    pred = den.predict(x_t, t, level, [conds[k], conds[other]])
                    loss = autolora_loss(pred[:1], pred[1:], target, config.margin)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                losses.append(loss.detach().item())
                if progress is not None:
                    progress(step + 1, config.steps, losses[-1])
    finally:
        gates.detach()
        state.timestep = None
        state.set_gains(text=saved_gains[0], denoiser=saved_gains[1])
        for p, flag in frozen.items():
            p.requires_grad_(flag)
    metadata = stack_metadata(studio.model, studio.family.name, names, sources, hashes, steps=config.steps,
                              lr=config.lr, margin=config.margin, caption_dropout=config.caption_dropout,
                              seed=config.seed, size=size, captions=json.dumps(texts), data=json.dumps(data),
                              final_loss=f"{losses[-1]:.6g}")
    gates.save(path, metadata)
    return TrainedGates(path=path, losses=losses, data=data)
