"""Which files a recipe or a grid may make the studio open.

A recipe PNG or a grid comes from outside (downloaded, shared, dropped on the web app); the LoRA paths written in
it are data, not a permission. A :class:`PathPolicy` allows exactly:

* the folder the recipe or grid file is in (and below),
* the LoRA library folders (``--lora-dir``, a grid's ``lora_dir`` when that is itself allowed, and the LoRAs
  shipped with the studio),
* folders the user named explicitly (``--allow-path DIR``, ``PathPolicy(allowed=[...])``).

Containment is decided on the resolved path (``..`` and symbolic links followed) **before** the file is looked at,
so a path outside gets the same refusal whether or not it exists, and no size, type or content of an outside file
ever reaches an error message. A recipe made on another machine names LoRAs by paths that do not exist here; they
are looked up by file name in the library folders instead, and only a file with the recipe's recorded SHA-256
(when it has one) is taken.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.errors import LoraFileError


def shipped_lora_dir() -> Path | None:
    """The LoRAs that come with the studio (assets/loras), if this installation has them."""
    try:
        from pipelines.assets import assets_root

        folder = assets_root() / "loras"
    except Exception:  # an installation without shipped data
        return None
    return folder if folder.is_dir() else None


def _sha256(path: Path) -> str:
    from pipelines.adapters.parse import file_sha256

    return file_sha256(path)


def _inside(candidate: Path, root: Path) -> bool:
    try:
        candidate.relative_to(root)
        return True
    except ValueError:
        return False


@dataclass
class PathPolicy:
    """Folders a recipe or grid may read LoRAs from; see the module docstring."""

    folder: Path | None = None                              # the recipe's / grid's own folder
    libraries: list[Path] = field(default_factory=list)    # LoRA library folders
    allowed: list[Path] = field(default_factory=list)      # --allow-path folders
    shipped: bool = True                                     # the studio's own LoRAs (assets/loras)

    def roots(self) -> list[Path]:
        roots = [self.folder] if self.folder is not None else []
        roots += [*self.libraries, *self.allowed]
        if self.shipped and (shipped := shipped_lora_dir()) is not None:
            roots.append(shipped)
        return [Path(os.path.realpath(Path(r).expanduser())) for r in roots]

    def permits(self, path: Path) -> bool:
        """Whether ``path`` (after following ``..`` and links) lies inside an allowed folder."""
        real = Path(os.path.realpath(path))
        return any(_inside(real, root) for root in self.roots())

    def with_library(self, folder: Path) -> "PathPolicy":
        """This policy plus a library folder that a grid names (``lora_dir``), which must itself be allowed."""
        return PathPolicy(self.folder, [*self.libraries, folder], list(self.allowed), self.shipped)

    def resolve(self, source: str, origin: str, sha256: str | None = None) -> Path:
        """The allowed local file ``source`` names, relative to the recipe's folder or a library folder; when it
        is not there, a file of the same name in a library folder (with the recorded ``sha256``, if any).

        Raises :class:`LoraFileError` naming ``source`` as written (never what lies outside): "outside the
        folders ... may read" for any path outside, "not found" for an allowed path that does not exist.
        """
        text = str(source)
        given = Path(text).expanduser()
        if given.is_absolute():
            candidates = [given]
        else:
            bases = ([self.folder] if self.folder is not None else []) + self.libraries + self.allowed
            candidates = [Path(b) / text for b in bases]
        if not text.endswith(".safetensors"):
            candidates += [c.with_name(c.name + ".safetensors") for c in candidates]
        permitted = [c for c in candidates if self.permits(c)]
        for candidate in permitted:
            if candidate.is_file():
                return Path(os.path.realpath(candidate))
        # made elsewhere: the same file name in a library folder
        name = given.name if given.name.endswith(".safetensors") else given.name + ".safetensors"
        if name not in (".safetensors", "..safetensors"):
            for root in [*self.libraries, *([shipped_lora_dir()] if self.shipped else [])]:
                if root is None:
                    continue
                for match in sorted(Path(root).rglob(name)):
                    if self.permits(match) and match.is_file() and (sha256 is None or _sha256(match) == sha256):
                        return Path(os.path.realpath(match))
        if not permitted:
            raise LoraFileError(text, f"is outside the folders {origin} may read (its own folder, the LoRA "
                                      "library, --allow-path DIR); not opened. Pass --allow-path with its folder "
                                      "if you trust it")
        raise LoraFileError(text, f"not found in the folders {origin} may read")
