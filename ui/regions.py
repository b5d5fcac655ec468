"""Regions in the web app: the per-LoRA region control, drawn or uploaded masks, and regions in recipes.

A stack entry's region (for the ``regional`` strategy, and any other strategy that declares ``uses_regions``) is
one of: none (the LoRA acts on the whole image), a preset box of :data:`fusion.region_masks.PRESETS`, a box of
fractions ``x0,y0,x1,y1``, a mask drawn on the row's canvas (or uploaded and then edited there), or ``auto``
(masks from cross-attention, where the studio offers it). A mask becomes a grey PNG (white = inside) in the app's
``masks/`` folder, named by its SHA-256, and is handed to :class:`studio.Lora` as ``region=<that file>``; the
recipe records that file, and a recipe's mask is restored only from that folder (by its hash name: a path from a
PNG or a client is never opened).

The pictures of the regions (before and after a render) are drawn by :mod:`ui.region_overlay`.
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image, UnidentifiedImageError

from fusion.region_masks import PRESETS, check_region, is_mask_file
from pipelines.errors import StudioError

NONE, BOX, MASK, AUTO = "none", "box", "mask", "auto"
# the preset boxes the dropdown offers ("left-half" & co. are the same boxes as "left" & co.)
PRESET_CHOICES = [name for name in PRESETS if not name.endswith("-half")]
MASK_NAME = re.compile(r"mask-[0-9a-f]{16}\.png")
MAX_MASK_BYTES = 20_000_000
MAX_MASK_PIXELS = 4096 * 4096       # a mask is resized to the latent grid (128x128 for SDXL at 1024²) anyway
CANVAS_SIDE = 256                   # the longer side of a row's drawing canvas, in canvas pixels


def auto_supported() -> bool:
    """Whether the studio accepts ``region=auto`` (masks from cross-attention) in this version."""
    try:
        check_region(AUTO)
        return True
    except StudioError:
        return False


def kind_choices() -> list[tuple[str, str]]:
    """The region dropdown's (label, value) pairs."""
    choices = [("none: whole image", NONE), *[(name, name) for name in PRESET_CHOICES],
               ("box: x0,y0,x1,y1", BOX), ("mask: draw or upload", MASK)]
    if auto_supported():
        choices.append(("auto: from attention", AUTO))
    return choices


def check_kind(kind: Any) -> str:
    values = [value for _, value in kind_choices()]
    if kind not in values:
        raise StudioError(f"unknown region '{str(kind)[:60]}'; choose one of {', '.join(values)}")
    return kind


def check_box(text: Any, label: str) -> str:
    """A box ``x0,y0,x1,y1`` of fractions in [0, 1] (empty: not typed yet); errors name the LoRA."""
    text = str(text or "").strip()
    if not text:
        return ""
    if len(text) > 200 or is_mask_file(text) or text.lower() in PRESETS:
        raise StudioError(f"{label}: a box is four fractions x0,y0,x1,y1 of the image (origin top left), e.g. "
                          f"0.1,0.2,0.6,0.9; got '{text[:60]}'")
    try:
        return check_region(text, f"{label}: box")
    except StudioError as e:  # a box's own errors say "region '...'": name the LoRA too
        message = str(e)
        raise StudioError(message if message.startswith(label) else f"{label}: {message}") from None


def check_region_prompt(text: Any, label: str) -> str:
    text = str(text or "")
    if len(text) > 20_000:
        raise StudioError(f"{label}: region prompt has {len(text)} characters; at most 20000")
    return text.strip()


# ---------------------------------------------------------------------------------------------- masks
def canvas_size(width: int, height: int) -> tuple[int, int]:
    """``(w, h)`` of a drawing canvas with the image's aspect ratio and the longer side ``CANVAS_SIDE``."""
    width, height = max(int(width or 1), 1), max(int(height or 1), 1)
    scale = CANVAS_SIDE / max(width, height)
    return max(8, round(width * scale)), max(8, round(height * scale))


def _coverage_problem(mask: np.ndarray, label: str, what: str) -> str | None:
    if mask.max() < 1:
        return f"{label}: the {what} is empty: paint the LoRA's region on the canvas (or upload a mask, white = inside)"
    if mask.min() > 254:
        return (f"{label}: the {what} covers the whole image; set the region to 'none' to make the LoRA act "
                "everywhere")
    return None


def save_mask(mask: np.ndarray, masks_dir: Path) -> Path:
    """Write a ``uint8`` ``[h, w]`` mask as ``masks_dir/mask-<sha256[:16]>.png`` (same mask, same file)."""
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8), mode="L").save(buffer, format="PNG")
    data = buffer.getvalue()
    masks_dir.mkdir(parents=True, exist_ok=True)
    path = masks_dir / f"mask-{hashlib.sha256(data).hexdigest()[:16]}.png"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    return path


def mask_from_editor(value: Any) -> np.ndarray | None:
    """The mask shown on a Gradio ``ImageEditor``, ``uint8`` ``[h, w]``: a saved mask comes back in the canvas's
    background (:func:`editor_value`: white, red where inside, ``255 − green`` = the mask exactly), new strokes in its
    layers (their alpha; any colour paints); the two are joined by their maximum. ``None`` when the value holds
    neither."""
    if not isinstance(value, Mapping):
        return None
    parts = []
    background = value.get("background")
    if background is not None:
        background = np.asarray(background)
        if background.ndim == 3 and background.shape[2] >= 3:
            parts.append(255 - background[..., 1].astype(np.int32))
    for layer in value.get("layers") or []:
        layer = np.asarray(layer) if layer is not None else None
        if layer is not None and layer.ndim == 3 and layer.shape[2] == 4:
            parts.append(layer[..., 3])
    if not parts:
        return None
    shape = parts[0].shape
    if any(part.shape != shape for part in parts):
        raise StudioError("the canvas layers have different sizes; clear the canvas and draw again")
    if shape[0] * shape[1] > MAX_MASK_PIXELS:  # the app's canvases are CANVAS_SIDE wide: only a crafted call is larger
        raise StudioError(f"the canvas is {shape[1]}x{shape[0]} pixels; a mask may have at most "
                          f"{MAX_MASK_PIXELS / 1e6:.1f} megapixels")
    return np.clip(np.max(np.stack(parts), axis=0), 0, 255).astype(np.uint8)


def editor_value(mask_path: str | None, size: tuple[int, int]) -> dict[str, Any]:
    """The ``ImageEditor`` value of a canvas of ``size`` ``(w, h)`` showing a saved mask: white, blended to pure red
    where inside (green and blue ``255 − mask``, so :func:`mask_from_editor` reads the same mask back). The editor
    shows an initial value's background, not its layers: new strokes go on a layer above it."""
    w, h = size
    background = np.full((h, w, 4), 255, np.uint8)
    if mask_path and Path(mask_path).is_file():
        with Image.open(mask_path) as image:
            mask = np.asarray(image.convert("L").resize((w, h), Image.BOX))
        background[..., 1] = background[..., 2] = 255 - mask
    return {"background": background, "layers": [], "composite": background.copy()}


def mask_from_editor_checked(value: Any, label: str) -> tuple[np.ndarray | None, str | None]:
    """``(mask, problem)``: the drawn mask, or ``None`` and why it cannot be used (empty, covers everything)."""
    mask = mask_from_editor(value)
    if mask is None:
        return None, f"{label}: nothing is drawn yet: paint the LoRA's region on the canvas"
    problem = _coverage_problem(mask, label, "drawn mask")
    return (None, problem) if problem else (mask, None)


def read_mask_upload(file: Any, label: str, size: tuple[int, int]) -> tuple[np.ndarray, str]:
    """An uploaded mask image (white = inside; any mode, read as grey like the CLI reads mask files), resized to
    the canvas ``size`` ``(w, h)``; returns the mask and a note saying what was done. Not an image, too large, or
    empty / covering everything: a :class:`StudioError` naming the file."""
    path = Path(str(getattr(file, "name", file) or ""))
    name = path.name or "upload"
    if not path.is_file():
        raise StudioError(f"{label}: the upload {name} did not arrive; try again")
    size_bytes = path.stat().st_size
    if size_bytes > MAX_MASK_BYTES:
        raise StudioError(f"{label}: mask {name} has {size_bytes / 1e6:.1f} MB; a mask may have at most "
                          f"{MAX_MASK_BYTES / 1e6:.0f} MB")
    too_large = (f"{label}: mask {name} is larger than {MAX_MASK_PIXELS / 1e6:.1f} megapixels (4096x4096), the "
                 "most a mask may have (it is resized to the latent grid anyway)")
    try:
        with Image.open(path) as image:
            w, h = image.size
            if w * h > MAX_MASK_PIXELS:
                raise StudioError(f"{too_large}: it is {w}x{h}")
            grey = image.convert("L")
    except StudioError:
        raise
    except Image.DecompressionBombError:  # Pillow refuses to open it at all: far over the limit
        raise StudioError(too_large) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise StudioError(f"{label}: {name} is not a readable image ({e.__class__.__name__}); upload a PNG, JPEG or "
                          "WebP mask, white = inside the region") from None
    mask = np.asarray(grey.resize(size, Image.BOX) if grey.size != size else grey, dtype=np.uint8)
    problem = _coverage_problem(mask, label, f"mask {name}")
    if problem:
        raise StudioError(problem)
    note = f"{label}: mask {name} ({w}x{h})" + (f" resized to the canvas ({size[0]}x{size[1]})"
                                                if (w, h) != size else "") + "; edit it on the canvas"
    return mask, note


# ---------------------------------------------------------------------------------------------- recipes
@dataclass(frozen=True)
class RegionFields:
    """The stack entry's region fields for a recipe's ``region`` text, and a note when something was left out."""

    kind: str = NONE
    box: str = ""
    mask: str = ""
    note: str | None = None


def fields_for(region: str | None, masks_dir: Path, label: str) -> RegionFields:
    """Map a recipe's region onto the control: presets, boxes and ``auto`` as they are; a mask file only when it
    is one of the app's own saved masks (looked up by its hash name in ``masks_dir``; the recorded path itself is
    never opened)."""
    if region is None or not str(region).strip():
        return RegionFields()
    text = str(region).strip()
    key = text.lower()
    if key == AUTO:
        if auto_supported():
            return RegionFields(kind=AUTO)
        return RegionFields(note=f"LoRA '{label}': region 'auto' is not available here; left without a region")
    if key in PRESETS:
        plain = key.removesuffix("-half")
        return RegionFields(kind=plain if plain in PRESET_CHOICES else BOX,
                            box="" if plain in PRESET_CHOICES else ",".join(f"{v:g}" for v in PRESETS[key]))
    if not is_mask_file(text):
        try:
            return RegionFields(kind=BOX, box=check_box(text, f"LoRA '{label}'"))
        except StudioError as e:
            return RegionFields(note=f"{e}; left without a region")
    name = re.split(r"[\\/]", text)[-1]
    saved = masks_dir / name
    if MASK_NAME.fullmatch(name) and saved.is_file():
        return RegionFields(kind=MASK, mask=str(saved))
    return RegionFields(kind=MASK, note=f"LoRA '{label}': its mask file {name[:200]} is not one of this app's saved masks "
                                        "(only those are opened); draw or upload the region again")


__all__ = ["AUTO", "BOX", "MASK", "NONE", "PRESET_CHOICES", "RegionFields", "auto_supported", "canvas_size",
           "check_box", "check_kind", "check_region_prompt", "editor_value", "fields_for", "kind_choices",
           "mask_from_editor", "mask_from_editor_checked", "read_mask_upload", "save_mask"]
