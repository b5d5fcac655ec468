"""Rendered data sets of the tiny world, and seeded batches drawn from them.

A data set is ``count`` scenes from a :class:`SceneSampler`, rendered once and stored as ``uint8`` images with
their attribute indices (``.npz`` in the build folder). Batch ``k`` of a training stream depends only on the
stream's seed and ``k``, so a run resumed from a checkpoint at step k sees the batches an uninterrupted run
would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .concepts import ATTRIBUTES, Scene, SceneSampler
from .render import render

_ORDER = tuple(ATTRIBUTES)


@dataclass
class DataSet:
    images: np.ndarray  # [N, 64, 64, 3] uint8
    attributes: np.ndarray  # [N, len(ATTRIBUTES)] int16 indices into ATTRIBUTES values

    def __len__(self) -> int:
        return len(self.images)

    def scene(self, i: int) -> Scene:
        return Scene(**{a: ATTRIBUTES[a][int(v)] for a, v in zip(_ORDER, self.attributes[i])})

    def batch(self, size: int, seed: int, step: int) -> tuple[torch.Tensor, list[str], list[Scene]]:
        """Images ``[B, 3, 64, 64]`` in [-1, 1], captions and scenes of a seeded random batch."""
        rng = np.random.default_rng([seed, step])
        index = rng.integers(len(self), size=size)
        return self.take(index)

    def take(self, index) -> tuple[torch.Tensor, list[str], list[Scene]]:
        images = torch.from_numpy(self.images[index]).permute(0, 3, 1, 2).float() / 127.5 - 1
        scenes = [self.scene(int(i)) for i in index]
        return images, [s.caption() for s in scenes], scenes


def render_set(sampler: SceneSampler, count: int, seed: int, desc: str = "render") -> DataSet:
    rng = np.random.default_rng(seed)
    images = np.empty((count, 64, 64, 3), np.uint8)
    attributes = np.empty((count, len(_ORDER)), np.int16)
    for i in tqdm(range(count), desc=desc, mininterval=5):
        scene = sampler.sample(rng)
        images[i] = np.clip(render(scene, rng) * 255 + 0.5, 0, 255).astype(np.uint8)
        attributes[i] = [ATTRIBUTES[a].index(scene.value(a)) for a in _ORDER]
    return DataSet(images, attributes)


def cached_set(path: Path, sampler: SceneSampler, count: int, seed: int) -> DataSet:
    """Render once and keep the set in ``path`` (``.npz``); later calls load it."""
    path = Path(path)
    if path.exists():
        data = np.load(path)
        return DataSet(data["images"], data["attributes"])
    data = render_set(sampler, count, seed, desc=path.stem)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez(tmp, images=data.images, attributes=data.attributes)
    tmp.replace(path)
    return data


def labels(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """Class indices per attribute (the judge's targets)."""
    return {a: torch.tensor([values.index(s.value(a)) for s in scenes]) for a, values in ATTRIBUTES.items()}


def drop_captions(captions: list[str], rate: float, seed: int, step: int) -> list[str]:
    """Replace a fraction of captions by "" (classifier-free guidance training)."""
    rng = np.random.default_rng([seed, step, 7])
    return ["" if rng.random() < rate else c for c in captions]
