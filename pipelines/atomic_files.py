"""Writing files atomically with the permissions the user's umask asks for.

``tempfile.mkstemp`` creates its file with mode 0600 whatever the umask, and renaming it over the target keeps
that mode, so every PNG, report, CSV, grid, merged LoRA, gates or quantized file written this way was private to
its owner even where the umask (022, 002) shares it. safetensors' ``save_file`` (0.8) does the same. Every atomic
write goes through here and sets the mode an ordinary ``open(path, "w")`` would have: ``0o666 & ~umask``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def current_umask() -> int:
    """The process umask (read from ``/proc`` where possible: setting it to read it back is not thread safe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a newly created regular file gets under the current umask."""
    return 0o666 & ~current_umask()


@contextlib.contextmanager
def atomic_target(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds it gets the umask's mode and is renamed
    over ``path`` (after fsync), otherwise it is removed and ``path`` is untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, file_mode())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, fsync, rename)."""
    with atomic_target(path) as tmp:
        tmp.write_bytes(data)


def save_safetensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file`` made atomic and given the umask's mode (safetensors itself creates its files
    with mode 0600); returns ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_target(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def copy_atomically(source: str | Path, target: str | Path) -> None:
    """Copy ``source`` to ``target`` atomically (the copy gets the umask's mode, not the source's)."""
    with atomic_target(target) as tmp, Path(source).open("rb") as src, tmp.open("wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)


def reserve_new_path(path: str | Path) -> Path:
    """``path`` if no file has that name, else the first free ``stem-1.suffix``, ``stem-2.suffix``, ...; the
    name is taken at once (an empty file created exclusively), so two writers never pick the same one and an
    existing file is never overwritten. Write the content over the returned path atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    candidate, k = path, 0
    while True:
        try:
            os.close(os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return candidate
        except FileExistsError:
            k += 1
            candidate = path.with_name(f"{path.stem}-{k}{path.suffix}")


__all__ = ["atomic_target", "atomic_write_bytes", "copy_atomically", "current_umask", "file_mode", "reserve_new_path"]
