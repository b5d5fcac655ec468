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
        assert page.locator("#prompt textarea").input_value().strip() == "zorb"  # not the category "subject"
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
