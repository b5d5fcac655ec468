"""The input images of img2img and inpainting: read, checked, hashed and sized before anything renders.

* An input image is a PIL image or an image file; it is converted to RGB and, when its size differs from the
  render size, resized (Lanczos) with a note saying so.
* A mask must be single-channel (PIL mode ``L`` or ``1``; white = repaint, black = keep) and, after diffusers'
  binarisation at 0.5, must mark at least one pixel to repaint; anything else is an error naming the file.
* Each input gets a SHA-256 for the recipe: of the file's bytes for a file (what ``sha256sum`` prints), of the
  decoded pixels (mode, size, bytes) for an in-memory image, whose recipe source is ``<image>``.

All checks run before any LoRA loads or the pipeline is called (:func:`prepare_mode_inputs`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import StudioError
from .families import Family
from .modes import CONTROL_LORA, CONTROL_LORA_IMG2IMG, CONTROL_LORA_INPAINT, CONTROL_LORA_MODES, CONTROLNET, \
    CONTROLNET_IMG2IMG, CONTROLNET_INPAINT, CONTROLNET_MODES, IMG2IMG, INPAINT, TEXT2IMG, default_conditioning_scale, \
    default_strength

IN_MEMORY = "<image>"
MASK_MODES = ("L", "1")


class ModeInputError(StudioError):
    """An input image, mask or strength that img2img / inpainting cannot use; the message names it."""


@dataclass
class InputImage:
    """One input image as the pipeline will receive it, and where it came from."""

    role: str  # "image", "mask_image" or "control_image"
    image: Any  # PIL.Image.Image, already at the render size
    source: str  # the file it was read from (absolute), or "<image>"
    sha256: str


@dataclass
class ModeInputs:
    """The checked inputs of one render: the mode, its strength, its images and what was adjusted."""

    mode: str = TEXT2IMG
    strength: float | None = None
    images: dict[str, InputImage] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    controlnet: Any = None  # ControlNet mode: the model, where it came from, and its conditioning scale (multi-
    controlnet_source: str | list[str] | None = None  # ControlNet: lists, one per control image)
    controlnet_scale: float | list[float] | None = None
    control_lora: dict[str, Any] | None = None  # control-lora mode: {source, sha256, weight} for the recipe

    def call_kwargs(self) -> dict[str, Any]:
        """The studio-vocabulary pipeline arguments (see :mod:`pipelines.modes`); several control images (multi-
        ControlNet) go as one list, in order."""
        out: dict[str, Any] = {role: item.image for role, item in self.images.items()
                               if not role.startswith("control_image")}
        controls = [item.image for role, item in self.images.items() if role.startswith("control_image")]
        if controls:
            out["control_image"] = controls if isinstance(self.controlnet, list) else controls[0]
        if self.strength is not None:
            out["strength"] = self.strength
        if self.mode in CONTROLNET_MODES:
            out["controlnet"] = self.controlnet
            out["controlnet_conditioning_scale"] = self.controlnet_scale
        if self.mode in CONTROL_LORA_MODES:
            out["control_lora"] = True  # the marker pipelines.modes.mode_of reads
        return out

    def merge_into(self, pipeline_kwargs: dict[str, Any] | None) -> dict[str, Any]:
        """``pipeline_kwargs`` plus these inputs; mode inputs passed there directly are refused (they would skip
        the checks and the recipe)."""
        from .modes import MODE_INPUTS

        extra = dict(pipeline_kwargs or {})
        passed = sorted(k for k in MODE_INPUTS if k in extra)
        if passed:
            raise ModeInputError(f"pass {', '.join(passed)} as compose() arguments, not in pipeline_kwargs")
        return {**extra, **self.call_kwargs()}


def _label(value: Any, role: str) -> str:
    return str(value) if isinstance(value, (str, Path)) else f"the {role.replace('_', ' ')}"


def read_image(value: Any, role: str):
    """``(PIL image as given, source, sha256)`` of a PIL image or an image file."""
    from PIL import Image

    if isinstance(value, Image.Image):
        digest = hashlib.sha256(f"{value.mode}:{value.size}:".encode() + value.tobytes()).hexdigest()
        return value, IN_MEMORY, digest
    if not isinstance(value, (str, Path)):
        raise ModeInputError(f"{role.replace('_', ' ')} must be a PIL image or an image file path, "
                             f"got {type(value).__name__}")
    path = Path(value).expanduser()
    if not path.is_file():
        raise ModeInputError(f"{path}: {role.replace('_', ' ')} file not found")
    data = path.read_bytes()
    try:
        import io

        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ModeInputError(f"{path}: cannot read the {role.replace('_', ' ')} as an image ({str(e)[:160]})") \
            from None
    return image, str(path.resolve()), hashlib.sha256(data).hexdigest()


def _sized(image, width: int, height: int, label: str, what: str, notes: list[str], resample):
    if image.size == (width, height):
        return image
    notes.append(f"{label}: {what} is {image.width}x{image.height}; resized to {width}x{height}")
    return image.resize((width, height), resample)


def check_strength(value: Any) -> float:
    """``strength`` of img2img / inpainting: a finite number in (0, 1]."""
    import math
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ModeInputError(f"strength must be a number in (0, 1], got {value!r:.60}")
    if not 0.0 < float(value) <= 1.0:
        raise ModeInputError(f"strength must be in (0, 1] (the part of the noise schedule to run), got {value!r}")
    return float(value)


def check_conditioning_scale(value: Any) -> float:
    """``controlnet_conditioning_scale``: a finite number from 0 to 10 (1: the ControlNet as trained; left out,
    the diffusers pipeline's default, recorded in the recipe)."""
    import math
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)) \
            or not 0.0 <= float(value) <= 10.0:
        raise ModeInputError(f"controlnet_conditioning_scale must be a number from 0 to 10, got {value!r:.60}")
    return float(value)


def control_role(index: int) -> str:
    """The input role of the ``index``-th control image (0: ``control_image``; then ``control_image_2``, ...)."""
    return "control_image" if index == 0 else f"control_image_{index + 1}"


def _as_list(value: Any) -> list[Any] | None:
    return list(value) if isinstance(value, (list, tuple)) else None


def prepare_control(family: Family, pipe, inputs: ModeInputs, *, control_image: Any, controlnet: Any, scale: Any,
                    width: int, height: int, cache: dict) -> ModeInputs:
    """``inputs`` (text-to-image, img2img or inpainting) plus ControlNet: the control image (RGB, sized) and a
    ControlNet that fits the base model. Multi-ControlNet: lists of control images and ControlNets of one length
    (and one scale for all, or a list), each checked and named by its position."""
    from PIL import Image

    from .controlnets import members, resolve_controlnet

    images, nets, scales = _as_list(control_image), _as_list(controlnet), _as_list(scale)
    if images is not None and len(images) == 1 and (nets is None or len(nets) == 1) and (scales is None or len(scales) == 1):
        images, nets, scales = None, None, None  # one of each: the single-ControlNet mode
        control_image = control_image[0]
        controlnet = controlnet[0] if isinstance(controlnet, (list, tuple)) else controlnet
        scale = scale[0] if isinstance(scale, (list, tuple)) else scale
    default = default_conditioning_scale(family, inputs.mode)
    if images is None:
        if nets is not None or scales is not None:
            raise ModeInputError("several ControlNets (or scales) need as many control images, one each")
        scale = default if scale is None else check_conditioning_scale(scale)
        raw, source, digest = read_image(control_image, "control_image")
        rgb = raw if raw.mode == "RGB" else raw.convert("RGB")
        sized = _sized(rgb, width, height, _label(control_image, "control image"), "the control image", inputs.notes,
                       Image.Resampling.LANCZOS)
        inputs.images["control_image"] = InputImage("control_image", sized, source, digest)
        inputs.controlnet, inputs.controlnet_source = resolve_controlnet(controlnet, pipe, family, cache)
        if len(members(inputs.controlnet)) > 1:
            raise ModeInputError(f"the pipeline's own ControlNet holds {len(members(inputs.controlnet))} ControlNets; "
                                 "give as many control images")
        inputs.controlnet_scale = scale
        return inputs
    n = len(images)
    if n == 0 or any(item is None for item in images):
        raise ModeInputError("multi-ControlNet: every control image must be given")
    if nets is None and controlnet is not None:
        raise ModeInputError(f"{n} control images need {n} ControlNets (a list, one per image)")
    if nets is not None and len(nets) != n:
        raise ModeInputError(f"{n} control images but {len(nets)} ControlNets: give one ControlNet per image")
    if scales is not None and len(scales) != n:
        raise ModeInputError(f"{n} control images but {len(scales)} conditioning scales: give one per image (or one "
                             "number for all)")
    scales = [default if v is None else check_conditioning_scale(v)
              for v in (scales if scales is not None else [scale] * n)]
    if nets is None:  # the wrapped pipeline's own (Multi)ControlNet
        own, source = resolve_controlnet(None, pipe, family, cache)
        models, sources = members(own), [source] * n
        if len(models) != n:
            raise ModeInputError(f"{n} control images for the pipeline's own {len(models)} ControlNet(s): give one "
                                 "image per ControlNet")
    else:
        resolved = []
        for i, net in enumerate(nets):
            if net is None:
                raise ModeInputError(f"ControlNet #{i + 1} is missing: give one ControlNet per control image")
            try:
                resolved.append(resolve_controlnet(net, pipe, family, cache))
            except StudioError as e:
                raise type(e)(f"ControlNet #{i + 1}: {e}") from None
        models, sources = [m for m, _ in resolved], [s for _, s in resolved]
    for i, value in enumerate(images):
        role = control_role(i)
        raw, source, digest = read_image(value, "control_image")
        rgb = raw if raw.mode == "RGB" else raw.convert("RGB")
        label = str(value) if isinstance(value, (str, Path)) else f"control image #{i + 1}"
        sized = _sized(rgb, width, height, label, "the control image", inputs.notes, Image.Resampling.LANCZOS)
        inputs.images[role] = InputImage(role, sized, source, digest)
    inputs.controlnet, inputs.controlnet_source, inputs.controlnet_scale = models, sources, scales
    return inputs


def requested_mode(image: Any, mask_image: Any, control_image: Any) -> str:
    """The mode these inputs ask for (the checks come in :func:`prepare_mode_inputs`)."""
    mode = INPAINT if mask_image is not None else IMG2IMG if image is not None else TEXT2IMG
    if control_image is None:
        return mode
    return {TEXT2IMG: CONTROLNET, IMG2IMG: CONTROLNET_IMG2IMG, INPAINT: CONTROLNET_INPAINT}[mode]


def prepare_mode_inputs(family: Family, *, image: Any = None, mask_image: Any = None, strength: Any = None,
                        width: int, height: int, control_image: Any = None, controlnet: Any = None,
                        controlnet_conditioning_scale: Any = None, pipe: Any = None,
                        controlnet_cache: dict | None = None, control_lora: bool = False) -> ModeInputs:
    """Check and size the inputs of one render (``width`` x ``height``); the mode follows from them
    (``control_lora``: a control LoRA is given, see :func:`prepare_control_lora`)."""
    from .modes import check_dedicated

    if control_lora:
        return prepare_control_lora(family, pipe, image=image, mask_image=mask_image, strength=strength,
                                    control_image=control_image, controlnet=controlnet,
                                    scale=controlnet_conditioning_scale, width=width, height=height)
    mode = requested_mode(image, mask_image, control_image)
    if pipe is not None:  # a FLUX Fill pipeline does inpainting only
        check_dedicated(pipe, family, mode)
    if control_image is None and (controlnet is not None or controlnet_conditioning_scale is not None):
        raise ModeInputError("a ControlNet (controlnet / --controlnet, its conditioning scale) needs a control "
                             "image (control_image / --control-image)")
    inputs = prepare_images(family, mode, image=image, mask_image=mask_image, strength=strength, width=width,
                            height=height, pipe=pipe)
    if control_image is None:
        return inputs
    return prepare_control(family, pipe, inputs, control_image=control_image, controlnet=controlnet,
                           scale=controlnet_conditioning_scale, width=width, height=height,
                           cache={} if controlnet_cache is None else controlnet_cache)


def prepare_control_lora(family: Family, pipe, *, image: Any, mask_image: Any, strength: Any, control_image: Any,
                         controlnet: Any, scale: Any, width: int, height: int) -> ModeInputs:
    """The inputs of the control-lora modes (FluxControlPipeline; with an image FluxControlImg2ImgPipeline, with a
    mask too FluxControlInpaintPipeline): a control image (RGB, sized), the image, mask and strength as for
    img2img / inpainting, and no ControlNet."""
    from PIL import Image

    if family.name != "flux":
        raise ModeInputError(f"control LoRAs (FluxControlPipeline) are made for FLUX.1, not {family.name.upper()}")
    if control_image is None:
        raise ModeInputError("a control LoRA needs a control image (control_image / --control-image: the edges or "
                             "depth map it was trained on)")
    given = [name for name, value in (("controlnet", controlnet), ("controlnet_conditioning_scale", scale))
             if value is not None]
    if given:
        raise ModeInputError(f"a control LoRA runs diffusers' FluxControlPipeline (its control image goes into the "
                             f"transformer, no ControlNet); {', '.join(given)} cannot be combined with it")
    mode = {TEXT2IMG: CONTROL_LORA, IMG2IMG: CONTROL_LORA_IMG2IMG,
            INPAINT: CONTROL_LORA_INPAINT}[requested_mode(image, mask_image, None)]
    if pipe is not None:
        from .modes import check_dedicated

        check_dedicated(pipe, family, mode)
    inputs = prepare_images(family, mode, image=image, mask_image=mask_image, strength=strength, width=width,
                            height=height, pipe=pipe)
    raw, source, digest = read_image(control_image, "control_image")
    rgb = raw if raw.mode == "RGB" else raw.convert("RGB")
    sized = _sized(rgb, width, height, _label(control_image, "control image"), "the control image", inputs.notes,
                   Image.Resampling.LANCZOS)
    inputs.images["control_image"] = InputImage("control_image", sized, source, digest)
    return inputs


def prepare_images(family: Family, mode: str, *, image: Any, mask_image: Any, strength: Any, width: int,
                   height: int, pipe: Any = None) -> ModeInputs:
    """The input image and mask of img2img / inpainting (also under ControlNet), and the strength."""
    from PIL import Image

    if mask_image is not None and image is None:
        raise ModeInputError("a mask (mask_image / --mask) needs the image it masks (image / --image)")
    if image is None:
        if strength is not None:
            raise ModeInputError("strength applies to img2img and inpainting; give an input image with it")
        return ModeInputs(mode=mode)
    strength = default_strength(family, mode, pipe) if strength is None else check_strength(strength)
    notes: list[str] = []
    raw, source, digest = read_image(image, "image")
    label = _label(image, "image")
    rgb = raw if raw.mode == "RGB" else raw.convert("RGB")
    images = {"image": InputImage("image", _sized(rgb, width, height, label, "the image", notes,
                                                  Image.Resampling.LANCZOS), source, digest)}
    if mask_image is not None:
        raw_mask, mask_source, mask_digest = read_image(mask_image, "mask_image")
        mask_label = _label(mask_image, "mask")
        if raw_mask.mode not in MASK_MODES:
            raise ModeInputError(
                f"{mask_label}: a mask must be single-channel (grayscale, white = repaint), got a {raw_mask.mode} "
                "image; save it as grayscale (PIL: mask.convert('L'))")
        mask = raw_mask.convert("L")
        mask = _sized(mask, width, height, mask_label, "the mask", notes, Image.Resampling.NEAREST)
        if mask.getextrema()[1] < 128:  # diffusers binarises the mask at 0.5
            raise ModeInputError(f"{mask_label}: the mask is empty (no pixel at or above 50% white), so there is "
                                 "nothing to inpaint; white marks the area to repaint")
        images["mask_image"] = InputImage("mask_image", mask, mask_source, mask_digest)
    return ModeInputs(mode=mode, strength=strength, images=images, notes=notes)


def size_of_image(image: Any, multiple: int) -> tuple[int, int]:
    """The render size an input image suggests: its own size, rounded down to ``multiple`` (at least one)."""
    raw, _, _ = read_image(image, "image")
    return max(multiple, raw.width // multiple * multiple), max(multiple, raw.height // multiple * multiple)
