"""End-to-end: ControlNet in the web app (headless Chromium, Playwright), on the tiny SDXL model started with
``--controlnet`` (a tiny ControlNet from ``ControlNetModel.from_unet``, saved to a folder): upload a control image,
pick the ControlNet and a scale, generate, and get the image the Python API makes from the same recipe and image."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipelines.tiny import build_tiny_sdxl, build_tiny_sdxl_controlnet
from studio import Recipe
from test_modes import input_image
from test_ui_e2e import (  # noqa: F401 (fixtures)
    add_from_library, browser, choose, download_png, page, screenshot, set_number)
from ui.app import launch, make_app
from ui_support import TinyClipScorer, build_library, free_port


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e-controlnet")
    build_tiny_sdxl_controlnet(build_tiny_sdxl().unet).save_pretrained(root / "tiny-canny")
    demo, callbacks = make_app("tiny-sdxl-random", [build_library(root / "loras")], out_dir=root / "out",
                               scorer=TinyClipScorer(), preview_every=0, controlnets=[root / "tiny-canny"])
    port = free_port()
    launch(demo, callbacks, port=port, block=False, quiet=True)
    yield {"url": f"http://127.0.0.1:{port}", "callbacks": callbacks, "root": root}
    demo.close(verbose=False)


def test_controlnet_in_the_web_app(page, server, tmp_path):  # noqa: F811
    edges = tmp_path / "edges.png"
    input_image(7).save(edges)
    add_from_library(page, "random-subject")
    page.locator("#prompt textarea").fill("a zorb in a garden")
    set_number(page, "steps", 3)
    set_number(page, "seed", 3)
    page.get_by_text("Input image: img2img, inpainting, ControlNet").click()
    page.set_input_files("#control-image input[type=file]", str(edges))
    page.wait_for_function("document.querySelectorAll('#control-image img').length >= 1")
    choose(page, "controlnet", "tiny-canny")
    set_number(page, "controlnet-scale", 0.6)
    page.click("#generate")
    page.wait_for_function("document.querySelector('#progress').innerText.startsWith('Done')")
    recipe_text = page.locator("#recipe").inner_text()
    assert 'mode = "controlnet"' in recipe_text and "controlnet_conditioning_scale = 0.6" in recipe_text, recipe_text
    screenshot(page, "controlnet")
    saved = download_png(page, tmp_path / "controlled.png")
    recipe = Recipe.from_png(saved)
    assert recipe.controlnet == str((server["root"] / "tiny-canny").resolve())
    # the browser's image is the one the API makes from the recipe and the same control image (recorded by its
    # pixels' SHA-256: the app received it as an in-memory image)
    studio = server["callbacks"].studio
    again = studio.reproduce(recipe, control_image=Image.open(edges).convert("RGB"))
    assert np.array_equal(np.asarray(Image.open(saved).convert("RGB")), np.asarray(again.image))
    plain = studio.compose(recipe.prompt, [], seed=3, steps=3, width=64, height=64)
    assert not np.array_equal(np.asarray(plain.image), np.asarray(again.image))
