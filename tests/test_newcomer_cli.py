"""Issue 16 items 5, 7 and 10, issue 15 item 6: light listings, log lines, umask, the library, no overwrite."""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pipelines.assets import assets_root
from pipelines.atomic_files import atomic_write_bytes, copy_atomically, reserve_new_path
from studio.library import scan

ROOT = Path(__file__).resolve().parent.parent
WORLD_LORAS = assets_root() / "loras"


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", XDG_CACHE_HOME=str(tmp_path / "cache"),
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""), **extra)
    return env


def _studio(tmp_path: Path, *args: str, **extra: str) -> subprocess.CompletedProcess:
    """``studio ARGS`` in a fresh process, stdout and stderr piped (not a terminal)."""
    return subprocess.run([sys.executable, "-m", "studio.cli", *args], env=_env(tmp_path, **extra), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)


def _safetensors(path: Path, header, data: bytes = b"") -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


# ------------------------------------------------------------------------------------- item 5: light listings
def test_listings_do_not_import_torch(tmp_path):
    """``studio library`` never needs torch; ``studio strategies`` builds its rows from the registry once and
    then lists them from the cache without torch (the first run pays for the imports)."""
    first = _studio(tmp_path, "strategies", "--json")
    assert first.returncode == 0, first.stderr
    probe = ("import json, sys; from studio.cli import app; from studio.library import scan; "
             f"infos, errors = scan({str(WORLD_LORAS)!r}); "
             "from studio.strategy_listing import strategy_rows; rows = strategy_rows(); "
             "print(json.dumps({'torch': 'torch' in sys.modules, 'diffusers': 'diffusers' in sys.modules, "
             "'loras': len(infos), 'rows': rows}))")
    out = subprocess.run([sys.executable, "-c", probe], env=_env(tmp_path), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert not seen["torch"] and not seen["diffusers"]
    assert seen["loras"] == 12
    from studio.strategy_listing import registry_rows

    assert seen["rows"] == json.loads(json.dumps(registry_rows())) == json.loads(first.stdout)


def test_the_strategy_listing_is_rebuilt_when_a_strategy_module_changes(tmp_path):
    from studio.strategy_listing import listing_key

    module = tmp_path / "new_strategy.py"
    module.write_text("x = 1\n")
    before = listing_key([module])
    module.write_text("x = 22\n")
    assert listing_key([module]) != before


# ------------------------------------------------------------------------- issue 15 item 6: bad library files
def test_library_lists_every_good_file_and_reports_each_bad_one(tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    shutil.copy(WORLD_LORAS / "tiny-sdxl" / "subject-zorb.safetensors", folder / "zorb.safetensors")
    shutil.copy(WORLD_LORAS / "tiny-flux" / "style-striped.safetensors", folder / "striped.safetensors")
    weight = {"a.lora_down.weight": {"dtype": "F32", "shape": [1, 1], "data_offsets": [0, 4]}}
    bad = {
        "[red]markup[/red]": b"\x01not json",
        "tag-counts": {"__metadata__": {"ss_tag_frequency": '{"a": {"x": "many"}}'}, **weight},
        "empty": None,
        "a-list": [1, 2],
    }
    for name, header in bad.items():
        path = folder / f"{name.replace('/', '')}.safetensors"
        if header is None:
            path.write_bytes(b"")
        else:
            _safetensors(path, header, b"\0\0\0\0" if isinstance(header, dict) else b"")
    (folder / "a-folder.safetensors").mkdir()

    result = _studio(tmp_path, "library", str(folder), "--json")
    assert result.returncode == 0, result.stderr
    listed = {Path(row["path"]).name for row in json.loads(result.stdout)}
    assert {"zorb.safetensors", "striped.safetensors", "tag-counts.safetensors"} == listed
    skipped = [line for line in result.stderr.splitlines() if line.startswith("skipped:")]
    names = ["[red]markup[red].safetensors", "empty.safetensors", "a-list.safetensors", "a-folder.safetensors"]
    assert len(skipped) == len(names)
    for name in names:  # each on its own line, the markup shown as text
        assert sum(name in line for line in skipped) == 1, (name, skipped)


# ------------------------------------------------------------------------- item 10: triggers, bases, gates
def test_world_loras_list_their_trigger_word_only_and_qr_loras_their_base():
    from studio.world.concepts import HELD_OUT, trigger_phrase

    infos, errors = scan(WORLD_LORAS)
    assert not errors and len(infos) == 12
    for info in infos:  # the trigger (subjects: the class word they are bound to), not the category
        family = Path(info.path).parent.name.removeprefix("tiny-")
        concept = next(c for c in HELD_OUT if c.name == Path(info.path).stem)
        assert info.triggers == [trigger_phrase(concept, family)], info.path
    qr_infos, errors = scan(assets_root() / "qr-loras")
    assert not errors and len(qr_infos) == 12  # the bases files are not listed
    for info in qr_infos:
        family = Path(info.path).parent.name.removeprefix("tiny-")
        assert info.base == family, (info.path, info.base)


def test_a_gates_file_is_not_listed_as_a_lora(tmp_path):
    from fusion.gates import GateSet

    shutil.copy(WORLD_LORAS / "tiny-sdxl" / "subject-zorb.safetensors", tmp_path / "zorb.safetensors")
    GateSet({"unet.down_blocks.0.attn": 8}, None).save(tmp_path / "zorb.gates.safetensors", {"model": "tiny-sdxl"})
    infos, errors = scan(tmp_path)
    assert [Path(i.path).name for i in infos] == ["zorb.safetensors"] and not errors


# ------------------------------------------------------------------------- item 10: render never overwrites
def test_render_never_overwrites_an_existing_png(tmp_path, monkeypatch):
    """``studio render`` twice into one folder, the second time from the first image's recipe."""
    from typer.testing import CliRunner

    from studio.cli import app

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    args = ["render", "a large red zorb, solid, on a light background, center", "--model", "tiny-sdxl-random",
            "--steps", "2", "--out", "out"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    path = tmp_path / "out" / "merge-seed0.png"
    before = path.read_bytes()
    second = runner.invoke(app, ["render", "--recipe", str(path), "--out", "out"])
    assert second.exit_code == 0, second.output
    new = tmp_path / "out" / "merge-seed0-1.png"
    assert str(Path("out") / new.name) in second.output and path.read_bytes() == before
    assert Image.open(new).size == Image.open(path).size
    third = runner.invoke(app, ["render", "--recipe", str(path)])  # no --out: outputs/, twice
    fourth = runner.invoke(app, ["render", "--recipe", str(path)])
    assert third.exit_code == fourth.exit_code == 0
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["merge-seed0-1.png", "merge-seed0.png"]


def test_reserved_names_are_never_shared(tmp_path):
    target = tmp_path / "merge-seed0.png"
    target.write_bytes(b"first")
    names = [reserve_new_path(target) for _ in range(3)]
    assert [p.name for p in names] == ["merge-seed0-1.png", "merge-seed0-2.png", "merge-seed0-3.png"]
    assert target.read_bytes() == b"first"


# ------------------------------------------------------------------------- item 5: log lines, no FutureWarning
def test_render_logs_progress_lines_and_no_dtype_warning_when_not_a_terminal(tmp_path):
    result = _studio(tmp_path, "render", "a red circle", "--model", "tiny-sdxl", "--steps", "3", "--out",
                     str(tmp_path / "out"), PYTHONWARNINGS="always")
    assert result.returncode == 0, result.stderr
    assert "denoising steps: 3/3" in result.stderr
    assert "torch_dtype" not in result.stderr


def test_batch_reporter_prints_a_line_per_image_to_a_log(monkeypatch):
    import io

    from rich.console import Console

    import studio.batch_cli as batch_cli

    log = io.StringIO()
    monkeypatch.setattr(batch_cli, "console", Console(file=log, force_terminal=False, width=200))

    class Item:
        def __init__(self, label):
            self.label = label

    reporter = batch_cli.RichReporter()
    items = [Item("zorb | merge | seed 0"), Item("zorb | switch | seed 0")]
    reporter.start(items)
    for item, status in zip(items, ("ok", "failed")):
        reporter.item(item)
        reporter.step(1, 2)
        reporter.done({"status": status, "error": "boom"})
    reporter.close()
    lines = log.getvalue().splitlines()
    assert lines[0] == "batch: 2 images to render (loading the model)"
    assert lines[1].startswith("images: 1/2 zorb | merge | seed 0: ok (elapsed")
    assert lines[2].startswith("images: 2/2 zorb | switch | seed 0: FAILED: boom (elapsed")


# ------------------------------------------------------------------------------------------- item 7: umask
@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077], ids=["022", "002", "077"])
def test_written_files_follow_the_umask(tmp_path, umask):
    import torch

    from fusion.disk_cache import DiskCache
    from fusion.gates import GateSet
    from pipelines.adapters.qr_lora import save_qr_bases
    from pipelines.atomic_files import save_safetensors
    from studio.recipe import Recipe

    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "report.html", b"<html>")
        copy_atomically(tmp_path / "report.html", tmp_path / "copy.html")
        recipe = Recipe(model="tiny-sdxl", prompt="a red circle", steps=2, guidance=4.0, width=64, height=64)
        recipe.save_png(Image.new("RGB", (8, 8)), tmp_path / "image.png")
        cached = DiskCache("profiles", cache_dir=tmp_path / "cache").put({"k": 1}, {"v": 2})
        # safetensors' own save_file makes 0600 files whatever the umask (0.8): the studio's writers go around it
        tensors = save_safetensors({"w": torch.zeros(2)}, tmp_path / "tensors.safetensors")
        gates = GateSet({"unet.down_blocks.0.attn": 8}, None).save(tmp_path / "g.gates.safetensors", {"model": "x"})
        bases = save_qr_bases(tmp_path / "qr-bases.safetensors", {"unet.proj": (torch.eye(2), torch.ones(2, 3))})
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    for path in (tmp_path / "report.html", tmp_path / "copy.html", tmp_path / "image.png", cached, tensors, gates,
                 bases):
        assert stat.S_IMODE(path.stat().st_mode) == want, (path.name, oct(path.stat().st_mode))


def test_no_writer_bypasses_the_atomic_helper():
    """``tempfile.mkstemp`` and safetensors' ``save_file`` make 0600 files; only :mod:`pipelines.atomic_files` may
    call them (and fixes the mode), or a writer that sets ``file_mode()`` itself (diffusers' LoRA export). The world
    build (studio/world) writes into the source tree and is left out."""
    sources = [p for folder in ("studio", "pipelines", "fusion", "ui") for p in (ROOT / folder).rglob("*.py")
               if p.name != "atomic_files.py" and "world" not in p.relative_to(ROOT).parts]
    offenders = [str(p.relative_to(ROOT)) for p in sources if "mkstemp(" in p.read_text()]
    unsafe = [str(p.relative_to(ROOT)) for p in sources
              if "save_file(" in p.read_text() and "file_mode()" not in p.read_text()]
    assert offenders == [] and unsafe == []

