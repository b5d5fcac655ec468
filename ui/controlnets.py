"""The ControlNets the web app offers: the folders it was launched with (``studio ui --controlnet DIR``), by name;
and the FLUX control LoRAs (``studio ui --control-lora FILE``, :mod:`pipelines.control_lora`), offered in the same
list as ``<name> (control LoRA)``: both read the control image.

The browser only ever sends a name from this list (never a path), so a request cannot make the app read another
folder. Each folder is checked when the app starts (a diffusers ControlNet folder: ``config.json`` + weights);
the model itself loads on first use, in the studio's dtype and device, and is checked against the base model then
(:func:`pipelines.controlnets.resolve_controlnet`: a ControlNet for another base is a clear error).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from pipelines.errors import StudioError

NONE = "(none)"


def find_controlnets(folders: Iterable[str | Path]) -> dict[str, Path]:
    """``{name: folder}`` for the ``--controlnet`` folders (name: the folder's name, made unique with ``-2``, ...);
    a folder that is missing or is not a diffusers ControlNet folder is an error naming it."""
    found: dict[str, Path] = {}
    for folder in folders:
        path = Path(folder).expanduser()
        if not path.is_dir():
            raise StudioError(f"--controlnet {folder}: not a folder")
        if not (path / "config.json").is_file():
            raise StudioError(f"--controlnet {folder}: a ControlNet is a diffusers folder with config.json and "
                              "weights (ControlNetModel.save_pretrained)")
        name, i = path.resolve().name, 2
        while name in found:
            name, i = f"{path.resolve().name}-{i}", i + 1
        found[name] = path.resolve()
    return found


def find_control_loras(files: Iterable[str | Path]) -> dict[str, Path]:
    """``{"<name> (control LoRA)": file}`` for the ``--control-lora`` files (checked against the model when first
    used); a missing file or one that is not ``.safetensors`` is an error naming it."""
    found: dict[str, Path] = {}
    for file in files:
        path = Path(file).expanduser()
        if not path.is_file() or path.suffix.lower() != ".safetensors":
            raise StudioError(f"--control-lora {file}: not a .safetensors file")
        stem, i = path.stem, 2
        name = f"{stem} (control LoRA)"
        while name in found:
            name, i = f"{stem}-{i} (control LoRA)", i + 1
        found[name] = path.resolve()
    return found


def resolve_choice(choice: str | None, available: dict[str, Path], has_control_image: bool) -> Path | None:
    """The folder of the ControlNet picked in the app (``None`` without a control image). A control image with no
    ControlNet picked, or a name the app does not offer, is an error saying what to do."""
    picked = None if choice in (None, "", NONE) else str(choice)
    if not has_control_image:
        return None
    if picked is None:
        hint = (f"pick one of {', '.join(available)}" if available
                else "start the app with --controlnet DIR (a diffusers ControlNet folder for this model) or, on "
                     "FLUX, --control-lora FILE")
        raise StudioError(f"a control image needs a ControlNet: {hint}")
    if picked not in available:
        raise StudioError(f"ControlNet '{picked[:80]}' is not one this app was started with "
                          f"({', '.join(available) or 'none'})")
    return available[picked]
