"""The batch manifest: ``manifest.jsonl``, one JSON line per finished image, written append-only.

A line is appended (one ``write`` + ``fsync``) only after its PNG is completely on disk (atomic temp + rename),
so a ``kill -9`` loses at most the image in flight. What a kill can leave behind is repaired on the next start:
an unfinished last line is cut off (:func:`repair_tail`) and stray temporary files are removed
(:func:`remove_stale_temp_files`).

Under several processes each one appends to its own shard ``manifest.shard-<i>-of-<n>.jsonl``; the main
process folds the shards into ``manifest.jsonl`` (:func:`merge_shards`), skipping lines it already holds, so
a merge interrupted half-way is simply done again.

Line fields: ``id``, ``status`` (``ok`` or ``failed``), ``file`` (relative to the folder), ``recipe`` (the
:class:`~studio.recipe.Recipe` as a dict), ``item`` (report fields: strategy label, row, column, group,
concepts, weights), ``timings`` (seconds), ``scores`` (``clip`` and ``concepts``), ``scorer``, ``error``,
``finished_at``, ``process``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from .recipe import atomic_write_bytes

MANIFEST = "manifest.jsonl"
SHARD_GLOB = "manifest.shard-*.jsonl"


def shard_name(index: int, count: int) -> str:
    return f"manifest.shard-{index}-of-{count}.jsonl"


def manifest_files(folder: Path) -> list[Path]:
    """The manifest and any shards, main manifest first."""
    files = [folder / MANIFEST] if (folder / MANIFEST).exists() else []
    return files + sorted(folder.glob(SHARD_GLOB))


def read_lines(path: Path) -> list[dict[str, Any]]:
    """Every complete JSON line of one file (an unfinished last line is ignored)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    records = []
    for raw in data.split(b"\n")[:-1] if not data.endswith(b"\n") else data.split(b"\n"):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "id" in record:
            records.append(record)
    return records


def latest(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One record per id: an ``ok`` record beats a ``failed`` one; otherwise the later line wins."""
    out: dict[str, dict[str, Any]] = {}
    for record in records:
        previous = out.get(record["id"])
        if previous is not None and previous.get("status") == "ok" and record.get("status") != "ok":
            continue
        out[record["id"]] = record
    return out


def load_records(folder: Path) -> dict[str, dict[str, Any]]:
    """The folder's images by id, from the manifest and every shard."""
    records: list[dict[str, Any]] = []
    for path in manifest_files(folder):
        records.extend(read_lines(path))
    return latest(records)


def done_ids(folder: Path) -> set[str]:
    return {i for i, r in load_records(folder).items() if r.get("status") == "ok"}


def append(path: Path, record: dict[str, Any]) -> None:
    """Append one line and make it durable before returning."""
    line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def repair_tail(path: Path) -> bool:
    """Cut an unfinished last line (left by a kill in the middle of a write); True if something was cut."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    if size == 0:
        return False
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return False
        f.seek(0)
        data = f.read()
        f.truncate(data.rfind(b"\n") + 1)
        f.flush()
        os.fsync(f.fileno())
    return True


def remove_stale_temp_files(folder: Path) -> int:
    """Delete the temporary files of interrupted atomic writes (``.<name>.<random>.tmp``) of this folder's
    outputs: images and grid sheets, the manifest, ``scores.csv`` and ``report.html``."""
    patterns = [(folder / "images", "**/.*.png.*.tmp"), (folder / "grids", ".*.png.*.tmp")]
    patterns += [(folder, f".{name}.*.tmp") for name in (MANIFEST, "scores.csv", "report.html")]
    count = 0
    for base, pattern in patterns:
        for tmp in base.glob(pattern) if base.is_dir() else ():
            if tmp.is_file():
                tmp.unlink(missing_ok=True)
                count += 1
    return count


def merge_shards(folder: Path) -> int:
    """Fold every shard into ``manifest.jsonl`` (lines not already there), then delete the shards."""
    main = folder / MANIFEST
    repair_tail(main)
    held = read_lines(main)
    ok = {r["id"] for r in held if r.get("status") == "ok"}
    seen = {json.dumps(r, sort_keys=True) for r in held}
    added = 0
    shards = sorted(folder.glob(SHARD_GLOB))
    for shard in shards:
        for record in read_lines(shard):
            key = json.dumps(record, sort_keys=True)
            if record["id"] in ok or key in seen:
                continue
            append(main, record)
            seen.add(key)
            if record.get("status") == "ok":
                ok.add(record["id"])
            added += 1
    for shard in shards:
        shard.unlink(missing_ok=True)
    return added


def rewrite(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Replace the manifest atomically (used by ``studio score`` to store new scores)."""
    text = "".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in records)
    atomic_write_bytes(path, text.encode("utf-8"))
