"""``studio batch`` end to end on the tiny model: files, manifest, scores and report; resume after SIGKILL;
out-of-memory items; two processes under ``accelerate launch``; the report in a real headless browser."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from batch_support import EXAMPLE_LORAS, ROOT, cli_env, studio_cli, write_grid, write_tiny_clip
from pipelines.errors import OutOfMemoryError, StrategyError
from studio import Recipe, Studio
from studio.batch import BatchError, BatchOptions, run_batch
from studio.grid import load_grid
from studio.manifest import MANIFEST, read_lines

ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(scope="module")
def tiny_studio() -> Studio:
    return Studio("tiny-sdxl-random")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory, tiny_clip):
    """The 2 prompts x 2 strategies x 2 seeds grid, rendered once in this process (one Studio, LoRAs parsed once)."""
    import studio.api as api

    folder = tmp_path_factory.mktemp("batch")
    grid = write_grid(folder / "grid.toml")
    items, _ = load_grid(grid, allow=[EXAMPLE_LORAS])  # the grid names them by absolute path (--allow-path)
    counts = {"studios": 0, "parses": 0}
    real_init, real_parse = api.Studio.__init__, api.parse_lora

    def counting_init(self, *args, **kwargs):
        counts["studios"] += 1
        real_init(self, *args, **kwargs)

    def counting_parse(*args, **kwargs):
        counts["parses"] += 1
        return real_parse(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(api.Studio, "__init__", counting_init)
        mp.setattr(api, "parse_lora", counting_parse)
        summary = run_batch(items, folder / "out", BatchOptions(clip_model=str(tiny_clip)))
    return folder / "out", grid, items, summary, counts


def png_ok(path: Path) -> Recipe:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        image.load()
    return Recipe.from_png(path)


def test_grid_renders_expected_files_and_report(rendered):
    out, _, items, summary, counts = rendered
    assert (summary.planned, summary.rendered, summary.failed, summary.missing) == (8, 8, 0, 0)
    assert counts == {"studios": 1, "parses": 2}                      # no reload per image
    lines = read_lines(out / MANIFEST)
    assert [r["id"] for r in lines] == [i.id for i in items]          # one line per image, in plan order
    pngs = sorted(p.relative_to(out).as_posix() for p in (out / "images").rglob("*.png"))
    assert pngs == sorted(i.file for i in items)
    for item, record in zip(items, lines):
        recipe = png_ok(out / item.file)
        assert recipe.to_dict() == record["recipe"]
        assert (recipe.prompt, recipe.strategy, recipe.seed, recipe.steps) == (item.prompt, item.strategy.name, item.seed, 2)
        assert set(record["scores"]["concepts"]) == {"subject", "style"} and record["scores"]["clip"] >= 0
        assert {"render_s", "save_s", "score_s"} <= set(record["timings"])
    with open(out / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == [i.id for i in items]
    assert all(float(r["clip_score"]) == pytest.approx(l["scores"]["clip"], abs=1e-4) for r, l in zip(rows, lines))
    assert {"concept:subject", "concept:style"} <= set(rows[0])
    html = (out / "report.html").read_text()
    assert html.count("<img ") == 8 and all(f'src="{i.file}"' in html for i in items)
    assert "a zorb on a beach, inkwash painting" in html and "mean ± std" in html and "<svg" in html
    sheets = sorted((out / "grids").glob("*.png"))
    assert len(sheets) == 2
    with Image.open(sheets[0]) as sheet:
        assert sheet.size[0] > 2 * 128 and sheet.size[1] > 2 * 128     # 2 x 2 cells of at least 128 px


def test_batch_image_is_the_studio_image(rendered, tiny_studio):
    out, _, items, _, _ = rendered
    path = out / items[3].file
    again = tiny_studio.reproduce(Recipe.from_png(path))
    assert np.array_equal(np.asarray(again.image), np.asarray(Image.open(path).convert("RGB")))


def test_run_again_renders_nothing(rendered, tiny_clip):
    out, _, items, _, _ = rendered
    summary = run_batch(items, out, BatchOptions(clip_model=str(tiny_clip)))
    assert (summary.rendered, summary.done_before, summary.missing) == (0, 8, 0)
    assert len(read_lines(out / MANIFEST)) == 8
    with pytest.raises(BatchError, match="already holds a batch"):
        run_batch(items, out, BatchOptions(resume=False))


def test_studio_score_rescores_from_manifest_and_from_pngs(rendered, tiny_clip, tmp_path):
    from typer.testing import CliRunner

    from studio.cli import app

    out, _, items, _, _ = rendered
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    before = {r["id"]: r["scores"] for r in read_lines(copy / MANIFEST)}
    (copy / "scores.csv").unlink()
    result = CliRunner().invoke(app, ["score", str(copy), "--clip-model", str(tiny_clip), "--concept", "style=ink"])
    assert result.exit_code == 0, result.output
    after = {r["id"]: r["scores"] for r in read_lines(copy / MANIFEST)}
    assert set(after) == set(before)
    for rid in before:
        assert after[rid]["clip"] == pytest.approx(before[rid]["clip"], abs=1e-4)
        assert after[rid]["concepts"]["subject"] == pytest.approx(before[rid]["concepts"]["subject"], abs=1e-4)
        assert after[rid]["concepts"]["style"] != pytest.approx(before[rid]["concepts"]["style"], abs=1e-4)  # new text
    assert (copy / "scores.csv").exists() and (copy / "report.html").exists()
    # a plain folder of studio PNGs (no manifest): scored from the embedded recipes
    bare = tmp_path / "bare"
    shutil.copytree(out / "images", bare)
    result = CliRunner().invoke(app, ["score", str(bare), "--clip-model", str(tiny_clip)])
    assert result.exit_code == 0, result.output
    records = read_lines(bare / MANIFEST)
    assert len(records) == 8
    by_file = {r["file"]: r["scores"]["clip"] for r in records}
    for r in read_lines(out / MANIFEST):
        assert by_file[r["file"].removeprefix("images/")] == pytest.approx(r["scores"]["clip"], abs=1e-4)


@pytest.mark.parametrize("error", [OutOfMemoryError("out of memory rendering 64x64 with 2 LoRA(s) under 'composite'"),
                                   StrategyError("QR-LoRA adapters 'a' and 'b' were made with different Q")])
def test_a_failing_item_is_recorded_and_the_batch_goes_on(tmp_path, monkeypatch, tiny_studio, error):
    import studio.api as api

    items, _ = load_grid(write_grid(tmp_path / "g.toml", prompts=1), allow=[EXAMPLE_LORAS])
    real = api.Studio.compose

    def flaky(self, prompt, loras=(), strategy="merge", **kwargs):
        if strategy == "composite" and kwargs["seed"] == 0:
            raise error
        return real(self, prompt, loras, strategy, **kwargs)

    monkeypatch.setattr(api.Studio, "compose", flaky)
    out = tmp_path / "out"
    summary = run_batch(items, out, BatchOptions(score=False), studio=tiny_studio)
    assert (summary.rendered, summary.failed, summary.missing) == (3, 1, 1)
    failed = [r for r in read_lines(out / MANIFEST) if r["status"] == "failed"]
    assert len(failed) == 1 and str(error) in failed[0]["error"] and failed[0]["item"]["row"] == "composite"
    assert "Failed items" in (out / "report.html").read_text()
    monkeypatch.setattr(api.Studio, "compose", real)
    summary = run_batch(items, out, BatchOptions(score=False), studio=tiny_studio)  # resume retries the failed one
    assert (summary.rendered, summary.failed, summary.missing) == (1, 0, 0)
    lines = read_lines(out / MANIFEST)
    assert len(lines) == 5 and sorted(r["id"] for r in lines if r["status"] == "ok") == sorted(i.id for i in items)


def _wait_for_lines(manifest: Path, at_least: int, process: subprocess.Popen, timeout: float = 300) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if manifest.exists():
            count = manifest.read_bytes().count(b"\n")
            if count >= at_least:
                return count
        if process.poll() is not None:
            raise AssertionError(f"the batch ended before it was killed:\n{process.stderr.read().decode()[-3000:]}")
        time.sleep(0.01)
    raise AssertionError("no progress")


def _check_consistent(out: Path) -> set[str]:
    """After a kill: every complete manifest line points at a complete PNG with its recipe."""
    ids = set()
    for record in read_lines(out / MANIFEST):
        assert record["status"] == "ok"
        assert png_ok(out / record["file"]).to_dict() == record["recipe"]
        ids.add(record["id"])
    return ids


def test_sigkill_mid_run_then_resume_gives_exactly_the_full_set(tmp_path, tiny_clip):
    from typer.testing import CliRunner

    from studio.cli import app

    grid = write_grid(tmp_path / "g.toml", seeds=(0, 1, 2))                      # 12 images
    items, _ = load_grid(grid, allow=[EXAMPLE_LORAS])
    out = tmp_path / "out"
    args = ["batch", str(grid), "--out", str(out), "--clip-model", str(tiny_clip), "--allow-path", str(EXAMPLE_LORAS)]
    process = subprocess.Popen(studio_cli(*args), cwd=ROOT, env=cli_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    _wait_for_lines(out / MANIFEST, 3, process)
    process.send_signal(signal.SIGKILL)                                          # mid-run: images are in flight
    assert process.wait(60) == -signal.SIGKILL
    done = _check_consistent(out)
    assert 3 <= len(done) < len(items)
    result = CliRunner().invoke(app, args)                                       # resume is the default
    assert result.exit_code == 0, result.output
    assert f"{len(items) - len(done)} rendered, {len(done)} already done" in " ".join(result.output.split())
    lines = read_lines(out / MANIFEST)
    assert sorted(r["id"] for r in lines) == sorted(i.id for i in items)        # exactly the set, no duplicate
    assert (out / MANIFEST).read_bytes().count(b"\n") == len(items)
    _check_consistent(out)
    files = sorted(p.relative_to(out).as_posix() for p in (out / "images").rglob("*.png"))
    assert files == sorted(i.file for i in items)                                # no orphan or half file
    assert not list(out.rglob("*.tmp"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_under_accelerate_match_one_process(rendered, tiny_clip, tmp_path):
    single, grid, items, _, _ = rendered
    out = tmp_path / "two"
    command = [
        os.sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
        "-m", "studio.cli", "batch", str(grid), "--out", str(out), "--device", "cpu", "--clip-model", str(tiny_clip),
        "--allow-path", str(EXAMPLE_LORAS),
    ]
    result = subprocess.run(command, cwd=ROOT, env=cli_env(), capture_output=True, timeout=600)
    assert result.returncode == 0, result.stderr.decode()[-4000:]
    assert "(2 processes)" in result.stderr.decode()
    lines = read_lines(out / MANIFEST)
    assert sorted(r["id"] for r in lines) == sorted(i.id for i in items) and len(lines) == 8
    assert {r["process"] for r in lines} == {0, 1} and not list(out.glob("manifest.shard-*"))
    one = {r["id"]: r for r in read_lines(single / MANIFEST)}
    for record in lines:
        reference = one[record["id"]]
        assert record["file"] == reference["file"] and record["recipe"] == reference["recipe"]
        a = np.asarray(Image.open(out / record["file"]), dtype=np.int16)
        b = np.asarray(Image.open(single / reference["file"]), dtype=np.int16)
        assert np.abs(a - b).max() <= 1                                         # same image (thread count may differ)
        assert record["scores"]["clip"] == pytest.approx(reference["scores"]["clip"], abs=0.5)
    assert (out / "report.html").exists() and (out / "scores.csv").exists()


def _browser():
    playwright = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.skip("Chromium is not installed (apt-get install -y chromium)")
    return playwright, chromium


def test_report_opens_in_a_headless_browser(rendered, tmp_path):
    from studio.report import render_report

    playwright, chromium = _browser()
    out = rendered[0]
    html, _ = render_report(out, read_lines(out / MANIFEST), inline_images=True)
    alone = tmp_path / "alone" / "report.html"                                   # travels without its images
    alone.parent.mkdir()
    alone.write_text(html)
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            for path, shot in ((out / "report.html", "batch-report.png"), (alone, "batch-report-inline.png")):
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                errors, failed_requests = [], []
                page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.on("requestfailed", lambda r: failed_requests.append(r.url))
                page.goto(path.as_uri(), wait_until="load")
                assert errors == [] and failed_requests == []
                assert page.locator("img").count() == 8
                for image in page.locator("img").all():                 # lazy images load once scrolled to
                    image.scroll_into_view_if_needed()
                page.wait_for_function(
                    "Array.from(document.images).every(i => i.complete && i.naturalWidth === 64)", timeout=15_000)
                assert page.locator("table.summary tbody tr").count() == 2
                assert page.locator("table.grid").count() == 2
                page.screenshot(path=str(ARTIFACTS / shot), full_page=True)
                page.close()
        finally:
            browser.close()
    assert (ARTIFACTS / "batch-report.png").stat().st_size > 10_000
