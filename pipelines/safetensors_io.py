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
from typing import TYPE_CHECKING

from safetensors import safe_open

from .errors import LoraFileError

if TYPE_CHECKING:  # torch loads only to read tensors, not to check a header (listings)
    import torch

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
MAX_TENSORS = 200_000  # far above any real checkpoint (SDXL single file: ~2,500; a big LoRA: ~3,000)
MAX_DIMS = 8
# bytes per element of every dtype the safetensors format defines
DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
               "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # what LoRA weights may be stored as


def _looks_like_pickle(head: bytes) -> bool:
    # torch.save writes a zip archive (PK\x03\x04); legacy torch and plain pickle start with protocol 2-5.
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and head[1] in (2, 3, 4, 5))


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry_problem(name: str, info, data_size: int) -> str | None:
    """Why one tensor entry of a header is malformed (``None`` if it is well formed)."""
    if not isinstance(info, dict):
        return f"header entry for '{name}' is not an object"
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or not dtype.replace("_", "").isalnum() or len(dtype) > 16:
        return f"tensor '{name}' has an invalid dtype {str(dtype)[:40]!r}"
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_count(d) for d in shape):
        return f"tensor '{name}' has an invalid shape {str(shape)[:60]}"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        return f"tensor '{name}' has invalid data_offsets {str(offsets)[:60]} (two non-negative integers expected)"
    start, end = offsets
    if start > end:
        return f"tensor '{name}' has data_offsets that run backwards ({start} > {end})"
    if end > data_size:
        return (f"truncated: tensor '{name}' ends at byte {end} of the data section but only {data_size} bytes "
                "are present (incomplete download?)")
    numel = 1
    for d in shape:
        numel *= d
    if dtype in DTYPE_SIZES and numel * DTYPE_SIZES[dtype] != end - start:  # a newer dtype: safetensors checks it
        return (f"tensor '{name}' claims shape {shape} of {dtype} ({numel * DTYPE_SIZES[dtype]} bytes) but its "
                f"data_offsets span {end - start} bytes")
    return None


def check_safetensors_file(path: str | Path, *, max_header_bytes: int = _MAX_HEADER_BYTES) -> dict:
    """Validate the container of ``path`` and return its parsed JSON header.

    Checked before any tensor is read, in time linear in the header: the header length against the file size and
    ``max_header_bytes``; the JSON (a nesting too deep to parse is refused, not a ``RecursionError``); every
    entry's dtype, shape and ``data_offsets`` (integers, inside the data section, matching the shape's byte size,
    not overlapping another tensor); ``__metadata__`` as a map of text to text.
    Raises :class:`LoraFileError` naming the file and the problem.
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
        if header_len > max_header_bytes:
            raise LoraFileError(path, f"corrupt: the header claims {header_len} bytes, more than the "
                                      f"{max_header_bytes} bytes a header may have")
        if 8 + header_len > size:
            raise LoraFileError(
                path,
                f"corrupt or truncated: header claims {header_len} bytes but the file has {size} bytes",
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoraFileError(path, f"corrupt safetensors header ({e.__class__.__name__}: {str(e)[:200]})") from None
    except RecursionError:
        raise LoraFileError(path, "corrupt safetensors header (JSON nested too deeply)") from None
    if not isinstance(header, dict):
        raise LoraFileError(path, "corrupt safetensors header (not a JSON object)")
    entries = [k for k in header if k != "__metadata__"]
    if len(entries) > MAX_TENSORS:
        raise LoraFileError(path, f"the header lists {len(entries)} tensors, more than the {MAX_TENSORS} allowed")
    metadata = header.get("__metadata__")
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise LoraFileError(path, "corrupt safetensors header (__metadata__ must map names to text)")
    data_size = size - 8 - header_len
    spans = []
    for name in entries:
        problem = _entry_problem(name, header[name], data_size)
        if problem:
            raise LoraFileError(path, problem)
        start, end = header[name]["data_offsets"]
        if end > start:
            spans.append((start, end, name))
    spans.sort()
    for (_, end_a, name_a), (start_b, _, name_b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise LoraFileError(path, f"corrupt: tensors '{name_a}' and '{name_b}' overlap in the data section")
    return header


INTEGER_DTYPES = ("I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64")


def _is_integer_alpha(name: str, dtype: str, shape) -> bool:
    return name.endswith(".alpha") and dtype in INTEGER_DTYPES and len(shape) <= 1 and all(d == 1 for d in shape)


def _is_sparse_index(name: str, info: dict) -> bool:
    """A SHiRA / sparse-delta index tensor (2 x nnz integers; see pipelines.adapters.kinds.shira)."""
    shape = info["shape"]
    return (name.endswith(("shira_indices", "sparse_delta.indices")) and info["dtype"] in INTEGER_DTYPES
            and len(shape) == 2 and shape[0] == 2)


def check_floating(path: str | Path, header: dict) -> None:
    """Refuse integer, boolean and 8-bit float tensors: LoRA factors are F16, BF16, F32 or F64.

    (An integer tensor used as a weight, or a float16 tensor relabelled ``I16``, would otherwise be loaded as
    numbers it never meant.) The one exception is a module's scalar ``alpha``, which diffusers' kohya converter
    writes as an integer."""
    for name, info in header.items():
        if name == "__metadata__" or info["dtype"] in FLOAT_DTYPES:
            continue
        if not _is_integer_alpha(name, info["dtype"], info["shape"]) and not _is_sparse_index(name, info):
            raise LoraFileError(path, f"tensor '{name}' is {info['dtype']}; LoRA weights must be floating point "
                                      f"({', '.join(FLOAT_DTYPES)})")


def read_safetensors(path: str | Path, *, check_finite: bool = True, floating_only: bool = False,
                     max_header_bytes: int = _MAX_HEADER_BYTES) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read all tensors and the ``__metadata__`` of a safetensors file on the CPU.

    With ``check_finite`` every floating tensor must be free of NaN and infinity; the first offending key is
    named in the error. With ``floating_only`` (LoRA files) every tensor must have a floating dtype
    (:func:`check_floating`), checked from the header before anything is read.
    """
    import torch

    header = check_safetensors_file(path, max_header_bytes=max_header_bytes)
    if floating_only:
        check_floating(path, header)
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
