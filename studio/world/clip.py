"""A tiny CLIP for the tiny world (open_clip, custom config), trained contrastively on the world's captions.

It makes CLIPScore meaningful offline. Saved in open_clip's own local-folder layout (``open_clip_config.json``
+ ``open_clip_model.safetensors`` + the world tokenizer in Hugging Face format), so any open_clip user loads it
with ``open_clip.create_model_and_transforms("local-dir:assets/models/tiny-clip")`` and
``open_clip.get_tokenizer("local-dir:assets/models/tiny-clip")``.

Texts are full captions or, half of the time, a random subset of the caption's phrases (``"a zorb"``,
``"striped"``, ``"a red zorb on a bricks background"``), so that per-concept texts score sensibly. Images get
the judge's augmentation (VAE round trip, blur, noise).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from .concepts import ATTRIBUTES, Scene
from .data import DataSet
from .judge import augment
from .trainer import Checkpoint, device, param_groups, train

SEED = 4001
CONTEXT = 32


def model_config(vocab_size: int) -> dict:
    return {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": CONTEXT, "vocab_size": vocab_size, "width": 64, "heads": 4, "layers": 3,
                     "hf_tokenizer_name": "world-tokenizer"},
    }


PREPROCESS = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic", "resize_mode": "shortest"}


def phrases(scene: Scene, rng: np.random.Generator) -> str:
    parts = {
        "shape": f"a {scene.shape}",
        "color": f"a {scene.color} {scene.shape}",
        "texture": scene.texture,
        "background": f"a {scene.background} background",
        "position": scene.position,
        "size": f"a {scene.size} {scene.shape}",
    }
    keys = [k for k in parts if rng.random() < 0.5] or [list(parts)[rng.integers(len(parts))]]
    return ", ".join(parts[k] for k in keys)


def build_clip(vocab_size: int):
    import open_clip

    torch.manual_seed(0)
    return open_clip.model.CLIP(**model_config(vocab_size))


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", max_length=CONTEXT, truncation=True, return_tensors="pt").input_ids


def train_clip(workdir: Path, data: DataSet, vae, tokenizer, steps: int, batch_size: int = 128, lr: float = 1e-3):
    model = build_clip(len(tokenizer)).to(device())
    model.train()
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=lr)

    def step_fn(step: int) -> float:
        rng = np.random.default_rng([SEED, step])
        index = rng.integers(len(data), size=batch_size)
        images, captions, scenes = data.take(index)
        texts = [c if rng.random() < 0.5 else phrases(s, rng) for c, s in zip(captions, scenes)]
        gen = torch.Generator().manual_seed(SEED * 13 + step)
        image_features = F.normalize(model.encode_image(augment(images.to(device()), vae, gen)), dim=-1)
        text_features = F.normalize(model.encode_text(tokenize(tokenizer, texts).to(device())), dim=-1)
        logits = model.logit_scale.exp() * image_features @ text_features.T
        # texts that are identical describe every image they were drawn for: treat them as positives
        same = torch.tensor([[a == b for b in texts] for a in texts], dtype=torch.float32, device=device())
        targets = same / same.sum(1, keepdim=True)
        loss = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)
        return loss.item()

    train("clip", Checkpoint(workdir / "clip", {"clip": model}, optimizer), steps, step_fn, lr=lr, every=250)
    model.eval()
    return model


ZERO_SHOT = {
    "shape": lambda v: f"a {v}",
    "color": lambda v: f"a {v} shape",
    "texture": lambda v: v,
    "background": lambda v: f"a {v} background",
    "size": lambda v: f"a {v} shape",
    "position": lambda v: v,
}


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, data: DataSet, vae=None, batch_size: int = 200) -> dict[str, float]:
    """Per attribute: how often the text of the true value has the highest cosine with the image."""
    dev = next(model.parameters()).device
    text_features = {a: F.normalize(model.encode_text(tokenize(tokenizer, [ZERO_SHOT[a](v) for v in values]).to(dev)),
                                    dim=-1) for a, values in ATTRIBUTES.items()}
    correct = {a: 0 for a in ATTRIBUTES}
    for start in range(0, len(data), batch_size):
        images, _, scenes = data.take(np.arange(start, min(start + batch_size, len(data))))
        images = images.to(dev)
        if vae is not None:
            images = vae.decode(vae.encode(images).latent_dist.mean).sample.clamp(-1, 1)
        image_features = F.normalize(model.encode_image(images), dim=-1)
        for a, values in ATTRIBUTES.items():
            predicted = (image_features @ text_features[a].T).argmax(1)
            correct[a] += sum(values[int(p)] == s.value(a) for p, s in zip(predicted, scenes))
    return {a: c / len(data) for a, c in correct.items()}


def save_clip(model, tokenizer, folder: Path) -> None:
    """open_clip's local-folder layout, loadable with ``local-dir:<folder>``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.half().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    config = {"model_cfg": model_config(len(tokenizer)), "preprocess_cfg": PREPROCESS}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save_pretrained(str(folder))
