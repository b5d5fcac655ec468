"""The img2img / inpainting / ControlNet inputs of a batch grid: read, resolved, checked and hashed when the grid
is loaded, before anything renders.

A grid sets them at the top (every item) or per prompt (``image``, ``mask``, ``control_image`` under a
``[[prompts]]`` table override the top's)::

    image = "inputs/room.png"          # img2img; with mask = "inputs/room-mask.png" inpainting
    control_image = "inputs/edges.png" # ControlNet (controlnet = a diffusers folder or a Hub id)
    controlnet = "controlnets/canny"
    # or, on FLUX, a control LoRA (FluxControlPipeline): control_lora = "loras/canny-lora.safetensors:0.9"
    [axes]
    strength = [0.5, 0.8]              # an axis, like seed (or strength = 0.6 at the top)
    controlnet_scale = [0.5, 1.0]

Input files and a local ControlNet folder resolve through the grid's :class:`~studio.path_policy.PathPolicy`
exactly as its LoRAs do (the grid's folder, the library folders, ``--allow-path``; containment decided on the
real path before the file is looked at). Each image enters the item's id by the SHA-256 of its bytes (the
digest its recipe records, :mod:`pipelines.mode_inputs`), so an edited input file is a new image to render on
resume, and the same file mounted elsewhere keeps the id; a control LoRA file enters it the same way, with its
weight.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from pipelines.errors import StudioError

from .path_policy import PathPolicy

# grid key -> Studio.compose argument
IMAGE_KEYS = {"image": "image", "mask": "mask_image", "control_image": "control_image"}
MODE_TOP_KEYS = {*IMAGE_KEYS, "strength", "controlnet", "controlnet_scale", "control_lora"}
MODE_AXIS_KEYS = {"strength", "controlnet_scale"}
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class InputFile:
    """One input image of a grid: as written, where it resolved, and the SHA-256 of its bytes."""

    role: str      # image, mask_image or control_image (the compose argument)
    written: str
    path: str
    sha256: str


@dataclass(frozen=True)
class GridInputs:
    """The input images and ControlNet one prompt of a grid renders with (empty: text-to-image)."""

    files: tuple[InputFile, ...] = ()
    controlnet: str | None = None           # a resolved local folder or a Hub id
    controlnet_written: str | None = None   # as the grid wrote it (enters the id, like LoRA sources)
    control_lora: InputFile | None = None   # a FLUX control LoRA (pipelines.control_lora), by its file's SHA-256
    control_lora_weight: float = 1.0

    def role(self, role: str) -> InputFile | None:
        return next((f for f in self.files if f.role == role), None)

    @property
    def has_image(self) -> bool:
        return self.role("image") is not None

    @property
    def has_control(self) -> bool:
        return self.role("control_image") is not None


class InputResolver:
    """Resolves and checks a grid's input images and ControlNet; errors go through ``fail(problem, key)``."""

    def __init__(self, policy: PathPolicy, origin: str, fail: Callable[[str, str], Exception]):
        self.policy, self.origin, self.fail = policy, origin, fail
        self._files: dict[tuple[str, str], InputFile] = {}

    def _where(self) -> str:
        return f"the grid {Path(self.origin).name}"

    def _local(self, text: str, what: str, key: str, *, folder: bool = False) -> Path | None:
        """The allowed local file (or folder) ``text`` names; ``None`` when no allowed candidate exists."""
        given = Path(text).expanduser()
        if given.is_absolute():
            candidates = [given]
        else:
            bases = [self.policy.folder] if self.policy.folder is not None else []
            candidates = [Path(b) / text for b in [*bases, *self.policy.libraries, *self.policy.allowed]]
        permitted = [c for c in candidates if self.policy.permits(c)]
        if not permitted:
            raise self.fail(f"{what} {text} is outside the folders {self._where()} may read (its own folder, the "
                            "LoRA library, --allow-path DIR); not opened. Pass --allow-path with its folder if you "
                            "trust it", key)
        for candidate in permitted:
            if candidate.is_dir() if folder else candidate.is_file():
                return Path(os.path.realpath(candidate))
        return None

    def image(self, key: str, value: Any) -> InputFile:
        """An input image (``image``, ``mask`` or ``control_image``): allowed, readable, a mask single-channel
        and not empty (the checks of :func:`pipelines.mode_inputs.prepare_images` that need no render size)."""
        from pipelines.mode_inputs import MASK_MODES, ModeInputError, read_image

        role = IMAGE_KEYS[key]
        if not isinstance(value, str) or not value.strip():
            raise self.fail(f"'{key}' must be an image file path, got {value!r:.60}", key)
        if (key, value) in self._files:
            return self._files[(key, value)]
        path = self._local(value, f"{key.replace('_', ' ')}", key)
        if path is None:
            raise self.fail(f"{key.replace('_', ' ')} {value} not found in the folders {self._where()} may read", key)
        try:
            image, _, digest = read_image(path, role)
        except ModeInputError as e:
            raise self.fail(f"{key.replace('_', ' ')} {value}: {e}", key) from None
        if key == "mask":
            if image.mode not in MASK_MODES:
                raise self.fail(f"mask {value}: a mask must be single-channel (grayscale, white = repaint), got a "
                                f"{image.mode} image", key)
            if image.convert("L").getextrema()[1] < 128:
                raise self.fail(f"mask {value}: the mask is empty (no pixel at or above 50% white), so there is "
                                "nothing to inpaint", key)
        found = InputFile(role=role, written=value, path=str(path), sha256=digest)
        self._files[(key, value)] = found
        return found

    def controlnet(self, value: Any) -> tuple[str, str]:
        """``(resolved, as written)``: an allowed local diffusers folder, or a Hub id (``owner/name``)."""
        if not isinstance(value, str) or not value.strip():
            raise self.fail(f"'controlnet' must be a folder or a Hub id, got {value!r:.60}", "controlnet")
        looks_local = value.startswith((".", "/", "~")) or Path(value).expanduser().is_absolute()
        try:
            folder = self._local(value, "controlnet", "controlnet", folder=True)
        except StudioError:
            if looks_local or not _HUB_ID.fullmatch(value):
                raise
            folder = None  # owner/name that is not an allowed folder: a Hub id
        if folder is not None:
            if not (folder / "config.json").is_file():  # checked here so the batch stops before any image
                raise self.fail(f"controlnet {value}: a ControlNet is a diffusers folder with config.json and "
                                "weights", "controlnet")
            return str(folder), value
        if looks_local or not _HUB_ID.fullmatch(value):
            raise self.fail(f"controlnet {value} is neither a folder {self._where()} may read nor a Hub id "
                            "(owner/name)", "controlnet")
        return value, value

    def inputs(self, top: Mapping[str, Any], prompt: Mapping[str, Any] | None = None) -> GridInputs:
        """The inputs of one prompt: its own ``image`` / ``mask`` / ``control_image`` over the top's."""
        merged = {k: top[k] for k in IMAGE_KEYS if k in top}
        merged.update({k: prompt[k] for k in IMAGE_KEYS if prompt and k in prompt})
        files = tuple(self.image(key, merged[key]) for key in IMAGE_KEYS if key in merged)
        result = GridInputs(files=files)
        if "mask" in merged and "image" not in merged:
            raise self.fail("a mask needs the image it masks ('image')", "mask")
        if "controlnet" in top:
            if "control_image" not in merged:
                raise self.fail("'controlnet' needs a control image ('control_image')", "controlnet")
            resolved, written = self.controlnet(top["controlnet"])
            result = GridInputs(files=files, controlnet=resolved, controlnet_written=written)
        if "control_lora" in top:
            if "control_image" not in merged:
                raise self.fail("'control_lora' needs a control image ('control_image')", "control_lora")
            if "controlnet" in top or "controlnet_scale" in top:
                raise self.fail("'control_lora' runs FluxControlPipeline: no 'controlnet' / 'controlnet_scale' "
                                "with it", "control_lora")
            lora, weight = self.control_lora(top["control_lora"])
            result = GridInputs(files=files, control_lora=lora, control_lora_weight=weight)
        return result

    def control_lora(self, value: Any) -> tuple[InputFile, float]:
        """A control LoRA ``path[:weight]``: an allowed local ``.safetensors`` file, hashed; its weight."""
        import math

        from pipelines.adapters.parse import file_sha256

        if not isinstance(value, str) or not value.strip():
            raise self.fail(f"'control_lora' must be a file path[:weight], got {value!r:.60}", "control_lora")
        text, weight = value, 1.0
        head, sep, tail = value.rpartition(":")
        if sep and head and not tail.startswith(("/", "\\")):
            try:
                weight, text = float(tail), head
            except ValueError:
                pass
        if not math.isfinite(weight) or not -10.0 <= weight <= 10.0:
            raise self.fail(f"control_lora {value}: the weight must be a number from -10 to 10", "control_lora")
        key = ("control_lora", text)
        if key not in self._files:
            path = self._local(text, "control_lora", "control_lora")
            if path is None or path.suffix.lower() != ".safetensors":
                raise self.fail(f"control_lora {text}: no .safetensors file there in the folders {self._where()} "
                                "may read", "control_lora")
            self._files[key] = InputFile(role="control_lora", written=text, path=str(path), sha256=file_sha256(path))
        return self._files[key], weight


def check_mode_axes(inputs: GridInputs, strengths: list, scales: list, fail: Callable[[str, str], Exception]) -> None:
    """Strength needs an input image; a conditioning scale needs a control image (each names its key)."""
    if any(s is not None for s in strengths) and not inputs.has_image:
        raise fail("'strength' applies to img2img and inpainting; give an 'image' with it", "strength")
    if any(s is not None for s in scales) and not inputs.has_control:
        raise fail("'controlnet_scale' needs a control image ('control_image')", "controlnet_scale")


def id_fields(inputs: GridInputs, strength: float | None, scale: float | None) -> dict[str, Any] | None:
    """What the mode adds to an item's normalised recipe (``None`` for text-to-image, so the ids of grids
    without inputs stay as they were)."""
    if not inputs.files:
        return None
    out = {"inputs": {f.role: f.sha256 for f in inputs.files}, "strength": strength,
           "controlnet": inputs.controlnet_written, "controlnet_scale": scale}
    if inputs.control_lora is not None:  # grids without one keep their ids
        out["control_lora"] = [inputs.control_lora.sha256, inputs.control_lora_weight]
    return out
