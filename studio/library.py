"""A folder of LoRA files: listing with metadata, and safe name resolution.

Only ``.safetensors`` files count. Listing reads headers only (no tensors), so a library of hundreds of LoRAs
lists in well under a second. Names resolve strictly inside the library root: ``..`` segments and symlinks
pointing outside are refused (see :func:`studio.lora.resolve_source`).

:class:`Library` is what front ends (the web app) use: several folders, entries addressed by id only, search,
a base-model filter, recipe matching by SHA-256 and validated uploads into a managed folder.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from pipelines.adapters.metadata import LoraInfo, describe
from pipelines.adapters.not_adapters import NOT_ADAPTERS
from pipelines.atomic_files import copy_atomically
from pipelines.errors import IncompatibleLoraError, LoraFileError, StudioError
from pipelines.safetensors_io import check_safetensors_file

from .lora import within

PREVIEW_SUFFIXES = (".preview.png", ".png", ".preview.jpg", ".jpg", ".jpeg", ".webp")


def scan(root: str | Path) -> tuple[list[LoraInfo], list[LoraFileError]]:
    """Describe every adapter ``.safetensors`` under ``root`` (recursively); each unreadable file is returned as
    its own error (one bad file never hides the good ones), and files that are no adapter (QR-LoRA bases files
    with the shared Q and R, AutoLoRA gates files) are left out."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise StudioError(f"{root}: not a folder")
    infos, errors = [], []
    for path in sorted(root.rglob("*.safetensors")):
        if not within(root, path):
            continue  # a symlink leading out of the library
        try:
            if not path.is_file():
                raise LoraFileError(path, "is not a regular file (a folder or a broken link)")
            info = describe(path)
        except LoraFileError as e:
            errors.append(e)
            continue
        except Exception as e:  # noqa: BLE001 - any malformed header is this file's problem, not the listing's
            errors.append(LoraFileError(path, f"unreadable metadata ({type(e).__name__}: {e})"))
            continue
        if info.format not in NOT_ADAPTERS:
            infos.append(info)
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


# ------------------------------------------------------------------------------------------------ Library
@dataclass(frozen=True)
class LibraryEntry:
    """One LoRA file of a :class:`Library`; ``id`` is the only name clients ever see or send."""

    id: str
    path: Path
    info: LoraInfo
    preview: Path | None

    @property
    def name(self) -> str:
        return self.info.name

    def fits(self, family: str) -> bool:
        """Whether the file can go on a ``family`` model (``"sdxl"``, ``"flux"``); unknown bases may."""
        return self.info.base in (None, family)

    def matches(self, query: str) -> bool:
        """Case-insensitive match of every word of ``query`` against id, name, base, format and triggers."""
        haystack = " ".join([self.id, self.info.name, self.info.base_name, self.info.format, *self.info.triggers])
        haystack = haystack.lower()
        return all(word in haystack for word in query.lower().split())


class Library:
    """The LoRA folders a front end may use, scanned once and addressed by entry id only.

    Clients name a LoRA by its ``id`` (its path relative to its folder, POSIX style; with several folders the
    folder's name comes first). :meth:`get` looks the id up in the last scan and never builds a path from it,
    so a crafted name such as ``../../etc/passwd`` cannot reach a file outside the folders; the file is checked
    to still lie inside its folder when it is used. Uploads go to a managed folder inside the library after
    validation (:meth:`add_upload`).
    """

    UPLOAD_FOLDER = "uploads"

    def __init__(self, roots: str | Path | list[str | Path], upload_dir: str | Path | None = None):
        roots = [roots] if isinstance(roots, (str, Path)) else list(roots)
        if not roots:
            raise StudioError("a LoRA library needs at least one folder")
        self.roots = [Path(r).expanduser().resolve() for r in roots]
        for root in self.roots:
            if not root.is_dir():
                raise StudioError(f"{root}: not a folder")
        self.upload_dir = Path(upload_dir).expanduser().resolve() if upload_dir else self.roots[0] / self.UPLOAD_FOLDER
        if not any(within(root, self.upload_dir) for root in self.roots):
            raise StudioError(f"upload folder {self.upload_dir} must lie inside a LoRA folder")
        self._labels = self._root_labels()
        self._entries: dict[str, LibraryEntry] = {}
        self._hashes: dict[tuple, str] = {}
        self.errors: list[LoraFileError] = []
        self.refresh()

    def _root_labels(self) -> list[str]:
        if len(self.roots) == 1:
            return [""]
        labels, seen = [], {}
        for root in self.roots:
            label = root.name or "root"
            seen[label] = seen.get(label, 0) + 1
            labels.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
        return labels

    # ------------------------------------------------------------------------------------------ listing
    def refresh(self) -> "Library":
        """Scan the folders again (new, removed or changed files)."""
        entries, errors = {}, []
        for root, label in zip(self.roots, self._labels):
            infos, bad = scan(root)
            errors += bad
            for info in infos:
                path = Path(info.path).resolve()
                rel = path.relative_to(root).as_posix()
                entry_id = f"{label}/{rel}" if label else rel
                preview = preview_image(path)
                if preview is not None and not within(root, preview):
                    preview = None  # a symlinked preview leading out of the library
                entries[entry_id] = LibraryEntry(entry_id, path, info, preview)
        self._entries, self.errors = entries, errors
        return self

    @property
    def entries(self) -> list[LibraryEntry]:
        return list(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, entry_id: object) -> bool:
        return isinstance(entry_id, str) and entry_id in self._entries

    def search(self, query: str = "", family: str | None = None) -> list[LibraryEntry]:
        """Entries matching ``query`` (see :meth:`LibraryEntry.matches`), only those fitting ``family`` if given."""
        return [e for e in self._entries.values()
                if (family is None or e.fits(family)) and (not query.strip() or e.matches(query))]

    def bases(self) -> list[str]:
        """The base models present, by display name."""
        return sorted({e.info.base_name for e in self._entries.values()})

    def get(self, entry_id: str) -> LibraryEntry:
        """The entry called ``entry_id``; anything that is not an id of the last scan is refused."""
        entry = self._entries.get(entry_id) if isinstance(entry_id, str) else None
        if entry is None:
            raise LoraFileError(str(entry_id)[:200], "is not a LoRA of the library (names come from the library "
                                "listing; paths are not accepted)")
        if not entry.path.is_file() or not any(within(root, entry.path) for root in self.roots):
            raise LoraFileError(entry_id, "is no longer a file inside the LoRA library; refresh the library")
        return entry

    def path(self, entry_id: str) -> Path:
        return self.get(entry_id).path

    # ------------------------------------------------------------------------------------------ recipes
    def sha256(self, entry: LibraryEntry) -> str:
        from pipelines.adapters.parse import file_sha256

        stat = entry.path.stat()
        key = (str(entry.path), stat.st_size, stat.st_mtime_ns)
        if key not in self._hashes:
            self._hashes[key] = file_sha256(entry.path)
        return self._hashes[key]

    def find(self, source: str | None = None, name: str | None = None, sha256: str | None = None,
             family: str | None = None) -> LibraryEntry | None:
        """The library entry a recipe's LoRA refers to, or ``None``.

        A recipe comes from outside (a PNG someone shared), so its ``source`` is only compared with the library,
        never opened: the file with the same SHA-256 wins; otherwise the same path, id, file stem or metadata
        name (A1111's ``<lora:name:w>``). A file with a different hash than the recipe records does not match.
        With ``family``, only entries that fit that model count (two folders may hold a "style-striped" each).
        """
        candidates = []
        stems = {s for s in (name, Path(source).stem if source else None) if s}
        for entry in self._entries.values():
            if family is not None and not entry.fits(family):
                continue
            if source and (str(entry.path) == source or entry.id == source):
                candidates.insert(0, entry)
            elif entry.path.stem in stems or entry.info.name in stems:
                candidates.append(entry)
        if sha256:
            for entry in candidates:
                if self.sha256(entry) == sha256:
                    return entry
            for entry in self._entries.values():
                if family is not None and not entry.fits(family):
                    continue
                if entry not in candidates and self.sha256(entry) == sha256:
                    return entry
            return None
        return candidates[0] if candidates else None

    # ------------------------------------------------------------------------------------------ uploads
    def add_upload(self, file: str | Path, filename: str | None = None, *, max_bytes: int,
                   validate: Callable[[Path], object] | None = None) -> LibraryEntry:
        """Check an uploaded file and move a copy into the managed upload folder; returns its entry.

        ``filename`` is the client's name for it: only its last component is kept, reduced to safe characters,
        and it must end in ``.safetensors``. The file must be at most ``max_bytes``, be a valid safetensors file
        and pass ``validate`` (e.g. :meth:`studio.Studio.inspect`, which parses it against the loaded model)
        before anything is written into the library. An identical file already there is reused.
        """
        file = Path(file)
        filename = filename or file.name
        base = re.split(r"[\\/]", str(filename))[-1]
        if not base.lower().endswith(".safetensors"):
            raise LoraFileError(base[:200], "only .safetensors files can be uploaded")
        stem = re.sub(r"[^\w.-]+", "_", base[: -len(".safetensors")]).strip("._") or "upload"
        if not file.is_file():
            raise LoraFileError(base, "upload not found")
        size = file.stat().st_size
        if size > max_bytes:
            raise LoraFileError(base, f"is {size / 1e6:.1f} MB; uploads are limited to {max_bytes / 1e6:.1f} MB")
        try:
            check_safetensors_file(file)
            describe(file)
            if validate is not None:
                validate(file)
        except (LoraFileError, IncompatibleLoraError) as e:  # name the file as the user knows it
            raise type(e)(base, e.problem) from None
        from pipelines.adapters.parse import file_sha256

        self.upload_dir.mkdir(parents=True, exist_ok=True)
        digest = file_sha256(file)
        target, i = self.upload_dir / f"{stem[:100]}.safetensors", 2
        while target.exists() and file_sha256(target) != digest:
            target, i = self.upload_dir / f"{stem[:100]}-{i}.safetensors", i + 1
        if not target.exists():
            copy_atomically(file, target)
        self.refresh()
        for entry in self._entries.values():
            if entry.path == target.resolve():
                return entry
        raise LoraFileError(base, "was stored but does not show in the library")  # pragma: no cover
