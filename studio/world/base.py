"""Training the tiny SDXL and FLUX.1 base models on the world's base concepts.

The VAE is frozen and the training images are encoded once (posterior means); the denoiser and the text
encoders train together (the real models' text encoders came pretrained; ours must learn the world's words).
Only base concepts appear (see :data:`.concepts.BASE`): held-out shapes, textures and backgrounds are left for
the LoRAs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import DataSet
from .models import T5_MAX_LENGTH, world_flux, world_sdxl
from .objectives import denoiser_step_fn
from .trainer import Checkpoint, device, param_groups, train

SEEDS = {"sdxl": 2001, "flux": 2002}
DEFAULTS = {
    "sdxl": {"size": 64, "steps": 25, "guidance": 4.0},
    "flux": {"size": 64, "steps": 25, "guidance": 3.5, "max_sequence_length": T5_MAX_LENGTH},
}


@torch.no_grad()
def encode_latents(vae, data: DataSet, batch_size: int = 256) -> torch.Tensor:
    """VAE posterior means (unscaled) of every image of ``data``."""
    out = []
    dev = next(vae.parameters()).device
    for start in tqdm(range(0, len(data), batch_size), desc="encode", mininterval=5):
        images = torch.from_numpy(data.images[start : start + batch_size]).permute(0, 3, 1, 2).float() / 127.5 - 1
        out.append(vae.encode(images.to(dev)).latent_dist.mean.cpu())
    return torch.cat(out)


def trainable_modules(pipe, family: str) -> dict[str, torch.nn.Module]:
    denoiser = "unet" if family == "sdxl" else "transformer"
    return {denoiser: getattr(pipe, denoiser), "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}


def train_base(family: str, workdir: Path, vae, tokenizer_dir: Path, data: DataSet, latents: torch.Tensor, *,
               steps: int, batch_size: int = 64, lr: float = 6e-4):
    pipe = (world_sdxl if family == "sdxl" else world_flux)(vae, tokenizer_dir).to(device())
    modules = trainable_modules(pipe, family)
    groups = []
    for module in modules.values():
        module.train()
        groups += param_groups(module, 1e-2)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99))
    seed = SEEDS[family]

    step_fn = denoiser_step_fn(family, pipe, data, latents, seed=seed, batch_size=batch_size, drop_rate=0.1,
                               params=[p for g in groups for p in g["params"]], optimizer=optimizer)

    train(f"base-{family}", Checkpoint(workdir / f"base-{family}", modules, optimizer), steps, step_fn, lr=lr,
          every=250, warmup=200)
    for module in modules.values():
        module.eval()
    return pipe


def export_pipeline(pipe, family: str, folder: Path, only: str | tuple[str, ...] | None = None, **defaults) -> None:
    """Save in diffusers format (float16 weights, loaded back as float32 on the CPU) plus studio defaults
    (``defaults`` adds to or overrides the family's, e.g. ``guidance_distilled=True``). ``only`` names the
    component(s) that changed (e.g. ``"transformer"``); the others on disk are left as they are."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    home = pipe.device
    if only is None:
        pipe.to("cpu", torch.float16).save_pretrained(str(folder), safe_serialization=True)
    for name in (only,) if isinstance(only, str) else only or ():
        getattr(pipe, name).to("cpu", torch.float16).save_pretrained(str(folder / name), safe_serialization=True)
    pipe.to(home, torch.float32)
    for config in folder.glob("*/config.json"):  # a pipeline loaded from disk records that path: not for shipping
        entries = json.loads(config.read_text())
        if entries.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(entries, indent=2, sort_keys=True) + "\n")
    (folder / "studio_defaults.json").write_text(json.dumps(DEFAULTS[family] | defaults, indent=2) + "\n")
