"""The concept judge: a small CNN that says which shape, colour, texture, background, size and position an
image shows.

It is trained on renders of every concept (held-out ones included). Half of each training batch goes through
the world's VAE and back, and every image gets light noise and blur, so that the judge reads generated images
(which carry the codec's and the sampler's artifacts) as well as clean renders. Composition success in the
benchmark means: every concept the prompt asked for is the judge's top prediction.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .concepts import ATTRIBUTES
from .data import DataSet, labels
from .trainer import Checkpoint, device, param_groups, train

SEED = 3001


class Judge(nn.Module):
    def __init__(self, attributes: dict[str, tuple[str, ...]] = ATTRIBUTES, width: int = 32):
        super().__init__()
        self.attributes = {k: tuple(v) for k, v in attributes.items()}
        w = width

        def block(cin, cout, stride):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())

        self.features = nn.Sequential(block(3, w, 1), block(w, w, 2), block(w, 2 * w, 1), block(2 * w, 2 * w, 2),
                                      block(2 * w, 4 * w, 2), nn.AdaptiveAvgPool2d(4))  # position survives the 4x4 pool
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 16, 256), nn.SiLU())
        self.heads = nn.ModuleDict({k: nn.Linear(256, len(v)) for k, v in self.attributes.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(self.features(images))
        return {k: head(h) for k, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images) -> list[dict[str, str]]:
        """Top concept per attribute for images (PIL, uint8 arrays, or a [-1, 1] tensor)."""
        x = to_tensor(images).to(next(self.parameters()).device)
        logits = self(x)
        return [{k: self.attributes[k][int(logits[k][i].argmax())] for k in self.attributes} for i in range(len(x))]


def to_tensor(images) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        return images.float()
    arrays = [np.asarray(im.convert("RGB").resize((64, 64)) if hasattr(im, "convert") else im) for im in images]
    x = torch.from_numpy(np.stack(arrays)).float()
    if x.max() > 1.5:
        x = x / 255.0
    return x.permute(0, 3, 1, 2) * 2 - 1


def augment(images: torch.Tensor, vae, gen: torch.Generator) -> torch.Tensor:
    b = images.shape[0]
    if vae is not None:
        half = b // 2
        with torch.no_grad():
            images = images.clone()
            images[:half] = vae.decode(vae.encode(images[:half]).latent_dist.mean).sample.clamp(-1, 1)
    blur = (torch.rand(b, generator=gen) < 0.3).to(images.device)
    if blur.any():
        kernel = torch.tensor([1.0, 2.0, 1.0], device=images.device)
        kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
        images = torch.where(blur.view(b, 1, 1, 1), F.conv2d(images, kernel, padding=1, groups=3), images)
    noise = 0.04 * torch.rand(b, 1, 1, 1, generator=gen) * torch.randn(images.shape, generator=gen)
    return images + noise.to(images.device)


def train_judge(workdir: Path, data: DataSet, vae, steps: int, batch_size: int = 64, lr: float = 2e-3) -> Judge:
    judge = Judge().to(device())
    optimizer = torch.optim.AdamW(param_groups(judge, 1e-4), lr=lr)
    judge.train()

    def step_fn(step: int) -> float:
        images, _, scenes = data.batch(batch_size, SEED, step)
        gen = torch.Generator().manual_seed(SEED * 7 + step)
        logits = judge(augment(images.to(device()), vae, gen))
        targets = labels(scenes)
        loss = sum(F.cross_entropy(logits[k], targets[k].to(device())) for k in judge.attributes)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    train("judge", Checkpoint(workdir / "judge", {"judge": judge}, optimizer), steps, step_fn, lr=lr, every=250)
    judge.eval()
    return judge


@torch.no_grad()
def accuracy(judge: Judge, data: DataSet, vae=None, batch_size: int = 200) -> dict[str, float]:
    """Top-1 accuracy per attribute on ``data`` (through the VAE when given)."""
    correct = {k: 0 for k in judge.attributes}
    for start in range(0, len(data), batch_size):
        images, _, scenes = data.take(np.arange(start, min(start + batch_size, len(data))))
        images = images.to(next(judge.parameters()).device)
        if vae is not None:
            images = vae.decode(vae.encode(images).latent_dist.mean).sample.clamp(-1, 1)
        predictions = judge.predict(images)
        for p, s in zip(predictions, scenes):
            for k in correct:
                correct[k] += p[k] == s.value(k)
    return {k: v / len(data) for k, v in correct.items()}


def save_judge(judge: Judge, folder: Path) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().cpu().contiguous() for k, v in judge.state_dict().items()}, str(folder / "judge.safetensors"))
    (folder / "judge.json").write_text(json.dumps({"attributes": judge.attributes}, indent=2) + "\n")


def load_judge(folder: Path) -> Judge:
    folder = Path(folder)
    config = json.loads((folder / "judge.json").read_text())
    judge = Judge({k: tuple(v) for k, v in config["attributes"].items()})
    judge.load_state_dict({k: v.float() for k, v in load_file(str(folder / "judge.safetensors")).items()})
    return judge.eval()
