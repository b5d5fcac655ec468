"""Regions of the image for regional composition: parse a region, rasterise it on the latent grid, feather it.

A region is one of

* a preset box: ``left``/``right``/``top``/``bottom`` (halves; also ``left-half`` ... ``bottom-half``),
  ``center`` (the middle half in both directions), thirds ``left-third``/``middle-third``/``right-third``
  (columns) and ``top-third``/``center-third``/``bottom-third`` (rows);
* fractions of the image ``x0,y0,x1,y1`` (0 <= x0 < x1 <= 1, 0 <= y0 < y1 <= 1; origin top left);
* a mask image file (white = inside; any mode, converted to grey), resized to the latent grid with box
  averaging, so its grey levels become soft weights;
* ``auto``: a mask made during the render from the cross-attention of the LoRA's concept tokens
  (:func:`concept_map`, :func:`auto_masks`; CLoRA's masking, Meral et al., ICCV 2025).

Masks live on the grid the denoiser predicts on: latent pixels for the SDXL UNet, packed 2×2 tokens for FLUX
(MultiDiffusion's ε = Σ_i M_i ⊙ ε_i needs M on the prediction's own grid). :func:`lane_weights` turns the
regions' masks into per-lane weights that sum to one at every position, with a base lane for what no region
covers.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from pipelines.errors import StrategyError

__all__ = ["AUTO", "PRESETS", "auto_masks", "check_region", "concept_map", "describe_region", "is_auto",
           "is_mask_file", "lane_weights", "rasterise"]
AUTO = "auto"

PRESETS: dict[str, tuple[float, float, float, float]] = {
    "left": (0.0, 0.0, 0.5, 1.0), "right": (0.5, 0.0, 1.0, 1.0),
    "top": (0.0, 0.0, 1.0, 0.5), "bottom": (0.0, 0.5, 1.0, 1.0),
    "left-half": (0.0, 0.0, 0.5, 1.0), "right-half": (0.5, 0.0, 1.0, 1.0),
    "top-half": (0.0, 0.0, 1.0, 0.5), "bottom-half": (0.0, 0.5, 1.0, 1.0),
    "center": (0.25, 0.25, 0.75, 0.75),
    "left-third": (0.0, 0.0, 1 / 3, 1.0), "middle-third": (1 / 3, 0.0, 2 / 3, 1.0), "right-third": (2 / 3, 0.0, 1.0, 1.0),
    "top-third": (0.0, 0.0, 1.0, 1 / 3), "center-third": (0.0, 1 / 3, 1.0, 2 / 3), "bottom-third": (0.0, 2 / 3, 1.0, 1.0),
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_REGION_TEXT = 4096


def is_auto(region: str | None) -> bool:
    """Whether ``region`` asks for an automatic mask (``auto``)."""
    return region is not None and str(region).strip().lower() == AUTO


def _box(text: str) -> tuple[float, float, float, float] | None:
    """The box of a preset or of ``x0,y0,x1,y1`` fractions; ``None`` when ``text`` names a mask file."""
    key = text.strip().lower()
    if key in PRESETS:
        return PRESETS[key]
    parts = key.split(",")
    if len(parts) != 4:
        return None
    try:
        x0, y0, x1, y1 = (float(p) for p in parts)
    except ValueError:
        return None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise StrategyError(f"region '{text}': fractions must be finite numbers")
    if min(x0, y0, x1, y1) < 0.0 or max(x0, y0, x1, y1) > 1.0:
        raise StrategyError(f"region '{text}' is outside the image: x0,y0,x1,y1 are fractions of the image in [0, 1]")
    if not (x0 < x1 and y0 < y1):
        raise StrategyError(f"region '{text}' is empty: it needs x0 < x1 and y0 < y1")
    if (x0, y0, x1, y1) == (0.0, 0.0, 1.0, 1.0):
        raise StrategyError(f"region '{text}' covers the whole image; leave the region out to make the LoRA global")
    return x0, y0, x1, y1


def is_mask_file(region: str | None) -> bool:
    """Whether ``region`` names a mask image file (not a preset or fractions)."""
    try:
        return region is not None and not is_auto(region) and _box(str(region)) is None
    except StrategyError:  # bad fractions: reported where the region is checked
        return False


def _open_mask(path: Path, label: str):
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise StrategyError(f"{label}: mask file {path} not found (a region is a preset "
                            f"({', '.join(PRESETS)}), fractions x0,y0,x1,y1 or a mask image file)")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("L")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise StrategyError(f"{label}: mask file {path} is not a readable image ({e.__class__.__name__})") from None


def check_region(region: str, label: str = "region") -> str:
    """Check ``region`` before anything renders; returns it stripped. A mask file is opened and judged at its
    own resolution (neither empty nor covering everything)."""
    if not isinstance(region, (str, Path)):
        raise StrategyError(f"{label}: a region is text (preset, x0,y0,x1,y1 or a mask file), got {type(region).__name__}")
    text = str(region).strip()
    if is_auto(text):
        return AUTO
    if not text or len(text) > MAX_REGION_TEXT:
        raise StrategyError(f"{label}: region must be a preset ({', '.join(PRESETS)}), fractions x0,y0,x1,y1 or a "
                            "mask image file")
    if _box(text) is None:
        mask = torch.tensor(list(_open_mask(Path(text).expanduser(), f"{label} '{text}'").getdata()),
                            dtype=torch.float32) / 255.0
        _check_coverage(mask, f"{label}: mask file {text}")
    return text


def _check_coverage(mask: torch.Tensor, label: str) -> None:
    if float(mask.max()) < 0.5 / 255:
        raise StrategyError(f"{label} is empty (all black): nothing would be inside the region")
    if float(mask.min()) > 254.5 / 255:
        raise StrategyError(f"{label} covers the whole image (all white); leave the region out to make the LoRA global")


def rasterise(region: str, height: int, width: int, label: str = "region") -> torch.Tensor:
    """``region`` as a ``[height, width]`` float mask in [0, 1] on a grid of that size."""
    box = _box(region)
    if box is None:
        image = _open_mask(Path(region).expanduser(), f"{label} '{region}'")
        from PIL import Image

        small = image.resize((width, height), Image.BOX)
        mask = torch.tensor(list(small.getdata()), dtype=torch.float32).view(height, width) / 255.0
        _check_coverage(mask, f"{label}: mask file {region} (resized to the {height}x{width} latent grid)")
        return mask
    x0, y0, x1, y1 = box
    r0, r1, c0, c1 = round(y0 * height), round(y1 * height), round(x0 * width), round(x1 * width)
    if r1 <= r0 or c1 <= c0:
        raise StrategyError(f"{label} '{region}' is smaller than one cell of the {height}x{width} latent grid")
    mask = torch.zeros(height, width)
    mask[r0:r1, c0:c1] = 1.0
    return mask


def feather(mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of a ``[H, W]`` mask with standard deviation ``sigma`` cells (edges replicated)."""
    if sigma <= 0:
        return mask
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = mask[None, None]
    out = F.conv2d(F.pad(out, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return out[0, 0]


def lane_weights(masks: list[torch.Tensor], sigma: float = 0.0) -> torch.Tensor:
    """``[1 + R, H, W]``: the base lane's weight, then each region's, summing to one at every position.

    Each region's mask is feathered (``sigma`` cells), the base lane takes ``max(0, 1 − Σ_i r_i)``, and all are
    divided by their sum: overlapping regions share the overlap equally, uncovered cells go to the base lane.
    """
    raw = torch.stack([feather(m, sigma).clamp(0.0, 1.0) for m in masks])
    base = (1.0 - raw.sum(0)).clamp(min=0.0)
    every = torch.cat([base[None], raw])
    return every / every.sum(0, keepdim=True)


def concept_map(call_maps: torch.Tensor, lane: int, lanes: int, positions: list[int], conditional_half: bool) -> torch.Tensor:
    """``[h, w]``: one lane's attention to a concept's tokens in one captured denoiser call.

    ``call_maps`` is :class:`~pipelines.attention_maps.AttentionCapture`'s ``[rows, h, w, T]`` (rows lane-major, as
    the seam ran them); with classifier-free guidance (``conditional_half``) a lane's rows are ``[uncond; cond]`` and
    only the conditional half is read. The token maps at ``positions`` are summed (CLoRA's released code sums a
    concept's token maps) and the lane's rows averaged."""
    per_lane = call_maps.shape[0] // lanes
    rows = call_maps[lane * per_lane:(lane + 1) * per_lane]
    if conditional_half and per_lane % 2 == 0:
        rows = rows[per_lane // 2:]
    read = [p for p in positions if p < call_maps.shape[-1]]  # tokens past the encoder's sequence length: cut off
    return rows[..., read].sum(-1).mean(0)


def auto_masks(maps: torch.Tensor, grid: tuple[int, int], threshold: float) -> torch.Tensor:
    """``[R, H, W]`` disjoint 0/1 masks from ``R`` concepts' attention maps ``[R, h, w]`` (CLoRA's masking).

    Each map is resized to the ``grid`` (bilinear) and min-max normalised to [0, 1] (as CLoRA's loss normalises
    its maps); a position goes to the concept whose normalised map is largest there, if that value exceeds
    ``threshold``, so each position has at most one concept; :func:`lane_weights` gives the rest to the base lane.
    CLoRA's released code binarises each map at ``threshold · max`` (default 0.3) and lets masks overlap (averaged
    where they do). Min-max instead of max: a concept whose attention is nearly flat (measured in the tiny world:
    a subject token's map spans only 0.014-0.033) would otherwise pass the threshold everywhere and take the image."""
    if maps.dim() != 3 or maps.shape[0] == 0:
        raise ValueError(f"auto masks need [R, h, w] concept maps, got {tuple(maps.shape)}")
    resized = F.interpolate(maps[None].float(), size=tuple(grid), mode="bilinear", align_corners=False)[0]
    low = resized.flatten(1).amin(1)[:, None, None]
    span = (resized.flatten(1).amax(1)[:, None, None] - low).clamp_min(1e-12)
    normalised = (resized - low) / span
    winner = normalised.argmax(0)
    return torch.stack([((winner == i) & (normalised[i] > threshold)).float() for i in range(maps.shape[0])])


def describe_region(region: str) -> str:
    """How a region reads in a log line or recipe note."""
    if is_auto(region):
        return "automatic (cross-attention of the LoRA's concept tokens)"
    box = _box(region)
    if box is None:
        return f"mask {region}"
    return f"box x {box[0]:.3g}-{box[2]:.3g}, y {box[1]:.3g}-{box[3]:.3g}"
