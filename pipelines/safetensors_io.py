"""Reading untrusted weight files safely.

Only ``.safetensors`` is accepted. Pickle-based files (``.ckpt``, ``.pt``, ``.pth``, ``.bin``, ``.pkl``) can
run arbitrary code when loaded, so they are refused by name *and* by content (a ``.safetensors`` name on a
zip or pickle payload is refused too). Before any tensor is read, the header is checked against the file size
so that truncated downloads give a precise message instead of a deep stack trace.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import LoraFileError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def _looks_like_pickle(head: bytes) -> bool:
    # torch.save writes a zip archive (PK\x03\x04); legacy torch and plain pickle start with protocol 2-5.
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and head[1] in (2, 3, 4, 5))


def check_safetensors_file(path: str | Path) -> dict:
    """Validate the container of ``path`` and return its parsed JSON header.

    Raises :class:`LoraFileError` for a missing file, a pickle file, a corrupt header or a truncated body.
    """
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoraFileError(
            path,
            f"'{path.suffix}' files are Python pickles, which can run code when opened; the studio never "
            "unpickles them. Convert the file to .safetensors with a tool you trust.",
        )
    if not path.exists():
        raise LoraFileError(path, "file not found")
    if not path.is_file():
        raise LoraFileError(path, "not a file")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if _looks_like_pickle(head):
            raise LoraFileError(path, "this is a pickle/zip (torch.save) file, not safetensors; refused unopened")
        if len(head) < 8:
            raise LoraFileError(path, f"truncated: {size} bytes is too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
            raise LoraFileError(
                path,
                f"corrupt or truncated: header claims {header_len} bytes but the file has {size} bytes",
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoraFileError(path, f"corrupt safetensors header ({e.__class__.__name__}: {e})") from None
    if not isinstance(header, dict):
        raise LoraFileError(path, "corrupt safetensors header (not a JSON object)")
    data_size = size - 8 - header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise LoraFileError(path, f"corrupt safetensors header entry for '{name}'") from None
        if end > data_size:
            raise LoraFileError(
                path,
                f"truncated: tensor '{name}' ends at byte {end} of the data section but only {data_size} bytes "
                "are present (incomplete download?)",
            )
    return header


def read_safetensors(path: str | Path, *, check_finite: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read all tensors and the ``__metadata__`` of a safetensors file on the CPU.

    With ``check_finite`` every floating tensor must be free of NaN and infinity; the first offending key is
    named in the error.
    """
    header = check_safetensors_file(path)
    metadata = header.get("__metadata__") or {}
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except Exception as e:  # safetensors raises its own error types for malformed content
        raise LoraFileError(path, f"cannot read tensors ({e.__class__.__name__}: {e})") from None
    if check_finite:
        for key, value in tensors.items():
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise LoraFileError(path, f"tensor '{key}' holds NaN or infinite values")
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """Only the ``__metadata__`` block (cheap: reads the header, not the tensors)."""
    header = check_safetensors_file(path)
    return {str(k): str(v) for k, v in (header.get("__metadata__") or {}).items()}


def tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from the header alone."""
    header = check_safetensors_file(path)
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
