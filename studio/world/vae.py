"""The tiny world's image codec: an ``AutoencoderKL`` (the VAE class of SDXL and FLUX.1), 64x64 RGB <-> 16x16x4.

Trained on renders of *every* concept, held-out ones included: like the VAEs of the real models, trained on a
broad corpus, it is a generic codec, and the held-out concepts are withheld from the denoisers only (that is
what a LoRA adapts). Loss: L1 + MSE reconstruction plus a small KL term; afterwards ``scaling_factor`` (and
FLUX's ``shift_factor``) are set from the latent statistics so that scaled latents have unit variance.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .data import DataSet
from .trainer import Checkpoint, device, param_groups, train

SEED = 1001


def build_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=64,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    )


def train_vae(workdir: Path, data: DataSet, steps: int = 2500, batch_size: int = 16, lr: float = 1e-3):
    vae = build_vae().to(device())
    vae.train()
    optimizer = torch.optim.AdamW(param_groups(vae, 1e-4), lr=lr)

    def step_fn(step: int) -> float:
        images = data.batch(batch_size, SEED, step)[0].to(device())
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = (recon - images).abs().mean() + (recon - images).pow(2).mean() + 1e-6 * posterior.kl().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    train("vae", Checkpoint(workdir / "vae", {"vae": vae}, optimizer), steps, step_fn, lr=lr)
    vae.eval()
    with torch.no_grad():
        images = data.batch(256, SEED + 1, 0)[0].to(device())
        latents = vae.encode(images).latent_dist.mean
    mean, std = float(latents.mean()), float(latents.std())
    vae.register_to_config(scaling_factor=1.0 / std, shift_factor=mean)
    return vae


def load_shipped_vae(folder: Path):
    """The VAE of a shipped base model (both families share it), on the training device, frozen by the caller."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(folder)).to(device())
    vae.eval()
    return vae
