"""End-to-end: inpainting in the web app (headless Chromium, Playwright), on the tiny SDXL model: upload an image
and a mask, generate, and get the image the Python API makes from the same recipe and files."""

from __future__ import annotations

import numpy as np
from PIL import Image

from studio import Recipe
from test_modes import input_image, input_mask
from test_ui_e2e import (  # noqa: F401 (fixtures)
    add_from_library, browser, download_png, page, screenshot, server, set_number)


def test_inpaint_in_the_web_app(page, server, tmp_path):  # noqa: F811
    photo, mask = tmp_path / "photo.png", tmp_path / "mask.png"
    input_image(1).save(photo)
    input_mask().save(mask)
    add_from_library(page, "random-subject")
    page.locator("#prompt textarea").fill("a zorb in a garden")
    set_number(page, "steps", 4)
    set_number(page, "seed", 3)
    page.get_by_text("Input image: img2img, inpainting").click()
    page.set_input_files("#init-image input[type=file]", str(photo))
    page.set_input_files("#init-mask input[type=file]", str(mask))
    page.wait_for_function("document.querySelectorAll('#init-image img, #init-mask img').length >= 2")
    set_number(page, "strength", 0.8)
    page.click("#generate")
    page.wait_for_function("document.querySelector('#progress').innerText.startsWith('Done')")
    recipe_text = page.locator("#recipe").inner_text()
    assert 'mode = "inpaint"' in recipe_text and "strength = 0.8" in recipe_text, recipe_text
    screenshot(page, "inpaint")
    saved = download_png(page, tmp_path / "inpainted.png")
    recipe = Recipe.from_png(saved)
    assert (recipe.mode, recipe.strength, sorted(recipe.inputs)) == ("inpaint", 0.8, ["image", "mask_image"])
    # the browser's image is the one the API makes from the recipe and the same two files (checked by their pixels'
    # SHA-256: the app received them as in-memory images)
    again = server["callbacks"].studio.reproduce(recipe, image=Image.open(photo).convert("RGB"),
                                                 mask_image=Image.open(mask))
    assert np.array_equal(np.asarray(Image.open(saved).convert("RGB")), np.asarray(again.image))
    # and it is not the text-to-image one
    plain = server["callbacks"].studio.compose(recipe.prompt, [], seed=3, steps=4, width=64, height=64)
    assert not np.array_equal(np.asarray(plain.image), np.asarray(again.image))
