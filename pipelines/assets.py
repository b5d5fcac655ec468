"""Where the shipped data lives: the tiny offline world (models, LoRAs, judge, CLIP), example grids and prompts.

The repository keeps it in the top-level ``assets/`` folder. A wheel installs the same folder as the data-only
package ``studio_assets`` (``setup.py`` maps it), so an installed studio finds its world from any working
directory. Lookup order: the ``assets/`` folder beside the source tree (a clone or an editable install), then
the installed ``studio_assets`` package. A file that is in neither is a clear :class:`MissingAssetError`,
never a silent substitute (a random model, a skipped step).

No torch here: listing commands use it.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

from .errors import StudioError

ASSET_PACKAGE = "studio_assets"
SOURCE_ASSETS = Path(__file__).resolve().parent.parent / "assets"


class MissingAssetError(StudioError):
    """A shipped data file (tiny world model, LoRA, judge, CLIP, prompts) is absent from this installation."""


@lru_cache(maxsize=1)
def assets_root() -> Path:
    """The folder holding the shipped data (see the module docstring for the lookup order)."""
    if (SOURCE_ASSETS / "models").is_dir():
        return SOURCE_ASSETS
    spec = importlib.util.find_spec(ASSET_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        if (Path(location) / "models").is_dir():
            return Path(location)
    raise MissingAssetError(
        f"the studio's shipped data is missing: neither {SOURCE_ASSETS} nor an installed '{ASSET_PACKAGE}' "
        "package holds it (reinstall lora-composition-studio from a wheel or a clone that includes assets/)"
    )


def asset_path(*parts: str, what: str | None = None) -> Path:
    """``assets/<parts...>``, which must exist; ``what`` names it in the error (e.g. "tiny-sdxl model")."""
    path = assets_root().joinpath(*parts)
    if not path.exists():
        label = what or "/".join(parts)
        raise MissingAssetError(f"{path}: the {label} is not in this installation's shipped data "
                                "(reinstall the package, or rebuild it with `studio world build`)")
    return path


__all__ = ["ASSET_PACKAGE", "MissingAssetError", "asset_path", "assets_root"]
