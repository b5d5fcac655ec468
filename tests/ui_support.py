"""Helpers shared by the web-app tests: a small LoRA library and a tiny CLIP scorer (random weights, offline)."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "loras"


def build_library(root: Path) -> Path:
    """The shipped example LoRAs (kohya SDXL with trigger-word metadata, diffusers FLUX) in a nested folder.

    ``random-subject`` gets a sibling preview image; the FLUX file does not fit the tiny SDXL model.
    """
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(ASSETS / "tiny-sdxl" / "random-subject.safetensors", root / "random-subject.safetensors")
    (root / "styles").mkdir(exist_ok=True)
    shutil.copy(ASSETS / "tiny-sdxl" / "random-style.safetensors", root / "styles" / "random-style.safetensors")
    (root / "flux").mkdir(exist_ok=True)
    shutil.copy(ASSETS / "tiny-flux" / "random-style.safetensors", root / "flux" / "flux-style.safetensors")
    gradient = np.linspace(0, 255, 96, dtype=np.uint8)
    preview = np.stack([np.tile(gradient, (96, 1)), np.tile(gradient[:, None], (1, 96)),
                        np.full((96, 96), 160, np.uint8)], axis=-1)
    Image.fromarray(preview).save(root / "random-subject.preview.png")
    return root


class TinyClipScorer:
    """``scorer(images, texts) -> list[float]``: 100 x cosine similarity of a randomly initialised, tiny open_clip
    CLIP (a custom config, nothing downloaded). It stands in for the real CLIPScore in tests: the numbers are
    meaningless but deterministic, so the app's plumbing of scores can be checked against a direct computation.
    """

    def __init__(self, seed: int = 0):
        import open_clip
        from open_clip.model import CLIP

        torch.manual_seed(seed)
        self.model = CLIP(embed_dim=16,
                          vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=8, head_width=16),
                          text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)).eval()
        self.preprocess = open_clip.transform.image_transform(32, is_train=False)
        self.tokenizer = open_clip.get_tokenizer("ViT-B-32")
        self.calls = 0

    def __call__(self, images: list[Image.Image], texts: list[str]) -> list[float]:
        self.calls += 1
        with torch.no_grad():
            image = self.model.encode_image(torch.stack([self.preprocess(i) for i in images]), normalize=True)
            text = self.model.encode_text(self.tokenizer(texts), normalize=True)
        return (100 * (image * text).sum(-1)).tolist()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
