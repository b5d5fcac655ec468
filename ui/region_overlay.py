"""Pictures of the regions: the lanes' masks drawn in distinct colours with the LoRAs' names, over the image area
before rendering and over the image after.

Before rendering, :func:`planned_masks` runs the ``regional`` strategy's own ``prepare`` on the stack's regions, so
the preview shows the per-lane weights the render will use (MultiDiffusion's masks ``M_i``, Bar-Tal et al. 2023,
Eq. 3-5, normalised to sum to one with the base lane) on the denoiser's own grid; :func:`overlay` upsamples them
without smoothing (each latent cell or FLUX token a flat block). After a render it draws ``Result.region_masks``
(boxes and masks, or the automatic masks of ``region=auto`` / ``clora``) over the image the same way, in the same
colour order.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

OVERLAY_SIDE = 256                  # the longer side of the overlays, in display pixels
OVERLAY_ALPHA = 0.6
# distinct colours for region lanes, in lane order (the preview and the masks after a render use the same order)
COLOURS = (("red", (230, 25, 75)), ("blue", (67, 99, 216)), ("green", (60, 180, 75)), ("orange", (245, 130, 49)),
           ("purple", (145, 30, 180)), ("cyan", (66, 212, 244)), ("magenta", (240, 50, 230)), ("olive", (128, 128, 0)))


def planned_masks(studio: Any, names: Sequence[str], regions: Sequence[str | None],
                  prompts: Sequence[str | None], width: int, height: int,
                  params: Mapping[str, Any] | None = None) -> list[tuple[str, Any]]:
    """The region lanes' weights a ``regional`` render of this stack will use: ``(label, [h, w])`` per lane, from
    the strategy's own ``prepare`` (same rasterising, grouping, feathering and normalisation as the render; the
    base lane, which fills what no region covers, is left out). ``params``: the regional strategy's parameters
    (unknown ones are ignored, so the current strategy's values can be passed)."""
    import torch

    from fusion.base import RunContext
    from studio.strategies import strategy_class

    cls = strategy_class("regional")
    declared = {p.name for p in cls.params}
    strategy = cls(**{k: v for k, v in (params or {}).items() if k in declared})
    run = RunContext(names=list(names), weights=torch.ones(len(names)), num_steps=1, family=studio.family.name,
                     pipe=studio.pipe, settings={"width": int(width), "height": int(height)}, regions=list(regions),
                     region_prompts=list(prompts))
    strategy.prepare(run)
    return list(strategy.region_masks.items())  # what Result.region_masks will hold (automatic ones: after the run)


def _display_size(width: int, height: int) -> tuple[int, int]:
    scale = OVERLAY_SIDE / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def overlay(background: Image.Image, masks: Sequence[tuple[str, Any]]) -> Image.Image:
    """``masks`` (label, ``[h, w]`` map in [0, 1] on any grid) drawn over ``background`` in distinct colours (in
    order, :data:`COLOURS`), each cell a flat block (no smoothing: what the grid holds), with each label at its
    map's centre of mass. The result's longer side is ``OVERLAY_SIDE``."""
    size = _display_size(*background.size)
    base = np.asarray(background.convert("RGB").resize(size, Image.NEAREST), dtype=np.float32)
    tint = np.zeros_like(base)
    cover = np.zeros(base.shape[:2], np.float32)
    upsampled = []
    for i, (_, grid) in enumerate(masks):
        grid = np.asarray(grid.detach().float().cpu() if hasattr(grid, "detach") else grid, dtype=np.float32)
        cells = np.clip(np.nan_to_num(grid), 0.0, 1.0)
        big = np.asarray(Image.fromarray(cells, mode="F").resize(size, Image.NEAREST), dtype=np.float32)
        upsampled.append(big)
        tint += big[..., None] * np.array(COLOURS[i % len(COLOURS)][1], np.float32)
        cover += big
    # each pixel: the maps' colours mixed by weight, as opaque as the maps cover it (attention masks of several
    # LoRAs may overlap beyond one; the mixture stays a colour)
    mixed = tint / np.maximum(cover, 1e-6)[..., None]
    alpha = OVERLAY_ALPHA * np.minimum(cover, 1.0)[..., None]
    out = base * (1 - alpha) + mixed * alpha
    image = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    font = _font(max(9, min(size) // 16))
    for (label, _), big in zip(masks, upsampled):
        total = float(big.sum())
        if total <= 0:
            continue
        ys, xs = np.indices(big.shape)
        cx, cy = float((xs * big).sum() / total), float((ys * big).sum() / total)
        draw.text((cx, cy), str(label)[:40], fill=(255, 255, 255), font=font, anchor="mm", stroke_width=2,
                  stroke_fill=(0, 0, 0))
    return image


def legend(masks: Sequence[tuple[str, Any]], notes: Sequence[str] = ()) -> str:
    """One line per region: its colour, its LoRAs and how much of the image it holds."""
    from .handlers import md_escape

    lines = []
    for i, (label, grid) in enumerate(masks):
        grid = np.asarray(grid.detach().float().cpu() if hasattr(grid, "detach") else grid, dtype=np.float32)
        lines.append(f"**{COLOURS[i % len(COLOURS)][0]}**: {md_escape(label)} ({float(np.clip(grid, 0, 1).mean()):.0%} "
                     f"of the image, {grid.shape[0]}x{grid.shape[1]} grid)")
    lines += [md_escape(note) for note in notes]
    return "  \n".join(lines)


def plain_canvas(width: int, height: int) -> Image.Image:
    """The neutral image area the preview draws on before anything was rendered (a light checkerboard)."""
    w, h = _display_size(width, height)
    cell = max(4, max(w, h) // 16)
    ys, xs = np.indices((h, w))
    board = np.where(((xs // cell) + (ys // cell)) % 2 == 0, 236, 214).astype(np.uint8)
    return Image.fromarray(np.stack([board] * 3, axis=-1))


__all__ = ["COLOURS", "legend", "overlay", "plain_canvas", "planned_masks"]
