"""Helpers for the batch tests: a tiny random open_clip model on disk and small grids."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_LORAS = ROOT / "assets" / "loras" / "tiny-sdxl"

# A ViT/transformer CLIP at toy width, built from a custom config (no download): open_clip's CLIP class.
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def write_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """open_clip's local folder layout: ``open_clip_config.json`` + ``open_clip_model.safetensors``."""
    import open_clip
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_CLIP_CONFIG)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CONFIG, "preprocess_cfg": {}}))
    return folder


def write_grid(path: Path, *, prompts: int = 2, strategies=("merge", "composite"), seeds=(0, 1), steps: int = 2,
               extra: str = "") -> Path:
    """A grid over the shipped tiny-SDXL example LoRAs with concept texts."""
    texts = ["a zorb in a garden, inkwash painting", "a zorb on a beach, inkwash painting",
             "a zorb in the snow, inkwash painting"][:prompts]
    prompt_tables = "\n".join(f'[[prompts]]\ntext = "{t}"\n' for t in texts)
    path.write_text(f"""model = "tiny-sdxl"
steps = {steps}
guidance = 5.0

[[stacks]]
name = "zorb+inkwash"
loras = [
  {{ source = "{EXAMPLE_LORAS / 'random-subject.safetensors'}", name = "subject", weight = 0.9, concept = "a zorb" }},
  {{ source = "{EXAMPLE_LORAS / 'random-style.safetensors'}", name = "style", weight = 0.7, concept = "inkwash" }},
]

{prompt_tables}
[axes]
strategy = {json.dumps(list(strategies))}
seed = {json.dumps(list(seeds))}
{extra}
""")
    return path


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DIFFUSERS_VERBOSITY="error", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def studio_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "studio.cli", *args]
