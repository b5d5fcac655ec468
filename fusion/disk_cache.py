"""A small on-disk cache for data strategies derive from LoRA files (e.g. CMLoRA's frequency profiles).

Entries are JSON files named by the SHA-256 of their key (a JSON-able dict that names everything the value
depends on: LoRA file hash, model, parameters). The root is, in order: the ``cache_dir`` the caller passes
(``Studio(cache_dir=...)``), ``$LORA_STUDIO_CACHE``, or ``~/.cache/lora-studio``. Writes are atomic, so a
crashed run never leaves a half-written entry; an unreadable entry counts as a miss.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pipelines.atomic_files import atomic_write_bytes

ENV_VAR = "LORA_STUDIO_CACHE"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    return Path.home() / ".cache" / "lora-studio"


class DiskCache:
    """``get(key)`` / ``put(key, value)`` for JSON-able values under ``root/namespace``."""

    def __init__(self, namespace: str, cache_dir: str | Path | None = None):
        self.folder = cache_root(cache_dir) / namespace

    def path(self, key: dict[str, Any]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()
        return self.folder / f"{digest[:32]}.json"

    def get(self, key: dict[str, Any]) -> Any | None:
        path = self.path(key)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return entry.get("value") if entry.get("key") == json.loads(json.dumps(key)) else None

    def put(self, key: dict[str, Any], value: Any) -> Path:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps({"key": key, "value": value}).encode("utf-8"))
        return path
