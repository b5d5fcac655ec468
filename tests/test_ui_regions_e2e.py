"""End-to-end: regions in the web app (headless Chromium, Playwright) on the tiny SDXL model.

One LoRA gets the preset region ``left`` and a region prompt, the other a mask painted with the mouse on its row's
canvas; the app switches the strategy to ``regional``, shows the regions over the image area before rendering,
renders, and shows the masks the render used next to the image. The PNG's recipe carries both regions, and the
image is the one the Python API makes from that recipe.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from studio import Lora, Recipe
from test_ui_e2e import (  # noqa: F401 (fixtures)
    add_from_library, browser, download_png, page, screenshot, server, set_number)
from ui import region_overlay, regions, strategy_form


def pick_region(row, page, label: str) -> None:
    row.locator(".stack-region input").click()
    page.get_by_role("option", name=label, exact=True).click()


def image_at(page, locator) -> Image.Image:
    """The image an ``<img>`` shows, fetched from the app."""
    src = locator.get_attribute("src")
    return Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB")


def paint(page, canvas_locator, x0: float, y0: float, x1: float, y1: float) -> None:
    """A brush stroke from (x0, y0) to (x1, y1), fractions of the drawing area (the editor's image)."""
    box = canvas_locator.bounding_box()
    # the editor shows its square 256² canvas centred in the component, as tall as the drawing area allows
    side = min(box["width"], box["height"]) * 0.8
    left, top = box["x"] + (box["width"] - side) / 2, box["y"] + (box["height"] - side) / 2
    page.mouse.move(left + x0 * side, top + y0 * side)
    page.mouse.down()
    for k in range(1, 21):
        t = k / 20
        page.mouse.move(left + (x0 + (x1 - x0) * t) * side, top + (y0 + (y1 - y0) * t) * side)
    page.mouse.up()


def test_draw_a_region_and_render_with_regional(page, server, tmp_path):  # noqa: F811
    add_from_library(page, "random-subject")
    add_from_library(page, "random-style")
    page.locator("#prompt textarea").fill("a zorb and a garden")
    set_number(page, "steps", 3)
    set_number(page, "seed", 5)
    rows = page.locator(".stack-row")
    # 1. a preset region and a region prompt on the first LoRA: merge cannot use regions, so the app switches
    pick_region(rows.nth(0), page, "left")
    page.wait_for_function("document.querySelector('#strategy input').value == 'regional'")
    assert "switched from merge to regional" in page.locator("#stack-status").inner_text()
    prompt_box = rows.nth(0).locator(".stack-region-prompt textarea, .stack-region-prompt input").first
    prompt_box.fill("a big zorb")
    prompt_box.press("Tab")
    # 2. a mask painted on the second LoRA's canvas (right part of the image)
    pick_region(rows.nth(1), page, "mask: draw or upload")
    canvas_area = rows.nth(1).locator(".stack-canvas")
    canvas_area.wait_for(state="visible")
    # a mask upload that is not an image: a clear message, and nothing attached
    fake = tmp_path / "mask.png"
    fake.write_text("not an image")
    rows.nth(1).locator("input[type=file][data-testid$='-upload-button']").set_input_files(str(fake))
    page.get_by_text("mask.png is not a readable image").first.wait_for()
    assert not server["callbacks"].masks_dir.exists() or not list(server["callbacks"].masks_dir.iterdir())
    canvas_area.locator("button[aria-label='Brush']").first.click()
    drawing = canvas_area.locator("canvas").first
    paint(page, drawing, 0.70, 0.15, 0.80, 0.85)
    page.wait_for_function("document.querySelector('#stack-status').innerText.includes('drawn mask set')")
    # moving the LoRA re-renders the rows: both keep their regions (and showing the mask again saves nothing new)
    rows.nth(1).locator(".stack-up").click()
    page.wait_for_function("document.querySelectorAll('.stack-row')[0].innerText.includes('random-style')")
    assert rows.nth(0).locator(".stack-region input").input_value() == "mask: draw or upload"
    assert rows.nth(1).locator(".stack-region input").input_value() == "left"
    assert rows.nth(0).locator(".stack-canvas").is_visible()
    # 3. the overlay before rendering names both LoRAs
    page.wait_for_function("document.querySelector('#region-legend').innerText.includes('random-style')")
    legend = page.locator("#region-legend").inner_text()
    assert "random-subject" in legend and "random-style" in legend, legend
    preview = image_at(page, page.locator("#region-preview img").first)
    assert preview.size == (256, 256)
    screenshot(page, "regions-before")
    # 4. render; the masks the render used are shown next to the image
    page.click("#generate")
    page.wait_for_function("document.querySelector('#progress').innerText.startsWith('Done')")
    page.locator("#region-masks img").first.wait_for()
    page.wait_for_function("document.querySelector('#region-masks-legend').innerText.includes('random-style')")
    shown_masks = image_at(page, page.locator("#region-masks img").first)
    screenshot(page, "regions-after")
    saved = download_png(page, tmp_path / "regional.png")
    recipe = Recipe.from_png(saved)
    assert recipe.strategy == "regional"
    style, subject = recipe.loras
    assert (subject.region, subject.prompt) == ("left", "a big zorb")
    # the painted mask, as the app saved it: inside on the right, nothing on the left
    mask = np.asarray(Image.open(style.region).convert("L"), dtype=np.float32) / 255
    h, w = mask.shape
    assert mask[:, w // 2:].sum() > 0.02 * h * w and mask[:, : w // 2].sum() == 0
    # the browser's image is the one the API makes from the recipe; the masks shown are that render's
    again = server["callbacks"].studio.reproduce(recipe)
    assert np.array_equal(np.asarray(Image.open(saved).convert("RGB")), np.asarray(again.image))
    assert list(again.region_masks) == ["random-style", "random-subject"]
    assert [p.name for p in server["callbacks"].masks_dir.iterdir()] == [Path(style.region).name]
    expected = region_overlay.overlay(again.image, list(again.region_masks.items()))
    assert np.array_equal(np.asarray(shown_masks), np.asarray(expected))
    # the preview shown before rendering drew exactly those masks
    before = image_at(page, page.locator("#region-preview img").first)
    planned = region_overlay.overlay(region_overlay.plain_canvas(recipe.width, recipe.height), list(again.region_masks.items()))
    assert np.array_equal(np.asarray(before), np.asarray(planned))
    # and it is not the merge of both LoRAs on the whole image
    merged = server["callbacks"].studio.compose(recipe.prompt, [style.source, subject.source], "merge", seed=5,
                                                steps=3, width=recipe.width, height=recipe.height)
    assert not np.array_equal(np.asarray(merged.image), np.asarray(again.image))
    # Compare: regional against merge, which runs the same stack without regions; the masks follow the pick
    page.get_by_role("tab", name="Compare").click()
    boxes = page.locator("#compare-strategies")
    for name in {*strategy_form.strategy_names()[:2], "merge", "regional"}:
        box = boxes.get_by_label(name, exact=True)
        if box.is_checked() != (name in ("merge", "regional")):
            box.click()
    page.locator("#compare-base").get_by_label("also without LoRAs").uncheck()
    page.click("#compare")
    page.wait_for_function("document.querySelector('#compare-progress').innerText.startsWith('Compared 2')")
    runs = page.evaluate("Array.from(document.querySelectorAll('#compare-table [role=row]')).map(r => r.innerText)")
    assert [row.split("\n")[0] for row in runs[1:]] == ["merge (no regions)", "regional"], runs
    page.locator("#compare-gallery .thumbnail-item").nth(1).click()
    page.locator("#compare-region-masks img").first.wait_for()
    assert "random-style" in page.locator("#compare-region-masks-legend").inner_text()
    page.locator("#compare-gallery .thumbnail-item").nth(0).click()  # merge used no regions: nothing to show
    page.locator("#compare-region-masks").wait_for(state="hidden")


def test_restore_fills_the_region_controls_back(page, server, tmp_path):  # noqa: F811
    callbacks = server["callbacks"]
    mask = np.zeros((256, 256), np.uint8)
    mask[32:224, 150:240] = 255
    saved_mask = regions.save_mask(mask, callbacks.masks_dir)  # a mask the app drew earlier
    library = callbacks.library
    result = callbacks.studio.compose(
        "a zorb and a garden", [Lora(library.path("random-subject.safetensors"), region="left", prompt="a big zorb"),
                                Lora(library.path("styles/random-style.safetensors"), region=str(saved_mask))],
        "regional", strategy_params={"feather": 1.0}, seed=9, steps=3)
    (png,) = result.save(tmp_path)
    page.get_by_role("tab", name="Restore").click()
    page.set_input_files("#restore-file input[type=file]", str(png))
    page.wait_for_function("document.querySelector('#restore-status').innerText.includes('Restored')")
    page.wait_for_function("document.querySelectorAll('.stack-row').length == 2")
    rows = page.locator(".stack-row")
    assert page.locator("#strategy input").input_value() == "regional"
    assert rows.nth(0).locator(".stack-region input").input_value() == "left"
    assert rows.nth(0).locator(".stack-region-prompt textarea, .stack-region-prompt input").first.input_value() == \
        "a big zorb"
    assert rows.nth(1).locator(".stack-region input").input_value() == "mask: draw or upload"
    rows.nth(1).locator(".stack-canvas").wait_for(state="visible", timeout=15_000)
    # the preview is back, with the feathered masks the render used
    page.wait_for_function("document.querySelector('#region-legend').innerText.includes('random-style')")
    page.locator("#region-preview img").first.wait_for()
    preview = image_at(page, page.locator("#region-preview img").first)
    expected = region_overlay.overlay(region_overlay.plain_canvas(64, 64), list(result.region_masks.items()))
    assert np.array_equal(np.asarray(preview), np.asarray(expected))
    screenshot(page, "regions-restored")
    # the restored canvas shows the saved mask; a new stroke adds to it (on the left, where it was empty)
    canvas_area = rows.nth(1).locator(".stack-canvas")
    canvas_area.locator("button[aria-label='Brush']").first.click()
    paint(page, canvas_area.locator("canvas").first, 0.15, 0.3, 0.2, 0.7)
    page.wait_for_function("document.querySelector('#stack-status').innerText.includes('drawn mask set')")
    page.get_by_role("tab", name="Generate").click()
    page.click("#generate")
    page.wait_for_function("document.querySelector('#progress').innerText.startsWith('Done')")
    recipe = Recipe.from_png(download_png(page, tmp_path / "again.png"))
    union = np.asarray(Image.open(recipe.loras[1].region).convert("L"))
    assert (union[32:224, 150:240] == 255).all()  # the restored mask is kept
    assert union[:, :100].sum() > 0 and union[:, 100:150].sum() == 0  # and the stroke joined it
    # clearing the canvas detaches the mask: the render is refused until a region is painted again
    canvas_area.locator("button[aria-label='Clear canvas']").first.click()
    page.wait_for_function("document.querySelector('#stack-status').innerText.includes('nothing is drawn yet')")
    page.click("#generate")
    page.get_by_text("none is drawn yet").first.wait_for()
