"""End-to-end: the web app on the tiny SDXL model, driven in a real headless Chromium by Playwright.

The app runs in this process on a free localhost port with a temporary LoRA library; Chromium is Debian's
``chromium`` package (``.ci/run`` installs it). Screenshots go to ``test-artifacts/``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ARTIFACTS
from studio import Lora, Recipe
from ui.app import launch, make_app
from ui_support import TinyClipScorer, build_library, free_port

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 90_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    library = build_library(root / "loras")
    demo, callbacks = make_app("tiny-sdxl-random", [library], out_dir=root / "out", scorer=TinyClipScorer(),
                               preview_every=1)
    port = free_port()
    launch(demo, callbacks, port=port, block=False, quiet=True)
    assert demo.server_name == "127.0.0.1"  # local only unless --host says otherwise
    yield {"url": f"http://127.0.0.1:{port}", "callbacks": callbacks, "root": root}
    demo.close(verbose=False)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture()
def page(browser, server):
    context = browser.new_context(viewport={"width": 1600, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(server["url"])
    page.wait_for_selector(".lora-card")
    yield page
    context.close()


def download_png(page, path):
    """Click the app's PNG download and save the file at ``path``; returns ``path``."""
    with page.expect_download() as download:
        page.click("#download-png")
    download.value.save_as(path)
    return path


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"ui-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def add_from_library(page, name: str) -> None:
    before = page.locator(".stack-row").count()
    page.locator(".lora-card", has_text=name).get_by_role("button", name="Add to stack").click()
    page.wait_for_function(f"document.querySelectorAll('.stack-row').length == {before + 1}")


def choose(page, elem_id: str, option: str) -> None:
    """Pick an option of a Gradio dropdown."""
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def test_generate_with_two_loras_from_the_library(page, server, tmp_path):
    cards = page.locator(".lora-card")
    assert cards.count() == 2  # the FLUX LoRA is hidden: it does not fit the loaded SDXL model
    assert page.locator(".lora-card", has_text="random-subject").locator("img").count() == 1  # preview image
    add_from_library(page, "random-subject")
    add_from_library(page, "random-style")
    page.locator(".lora-card", has_text="random-style").get_by_role("button", name="Insert triggers").click()
    page.wait_for_function("document.querySelector('#prompt textarea').value.includes('inkwash')")
    page.locator("#prompt textarea").fill("a zorb in a garden, inkwash")
    # edit the second LoRA (weight, step window, block preset), then move it first: the re-rendered rows show
    # the stack as the server holds it
    row = page.locator(".stack-row").nth(1)
    for cls, value in (("stack-weight", 0.7), ("stack-start", 0.2)):
        box = row.locator(f".{cls} input[type=number]")
        box.fill(str(value))
        box.press("Enter")
    row.locator(".stack-preset input").click()
    page.get_by_role("option", name="style: outer blocks", exact=True).click()
    row.get_by_role("button", name="Up").click()
    page.wait_for_function("document.querySelectorAll('.stack-row')[0].innerText.includes('random-style')")
    first = page.locator(".stack-row").nth(0)
    assert first.locator(".stack-weight input[type=number]").input_value() == "0.7"
    assert first.locator(".stack-start input[type=number]").input_value() == "0.2"
    assert first.locator(".stack-preset input").input_value() == "style: outer blocks"
    choose(page, "strategy", "switch")
    page.wait_for_selector(".strategy-param")  # switch's declared parameter, generated from the registry
    assert "tau" in page.locator(".strategy-param").first.inner_text()
    choose(page, "strategy", "merge")
    page.wait_for_selector("#strategy-no-params")
    choose(page, "strategy", "composite")  # its one parameter (reduce=mean|sum) replaces switch's tau
    page.wait_for_function("[...document.querySelectorAll('.strategy-param')].some(e => e.innerText.includes('reduce'))"
                           " && ![...document.querySelectorAll('.strategy-param')].some(e => e.innerText.includes('tau'))")
    set_number(page, "steps", 4)
    set_number(page, "seed", 7)
    page.click("#generate")
    page.wait_for_function("document.querySelector('#progress').innerText.startsWith('Done')")
    image = page.locator("#gallery img").first
    image.wait_for()
    assert page.evaluate("img => img.naturalWidth", image.element_handle()) == 64
    recipe = page.locator("#recipe").inner_text()
    assert 'strategy = "composite"' in recipe and "random-subject" in recipe and "random-style" in recipe
    assert 'prompt = "a zorb in a garden, inkwash"' in recipe and "seed = 7" in recipe
    screenshot(page, "generate")
    saved = download_png(page, tmp_path / "download.png")
    restored = Recipe.from_png(saved)
    assert (restored.strategy, restored.seed, restored.steps) == ("composite", 7, 4)
    assert [(Path(lora.source).name, lora.weight, lora.start, lora.blocks) for lora in restored.loras] == [
        ("random-style.safetensors", 0.7, 0.2, "style: outer blocks"), ("random-subject.safetensors", 1.0, 0.0, None)]
    # the image in the browser is the one the API makes from the same recipe
    callbacks = server["callbacks"]
    again = callbacks.studio.reproduce(restored)
    assert np.array_equal(np.asarray(Image.open(saved).convert("RGB")), np.asarray(again.image))


def test_compare_two_strategies_side_by_side(page):
    add_from_library(page, "random-subject")
    add_from_library(page, "random-style")
    page.locator("#prompt textarea").fill("a zorb, inkwash")
    set_number(page, "steps", 3)
    choose(page, "strategy", "switch")  # edit switch's generated control: Compare runs switch with it
    tau = page.locator(".strategy-param input[type=number]").first
    tau.fill("2")
    tau.press("Enter")
    page.get_by_role("tab", name="Compare").click()
    strategies = page.locator("#compare-strategies")
    for name in ("merge", "switch", "composite"):
        box = strategies.get_by_label(name, exact=True)
        if box.is_checked() != (name in ("switch", "composite")):
            box.click()
    page.click("#compare")
    page.wait_for_function("document.querySelector('#compare-progress').innerText.startsWith('Compared 3')")
    assert page.locator("#compare-gallery img").count() >= 3
    table = page.evaluate("Array.from(document.querySelectorAll('#compare-table [role=row]')).map(r => r.innerText)")
    header, *rows = [row.split("\n") for row in table]
    assert header[0] == "run" and [row[0] for row in rows] == ["no LoRAs", "switch", "composite"]
    for run, score, seconds in rows:  # a CLIPScore (from the injected scorer) and a timing on every row
        float(score), float(seconds)
    screenshot(page, "compare")
    page.locator("#compare-gallery button.thumbnail-item, #compare-gallery .thumbnail-item").nth(1).click()
    page.wait_for_function("document.querySelector('#compare-recipe').innerText.includes('strategy = \"switch\"')")
    assert "tau = 2" in page.locator("#compare-recipe").inner_text()


def test_restore_a_recipe_from_a_png(page, server, tmp_path):
    callbacks = server["callbacks"]
    library = callbacks.library
    result = callbacks.studio.compose(
        "a zorb on a beach", [Lora(library.path("styles/random-style.safetensors"), weight=0.6, start=0.2),
                              Lora(library.path("random-subject.safetensors"), weight=1.1)],
        "switch", strategy_params={"tau": 2}, negative_prompt="blurry", seed=123, steps=3)
    (png,) = result.save(tmp_path)
    page.get_by_role("tab", name="Restore").click()
    page.set_input_files("#restore-file input[type=file]", str(png))
    page.wait_for_function("document.querySelector('#restore-status').innerText.includes('Restored')")
    assert page.locator("#prompt textarea").input_value() == "a zorb on a beach"
    assert page.locator("#negative textarea").input_value() == "blurry"
    assert page.locator("#seed input").input_value() == "123"
    assert page.locator("#strategy input").input_value() == "switch"
    page.wait_for_function("document.querySelectorAll('.stack-row').length == 2")
    rows = page.locator(".stack-row")
    assert "random-style" in rows.nth(0).inner_text() and "random-subject" in rows.nth(1).inner_text()
    assert rows.nth(0).locator(".stack-weight input[type=number]").input_value() == "0.6"
    assert rows.nth(0).locator(".stack-start input[type=number]").input_value() == "0.2"
    assert page.locator(".strategy-param input[type=number]").first.input_value() == "2"
    screenshot(page, "restore")


def test_crafted_paths_are_refused(page, server):
    call = page.evaluate("""async (name) => {
        const post = await fetch('/gradio_api/call/add_lora', {method: 'POST',
            headers: {'Content-Type': 'application/json'}, body: JSON.stringify({data: [name]})});
        const {event_id} = await post.json();
        const stream = await fetch('/gradio_api/call/add_lora/' + event_id);
        return await stream.text();
    }""", "../../etc/passwd")
    assert "event: error" in call and "is not a LoRA of the library" in call, call
    lora_file = server["callbacks"].library.path("random-subject.safetensors")
    for path in ("/etc/passwd", str(lora_file), "../../../../etc/passwd"):
        status = page.evaluate("async (p) => (await fetch('/gradio_api/file=' + p)).status", path)
        assert status in (403, 404), (path, status)
    # the page's own session is untouched
    assert page.locator(".stack-row").count() == 0
    assert json.loads(page.evaluate("async () => JSON.stringify((await (await fetch('/config')).json()).version)"))
