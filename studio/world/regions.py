"""Per-region judging: what the concept judge sees in each region (box) of a tiny-world image.

The concept judge (:mod:`.judge`) reads a whole 64x64 image showing one shape. To ask what the *left* and the
*right* half of a two-subject image show (issue 14, the two-subject benchmark), each box is cut out and turned
into a single-object image the judge knows how to read: the crop keeps its native scale and is placed in the
centre of a judge-sized canvas, and the canvas around it is filled by repeating the crop's outermost columns
(``view="centre"``). Scaling the crop up instead would change the shape's size and the textures' period, which
the judge was trained to read at one scale (``view="zoom"`` is kept to show this in the measurements).

Boxes are fractions ``(x0, y0, x1, y1)`` of the image, as the ``regional`` strategy's presets (``left``, ``right``).
Two-object ground truth comes from :func:`.render.render_pair`; :func:`pair_accuracy` measures how often the
region judge names each half's shape, colour, texture and background (measured on 300 random two-object renders:
98.3% / 100% / 100% / 99.0% clean, 92.0% / 97.2% / 98.7% / 97.8% through the world's VAE; ``zoom`` reads 45% of
shapes), and ``tests/test_world_regions.py`` holds it to that.

A region always gets a verdict: the judge has no "nothing here" class. :func:`placement` adds a plain pixel test
(is there an object, and does it lie inside the region or across its edge?) so that an empty half, or half of one
shape drawn across the middle, is not read as a shape.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .concepts import ATTRIBUTES, Scene

Box = tuple[float, float, float, float]

HALVES: dict[str, Box] = {"left": (0.0, 0.0, 0.5, 1.0), "right": (0.5, 0.0, 1.0, 1.0)}
JUDGED = ("shape", "color", "texture", "background")  # what a region verdict holds (size/position are the box's)
VIEWS = ("centre", "zoom")
JUDGE_SIZE = 64


def as_array(image) -> np.ndarray:
    """An (H, W, 3) float32 array in [0, 1] from a PIL image, a uint8 array or a float array in [0, 1]."""
    if hasattr(image, "convert"):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"a region judge needs an RGB image (H, W, 3); got shape {array.shape}")
    return array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array.astype(np.float32)


def box_pixels(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
    """Pixel bounds ``(x0, y0, x1, y1)`` of a fractional box; refuses a box outside the image or empty."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
        raise ValueError(f"region box {box} must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
    px = (round(x0 * width), round(y0 * height), round(x1 * width), round(y1 * height))
    if px[2] - px[0] < 4 or px[3] - px[1] < 4:
        raise ValueError(f"region box {box} is under 4 pixels wide or high on a {width}x{height} image")
    return px


def region_view(image, box: Box, view: str = "centre") -> np.ndarray:
    """The judge-sized (64, 64, 3) image showing only ``box`` of ``image``.

    ``centre``: the image is resized to 64x64 (a no-op in the tiny world), the box cut out at native scale and
    placed in the middle of the canvas; columns and rows outside it repeat the crop's edge (``numpy.pad`` in
    ``edge`` mode), so the shape keeps its size and texture and the surround its background colour.
    ``zoom``: the crop's bounding square is resized to 64x64 (changes the shape's scale; for comparison).
    """
    from PIL import Image

    if view not in VIEWS:
        raise ValueError(f"unknown region view {view!r}; known: {', '.join(VIEWS)}")
    array = as_array(image)
    if array.shape[:2] != (JUDGE_SIZE, JUDGE_SIZE):
        pil = Image.fromarray(np.clip(array * 255 + 0.5, 0, 255).astype(np.uint8))
        array = as_array(pil.resize((JUDGE_SIZE, JUDGE_SIZE), Image.BICUBIC))
    x0, y0, x1, y1 = box_pixels(box, JUDGE_SIZE, JUDGE_SIZE)
    crop = array[y0:y1, x0:x1]
    if view == "zoom":
        side = max(x1 - x0, y1 - y0)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        sx0 = int(np.clip(round(cx - side / 2), 0, JUDGE_SIZE - side))
        sy0 = int(np.clip(round(cy - side / 2), 0, JUDGE_SIZE - side))
        square = array[sy0:sy0 + side, sx0:sx0 + side]
        pil = Image.fromarray(np.clip(square * 255 + 0.5, 0, 255).astype(np.uint8))
        return as_array(pil.resize((JUDGE_SIZE, JUDGE_SIZE), Image.BICUBIC))
    h, w = crop.shape[:2]
    left, top = (JUDGE_SIZE - w) // 2, (JUDGE_SIZE - h) // 2
    return np.pad(crop, ((top, JUDGE_SIZE - h - top), (left, JUDGE_SIZE - w - left), (0, 0)), mode="edge")


def placement(image, box: Box, threshold: float = 0.25, min_share: float = 0.04, margin: float = 0.2,
              textured: float = 0.15, edge_share: float = 0.2) -> str:
    """Where an object lies relative to ``box``: ``"inside"``, ``"crossing"``, ``"none"`` or ``"unknown"``.

    Foreground = pixels farther than ``threshold`` (RGB distance, [0, 1] channels) from the image's border colour
    (median of its outermost rows and columns). Under ``min_share`` of the box's pixels in the foreground: ``none``.
    Else the foreground's centroid within the box must lie in its middle (``margin`` .. 1 − ``margin`` of its width
    and height) for ``inside``; a centroid near an edge, or more than ``edge_share`` of the foreground along an
    edge of the box that lies inside the image (where the box meets its neighbour), means an object cut by the box
    (one shape drawn across the middle of a two-subject image reads as part of a shape in each half): ``crossing``.

    A plain pixel test, not a judge: a textured background (bricks, waves, grid) differs from its own median, so
    the test only works on plain backgrounds (``light`` / ``dark``). Where more than ``textured`` of the border
    pixels are foreground by that rule, the background is textured and the answer is ``unknown``."""
    array = as_array(image)
    h, w = array.shape[:2]
    border = np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]])
    median = np.median(border, axis=0)
    if float((np.linalg.norm(border - median, axis=-1) > threshold).mean()) > textured:
        return "unknown"
    foreground = np.linalg.norm(array - median, axis=-1) > threshold
    x0, y0, x1, y1 = box_pixels(box, w, h)
    inside = foreground[y0:y1, x0:x1]
    if inside.mean() < min_share:
        return "none"
    inner_edges = [line for line, on_border in ((inside[:, 0], x0 == 0), (inside[:, -1], x1 == w),
                                                (inside[0], y0 == 0), (inside[-1], y1 == h)) if not on_border]
    if any(line.mean() > edge_share for line in inner_edges):
        return "crossing"
    ys, xs = np.nonzero(inside)
    cx, cy = (xs.mean() + 0.5) / (x1 - x0), (ys.mean() + 0.5) / (y1 - y0)
    return "inside" if margin <= cx <= 1 - margin and margin <= cy <= 1 - margin else "crossing"


@dataclass(frozen=True)
class RegionVerdict:
    """What the judge read in one region: the top value per judged attribute, and where an object lies
    (:func:`placement`); a region *shows* a value only with an object inside it, or, on a textured background
    where the pixel test cannot tell (``unknown``), on the judge's word alone."""

    values: dict[str, str]
    placement: str

    def shows(self, attribute: str, value: str) -> bool:
        return self.placement in ("inside", "unknown") and self.values.get(attribute) == value


def judge_regions(judge, images: Sequence, boxes: Mapping[str, Box] = HALVES, view: str = "centre"
                  ) -> list[dict[str, RegionVerdict]]:
    """Per image, ``{region name: RegionVerdict}`` for every box (one batched judge call for all crops)."""
    import torch

    names = list(boxes)
    views = [region_view(image, boxes[name], view) for image in images for name in names]
    if not views:
        return []
    batch = torch.from_numpy(np.stack(views)).permute(0, 3, 1, 2) * 2 - 1
    predictions = judge.predict(batch)
    out = []
    for i, image in enumerate(images):
        verdicts = {}
        for j, name in enumerate(names):
            top = predictions[i * len(names) + j]
            verdicts[name] = RegionVerdict({a: top[a] for a in JUDGED if a in top},
                                           placement(image, boxes[name]))
        out.append(verdicts)
    return out


def pair_scenes(count: int, rng: np.random.Generator, backgrounds: Sequence[str] = ATTRIBUTES["background"],
                shapes: Sequence[str] = ATTRIBUTES["shape"]) -> list[tuple[Scene, Scene]]:
    """Random two-object scenes (left, right): small shapes of any shape, colour and texture, one background."""
    pairs = []
    for _ in range(count):
        background = str(backgrounds[rng.integers(len(backgrounds))])
        pair = []
        for side in ("left", "right"):
            pair.append(Scene(shape=str(shapes[rng.integers(len(shapes))]),
                              color=str(ATTRIBUTES["color"][rng.integers(4)]),
                              texture=str(ATTRIBUTES["texture"][rng.integers(4)]),
                              background=background, size="small", position=side))
        pairs.append((pair[0], pair[1]))
    return pairs


def pair_accuracy(judge, images: Sequence, pairs: Sequence[tuple[Scene, Scene]], view: str = "centre"
                  ) -> dict[str, float]:
    """Share of regions (two per image) whose judged shape / colour / texture / background match the scene."""
    verdicts = judge_regions(judge, images, HALVES, view)
    hits = {a: [] for a in JUDGED}
    for verdict, pair in zip(verdicts, pairs):
        for name, scene in zip(("left", "right"), pair):
            for a in JUDGED:
                hits[a].append(verdict[name].values[a] == scene.value(a))
    return {a: float(np.mean(v)) for a, v in hits.items()}


__all__ = [
    "HALVES",
    "JUDGED",
    "RegionVerdict",
    "as_array",
    "box_pixels",
    "judge_regions",
    "pair_accuracy",
    "pair_scenes",
    "placement",
    "region_view",
]
