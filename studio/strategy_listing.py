"""The strategy listing (``studio strategies``) without importing torch on every call.

The rows come from the registry (:data:`fusion.REGISTRY`: names, summaries, citations, declared parameters),
never from a hard-coded list. Building them imports every strategy module, hence torch (~1.3 s alone on the
shared 2-core CPU, 3-7 s with peft and diffusers), so the rows are kept in a small JSON file in the user's cache
folder, keyed by the studio version and the size and modification time of every file of the ``fusion``
package: editing, adding or removing a strategy module builds the listing again; otherwise a listing reads
one small file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path


def registry_rows() -> list[dict]:
    """One dict per registered strategy (name, summary, citation, parameters with defaults and bounds)."""
    from fusion import REGISTRY

    return [{"name": cls.name, "summary": cls.summary, "citation": cls.citation,
             "params": [{"name": p.name, "default": p.default, "type": p.type.__name__, "help": p.help,
                         "min": p.min, "max": p.max, "choices": list(p.choices) if p.choices else None}
                        for p in cls.params]}
            for cls in REGISTRY.values()]


def cache_folder() -> Path:
    """``$XDG_CACHE_HOME/lora-composition-studio`` (default ``~/.cache/...``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lora-composition-studio"


def fusion_sources() -> list[Path]:
    """The files of the ``fusion`` package (found without importing it)."""
    spec = importlib.util.find_spec("fusion")
    folders = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    return sorted(p for folder in folders for p in folder.rglob("*.py"))


def listing_key(sources: list[Path]) -> str:
    """A digest of the studio version and each source's path, size and mtime."""
    from studio import __version__

    digest = hashlib.sha256(__version__.encode())
    for path in sources:
        stat = path.stat()
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def strategy_rows(cache: Path | None = None) -> list[dict]:
    """The registry's rows, read from the cache when the ``fusion`` sources are unchanged (else rebuilt)."""
    from pipelines.atomic_files import atomic_write_bytes

    folder = cache or cache_folder()
    path = folder / f"strategies-{listing_key(fusion_sources())}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    rows = json.loads(json.dumps(registry_rows()))  # the same values a cached listing gives
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("strategies-*.json"):
            stale.unlink(missing_ok=True)
        atomic_write_bytes(path, json.dumps(rows).encode("utf-8"))
    except OSError:
        pass  # a read-only home: list without caching
    return rows


__all__ = ["cache_folder", "registry_rows", "strategy_rows"]
