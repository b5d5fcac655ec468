"""Issue 16 item 1: the built wheel carries the tiny world, and an installed studio finds it from any directory.

The test builds the wheel from a copy of the source tree, installs it (no dependencies) into a fresh virtual
environment that sees this environment's packages (torch, diffusers, ... are not installed again) but not the
source tree, and runs ``studio demo`` offline from an unrelated directory. A missing asset is a clear error.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from pipelines import assets as asset_lookup

ROOT = Path(__file__).resolve().parent.parent
SKIP = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "outputs", "out", "__pycache__", "*.egg-info",
                              ".world-build", "test-artifacts", ".pytest_cache", ".whl", ".gl", "node_modules")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DIFFUSERS_VERBOSITY="error", PYTHONUNBUFFERED="1",
               PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    return env


def _run(args, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=_env(), capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{args}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed; returns its ``bin`` folder."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    shutil.copytree(ROOT, source, ignore=SKIP, symlinks=True)
    _run([sys.executable, "-m", "pip", "wheel", source, "--no-deps", "--no-build-isolation", "-w", work / "dist"],
         cwd=work)
    wheels = list((work / "dist").glob("lora_composition_studio-*.whl"))
    assert len(wheels) == 1
    venv = work / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=work)
    python = venv / "bin" / "python"
    purelib = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    # this environment's packages (torch, diffusers, ...), as plain path entries: their .pth files, among them
    # the editable install of the source tree, are not run, so only the wheel provides the studio there
    ours = [sysconfig.get_paths()["purelib"], *site.getsitepackages()]
    (purelib / "outer-site-packages.pth").write_text("\n".join(dict.fromkeys(ours)) + "\n")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", wheels[0]], cwd=work)
    return venv / "bin"


def test_the_installed_wheel_runs_the_demo_offline_from_another_directory(installed, tmp_path):
    elsewhere = tmp_path / "somewhere-else"
    elsewhere.mkdir()
    where = _run([installed / "python", "-c", "import studio, pipelines.assets as a; "
                  "print(studio.__file__); print(a.assets_root())"], cwd=elsewhere).stdout.split()
    venv = installed.parent.resolve()
    assert all(Path(p).resolve().is_relative_to(venv) for p in where), where  # not the source tree
    assert Path(where[1]).name == "studio_assets"

    result = _run([installed / "studio", "demo", "--out", "demo", "-s", "merge", "--seed", "0", "--no-score"],
                  cwd=elsewhere, timeout=400)
    rows = [line for line in (elsewhere / "demo" / "manifest.jsonl").read_text().splitlines() if line.strip()]
    assert len(rows) == 3, result.stdout  # 3 compositions x 1 strategy x 1 seed
    assert (elsewhere / "demo" / "report.html").is_file()
    assert "tiny-sdxl" in (elsewhere / "demo" / "report.html").read_text()


def test_a_missing_world_model_is_an_error_not_the_random_model(tmp_path, monkeypatch):
    from pipelines.loading import load_pipeline

    shutil.copytree(asset_lookup.assets_root() / "models" / "tiny-clip", tmp_path / "models" / "tiny-clip")
    monkeypatch.setattr(asset_lookup, "assets_root", lambda: tmp_path)  # an installation without tiny-sdxl
    with pytest.raises(asset_lookup.MissingAssetError, match="tiny-sdxl model"):
        load_pipeline("tiny-sdxl", device="cpu")
    pipe, family = load_pipeline("tiny-sdxl-random", device="cpu")  # the random model only by its own name
    assert family.name == "sdxl"
