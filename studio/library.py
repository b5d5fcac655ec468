"""A folder of LoRA files: listing with metadata, and safe name resolution.

Only ``.safetensors`` files count. Listing reads headers only (no tensors), so a library of hundreds of LoRAs
lists in well under a second. Names resolve strictly inside the library root: ``..`` segments and symlinks
pointing outside are refused (see :func:`studio.lora.resolve_source`).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from pipelines.adapters.metadata import LoraInfo, describe
from pipelines.errors import LoraFileError, StudioError

from .lora import within

PREVIEW_SUFFIXES = (".preview.png", ".png", ".preview.jpg", ".jpg", ".jpeg", ".webp")


def scan(root: str | Path) -> tuple[list[LoraInfo], list[LoraFileError]]:
    """Describe every ``.safetensors`` under ``root`` (recursively); unreadable files are returned as errors."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise StudioError(f"{root}: not a folder")
    infos, errors = [], []
    for path in sorted(root.rglob("*.safetensors")):
        if not within(root, path):
            continue  # a symlink leading out of the library
        try:
            infos.append(describe(path))
        except LoraFileError as e:
            errors.append(e)
    return infos, errors


def preview_image(path: str | Path) -> Path | None:
    """A sibling preview image (``name.preview.png``, ``name.png``, ...) if one exists."""
    path = Path(path)
    stem = path.with_suffix("")
    for suffix in PREVIEW_SUFFIXES:
        candidate = Path(f"{stem}{suffix}")
        if candidate.exists():
            return candidate
    return None


def info_dict(info: LoraInfo, root: Path | None = None) -> dict:
    data = asdict(info)
    data.pop("metadata")
    if root is not None and info.path:
        data["relative_path"] = str(Path(info.path).resolve().relative_to(root.resolve()))
    data["base_name"] = info.base_name
    preview = preview_image(info.path) if info.path else None
    data["preview"] = str(preview) if preview else None
    return data
