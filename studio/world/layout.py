"""Names and places of the tiny world that commands need without torch: the build stages, where a build writes.

A build writes into the source tree's ``assets/`` (``BUILD_ASSETS``); readers find the shipped world through
:func:`pipelines.assets.assets_root` (the source tree or the installed ``studio_assets`` package).
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUILD_ASSETS = ROOT / "assets"
WORKDIR = ROOT / ".world-build"
STAGES = ("data", "vae", "judge", "clip", "base-sdxl", "base-flux", "distill-flux", "pairs-sdxl", "pairs-flux",
          "loras-sdxl", "loras-flux",
          "qr-sdxl", "qr-flux", "shira-sdxl", "shira-flux")
# What a build runs when no stage is named: every stage but pairs-flux, whose two-object fine-tune of tiny-flux
# was tried and not shipped (README, "Two subjects in one image"); it still runs when named with --stage.
DEFAULT_STAGES = tuple(s for s in STAGES if s != "pairs-flux")
