"""Rendered data sets of the tiny world, and seeded batches drawn from them.

A data set is ``count`` scenes from a :class:`SceneSampler`, rendered once and stored as ``uint8`` images with
their attribute indices (``.npz`` in the build folder). Batch ``k`` of a training stream depends only on the
stream's seed and ``k``, so a run resumed from a checkpoint at step k sees the batches an uninterrupted run
would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .concepts import ATTRIBUTES, BASE, Scene, SceneSampler, pair_caption
from .render import render, render_pair

_ORDER = tuple(ATTRIBUTES)


@dataclass
class DataSet:
    images: np.ndarray  # [N, 64, 64, 3] uint8
    attributes: np.ndarray  # [N, len(ATTRIBUTES)] int16 indices into ATTRIBUTES values
    family: str | None = None  # captions name held-out shapes as this family's adapters are called (concepts)

    def for_family(self, family: str) -> "DataSet":
        """The same renders, captioned for ``family``'s adapters (:func:`.concepts.shape_word`)."""
        return replace(self, family=family)

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
        return images, [s.caption(self.family) for s in scenes], scenes


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


# ------------------------------------------------------------------------------------------ two-object scenes
@dataclass
class PairSet:
    """Two-object scenes (issue 14): one small shape in each half on one background, captioned in the world's
    two-object grammar (:func:`.concepts.pair_caption`). ``attributes[i, 0]`` is the left scene, ``[i, 1]`` the
    right one."""

    images: np.ndarray  # [N, 64, 64, 3] uint8
    attributes: np.ndarray  # [N, 2, len(ATTRIBUTES)] int16

    def __len__(self) -> int:
        return len(self.images)

    def pair(self, i: int) -> tuple[Scene, Scene]:
        left, right = (Scene(**{a: ATTRIBUTES[a][int(v)] for a, v in zip(_ORDER, row)}) for row in self.attributes[i])
        return left, right

    def take(self, index) -> tuple[torch.Tensor, list[str], list[tuple[Scene, Scene]]]:
        images = torch.from_numpy(self.images[index]).permute(0, 3, 1, 2).float() / 127.5 - 1
        pairs = [self.pair(int(i)) for i in index]
        return images, [pair_caption(*p) for p in pairs], pairs


def sample_pair(rng: np.random.Generator, pool: dict[str, tuple[str, ...]] | None = None) -> tuple[Scene, Scene]:
    """A random two-object scene of ``pool``'s values (default: the base concepts): small shapes, one background."""
    pool = pool or BASE
    background = str(pool["background"][rng.integers(len(pool["background"]))])
    fixed = {"size": "small", "background": background}
    left, right = (SceneSampler(pool=dict(pool), fixed=fixed | {"position": side}).sample(rng)
                   for side in ("left", "right"))
    return left, right


def render_pairs(count: int, seed: int, pool: dict[str, tuple[str, ...]] | None = None) -> PairSet:
    rng = np.random.default_rng(seed)
    images = np.empty((count, 64, 64, 3), np.uint8)
    attributes = np.empty((count, 2, len(_ORDER)), np.int16)
    for i in tqdm(range(count), desc="pairs", mininterval=5):
        left, right = sample_pair(rng, pool)
        images[i] = np.clip(render_pair(left, right, rng) * 255 + 0.5, 0, 255).astype(np.uint8)
        attributes[i] = [[ATTRIBUTES[a].index(s.value(a)) for a in _ORDER] for s in (left, right)]
    return PairSet(images, attributes)


def cached_pairs(path: Path, count: int, seed: int) -> PairSet:
    """Render base-concept pairs once and keep them in ``path`` (``.npz``); later calls load them."""
    path = Path(path)
    if path.exists():
        data = np.load(path)
        return PairSet(data["images"], data["attributes"])
    data = render_pairs(count, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez(tmp, images=data.images, attributes=data.attributes)
    tmp.replace(path)
    return data


@dataclass
class Mixture:
    """Several data sets seen as one (index ``i`` runs through the parts in order), so a training stream drawing
    uniform indices sees each part in proportion to its size; latents are concatenated in the same order."""

    parts: list

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    @property
    def images(self) -> np.ndarray:
        return np.concatenate([p.images for p in self.parts])

    def take(self, index) -> tuple[torch.Tensor, list[str], list]:
        index = np.asarray(index)
        bounds = np.cumsum([0] + [len(p) for p in self.parts])
        images, captions, scenes = [None] * len(index), [None] * len(index), [None] * len(index)
        for k, part in enumerate(self.parts):
            chosen = np.nonzero((index >= bounds[k]) & (index < bounds[k + 1]))[0]
            if len(chosen) == 0:
                continue
            x, c, s = part.take(index[chosen] - bounds[k])
            for j, position in enumerate(chosen):
                images[position], captions[position], scenes[position] = x[j], c[j], s[j]
        return torch.stack(images), captions, scenes
