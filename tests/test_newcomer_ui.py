"""Issue 16 items 2, 9 (and 10 in the app): the web app on the tiny world's LoRA library, in headless Chromium at
a common window size, and its recipe endpoint driven by a real API client (``gradio_client``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.assets import assets_root
from studio import Lora, Recipe
from test_ui_e2e import CHROMIUM, CHROMIUM_ARGS, TIMEOUT_MS
from ui.app import launch, make_app
from ui_support import free_port

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
WORLD_LORAS = assets_root() / "loras"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("newcomer-ui")
    demo, callbacks = make_app("tiny-sdxl", [WORLD_LORAS], out_dir=root / "out", scorer=None, preview_every=0)
    port = free_port()
    launch(demo, callbacks, port=port, block=False, quiet=True)
    yield {"url": f"http://127.0.0.1:{port}", "callbacks": callbacks, "root": root}
    demo.close(verbose=False)


def test_the_library_shows_its_cards_at_1280x800_and_adds_one(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(server["url"])
        page.wait_for_selector(".lora-card")
        panel = page.locator("#library-panel").bounding_box()
        cards = page.locator(".lora-card")
        assert cards.count() == 6  # the six tiny-sdxl LoRAs (the FLUX ones do not fit the loaded model)
        for i in range(cards.count()):  # every card lies in the library's own column, none in a hidden one
            box = cards.nth(i).bounding_box()
            assert panel["x"] <= box["x"] and box["x"] + box["width"] <= panel["x"] + panel["width"] + 1, (i, box)
        first = cards.first.bounding_box()
        assert first["y"] + first["height"] <= 800  # visible without scrolling the page
        zorb = page.locator(".lora-card", has_text="subject-zorb")
        zorb.scroll_into_view_if_needed()
        assert zorb.is_visible()
        zorb.get_by_role("button", name="Insert triggers").click()
        page.wait_for_function("document.querySelector('#prompt textarea').value.length > 0")
        # the class word tiny-sdxl's zorb LoRA is bound to (its trigger phrase), not the category "subject"
        assert page.locator("#prompt textarea").input_value().strip() == "circle"
        zorb.get_by_role("button", name="Add to stack").click()
        page.wait_for_function("document.querySelectorAll('.stack-row').length == 1")
        assert "subject-zorb" in page.locator(".stack-row").first.inner_text()
        browser.close()


def _direct(recipe: dict) -> np.ndarray:
    """The same recipe through the plain Python API (a separate studio), as the reference image."""
    from studio import Studio

    studio = Studio("tiny-sdxl")
    loras = [Lora(source=WORLD_LORAS / "tiny-sdxl" / Path(item["source"]).name, weight=item["weight"],
                  start=item.get("start", 0.0), end=item.get("end", 1.0), blocks=item.get("blocks"))
             for item in recipe["loras"]]
    result = studio.compose(recipe["prompt"], loras, recipe["strategy"], strategy_params=recipe["strategy_params"],
                            seed=recipe["seed"], steps=recipe["steps"])
    return np.asarray(result.image)


def test_the_recipe_endpoint_renders_a_whole_recipe_for_gradio_client(server):
    from gradio_client import Client

    client = Client(server["url"], verbose=False)
    assert "/render_recipe" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    recipe = {"model": "tiny-sdxl", "prompt": "a large blue zorb, striped, on a light background, center",
              "strategy": "switch", "strategy_params": {"tau": 2}, "seed": 3, "steps": 6,
              "loras": [{"source": "tiny-sdxl/subject-zorb.safetensors", "weight": 0.8, "end": 0.9},
                        {"source": "style-striped.safetensors", "weight": 0.6, "start": 0.1}]}
    gallery, recipes = client.predict(json.dumps(recipe), 1, api_name="/render_recipe")
    assert len(gallery) == 1
    image = np.asarray(Image.open(gallery[0]["image"]).convert("RGB"))
    returned = Recipe.from_toml(recipes)
    assert returned.strategy == "switch" and returned.strategy_params == {"tau": 2} and returned.seed == 3
    assert [(Path(lora.source).name, lora.weight, lora.start, lora.end) for lora in returned.loras] == [
        ("subject-zorb.safetensors", 0.8, 0.0, 0.9), ("style-striped.safetensors", 0.6, 0.1, 1.0)]
    assert np.array_equal(image, _direct(recipe))  # weights, step windows and parameters all arrived

    toml = Recipe.from_dict({**recipe, "strategy": "merge", "strategy_params": {}}).to_toml()
    gallery, _ = client.predict(toml, 2, api_name="/render_recipe")  # TOML too; count gives seeds 3 and 4
    assert len(gallery) == 2

    outside = {**recipe, "loras": [{"source": "/etc/passwd", "weight": 1.0}]}
    with pytest.raises(Exception, match="not in the app's library"):  # a client's path is never opened
        client.predict(json.dumps(outside), 1, api_name="/render_recipe")


def test_stop_compare_captions_and_restore_leave_no_stale_state(server, tmp_path):
    """Item 8: Stop says so and shows no image of an earlier job; the four Compare thumbnails are whole with a
    one-line caption; a restore clears the stack's "Added ..." message."""
    from playwright.sync_api import sync_playwright

    from test_ui_e2e import set_number

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(server["url"])
        page.wait_for_selector(".lora-card")
        for name in ("subject-zorb", "style-striped"):
            card = page.locator(".lora-card", has_text=name)
            card.get_by_role("button", name="Add to stack").click()
        page.wait_for_function("document.querySelectorAll('.stack-row').length == 2")
        assert "Added" in page.locator("#stack-status").inner_text()
        page.locator("#prompt textarea").fill("a large blue zorb, striped, on a light background, center")
        set_number(page, "steps", 2)
        page.click("#generate")
        page.wait_for_function("document.querySelector('#progress').innerText.startsWith('Done')")
        assert page.locator("#gallery img").count() == 1

        set_number(page, "steps", 150)  # a long job, stopped while it runs
        page.click("#generate")
        page.wait_for_function("document.querySelector('#progress').innerText.includes('step ')")
        assert page.locator("#gallery img").count() == 0  # the earlier job's image is gone
        page.click("#stop")
        page.wait_for_function("document.querySelector('#progress').innerText.startsWith('Stopped')")
        assert page.locator("#gallery img").count() == 0

        set_number(page, "steps", 2)
        page.get_by_role("tab", name="Compare").click()
        strategies = page.locator("#compare-strategies")
        for name in ("merge", "switch", "composite"):
            box = strategies.get_by_label(name, exact=True)
            if not box.is_checked():
                box.click()
        page.click("#compare")
        page.wait_for_function("document.querySelector('#compare-progress').innerText.startsWith('Compared 4')",
                               timeout=TIMEOUT_MS * 2)
        gallery = page.locator("#compare-gallery").bounding_box()
        thumbs = page.locator("#compare-gallery .thumbnail-item")
        assert thumbs.count() == 4
        for i in range(4):
            box = thumbs.nth(i).bounding_box()
            assert box["y"] + box["height"] <= gallery["y"] + gallery["height"] + 1, (i, box, gallery)
            caption = thumbs.nth(i).locator(".caption-label")
            if caption.count():
                assert caption.bounding_box()["height"] <= 0.3 * box["height"]

        png = next(Path(server["callbacks"].out_dir).glob("*.png"))
        page.get_by_role("tab", name="Restore").click()
        page.set_input_files("#restore-file input[type=file]", str(png))
        page.wait_for_function("document.querySelector('#restore-status').innerText.includes('Restored')")
        page.wait_for_function("!document.querySelector('#stack-status').innerText.includes('Added')")
        browser.close()


def test_the_model_menu_switches_to_tiny_flux_and_back(server):
    """Item 8: a model switcher offering the launch model and the built-in world models, nothing else."""
    from gradio_client import Client
    from playwright.sync_api import sync_playwright

    from test_ui_e2e import choose
    from ui.model_switch import switch_model

    callbacks = server["callbacks"]
    with pytest.raises(Exception, match="not offered"):
        switch_model(callbacks, "/etc/passwd", callbacks.model_choices, {})
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(server["url"])
        page.wait_for_selector(".lora-card")
        page.locator(".lora-card", has_text="subject-zorb").get_by_role("button", name="Add to stack").click()
        page.wait_for_function("document.querySelectorAll('.stack-row').length == 1")
        choose(page, "model-switch", "tiny-flux")
        page.wait_for_function("document.querySelector('#model-summary').innerText.includes('tiny-flux')")
        page.wait_for_function("document.querySelectorAll('.stack-row').length == 0")
        page.wait_for_function("[...document.querySelectorAll('.lora-card')].every(c => c.innerText.includes('FLUX'))")
        assert page.locator(".lora-card").count() == 6
        assert callbacks.studio.model == "tiny-flux" and callbacks.family == "flux"
        browser.close()
    recipe = {"model": "tiny-flux", "prompt": "a large red zorb, solid, on a light background, center", "seed": 0,
              "steps": 4, "loras": [{"source": "tiny-flux/subject-zorb.safetensors", "weight": 1.0}]}
    gallery, recipes = Client(server["url"], verbose=False).predict(json.dumps(recipe), 1, api_name="/render_recipe")
    assert len(gallery) == 1 and 'model = "tiny-flux"' in recipes
    switch_model(callbacks, "tiny-sdxl", callbacks.model_choices, callbacks.studio_options)
    assert callbacks.studio.family.name == "sdxl"


def test_the_no_lora_run_of_compare_says_no_strategy_acted(server):
    from ui.callbacks import Settings

    callbacks = server["callbacks"]
    events = list(callbacks.compare_events(Settings(prompt="a red circle", steps=2, width=64, height=64), [],
                                           True, {}, []))
    items = events[-1]
    assert [item.label for item in items] == ["no LoRAs"]
    assert items[0].recipe.startswith("# no LoRAs: the base model alone")
    assert Recipe.from_toml(items[0].recipe).loras == []  # still a valid recipe
    assert Path(items[0].toml).read_text() == items[0].recipe
