"""Take the README's web-app screenshot (``assets/screenshots/ui.png``) on the tiny world, in headless Chromium.

    python benchmarks/readme_screenshot.py [--out assets/screenshots/ui.png] [--chromium /usr/bin/chromium]

Runs ``studio ui`` on ``tiny-sdxl`` with the shipped tiny-sdxl LoRAs (a relative library path, so no machine's
folder shows), stacks the zorb and striped LoRAs, renders the README's two-LoRA example with ``merge`` at 1280 px
wide, and saves a screenshot of the page.

With ``--regions`` (default out ``assets/screenshots/ui-regions.png``) it takes the regions picture instead: the zorb
and quix subject LoRAs, the zorb on the preset region ``left`` and the quix on a mask painted with the mouse on its
row's canvas, each with a region prompt; the app switches to ``regional``; it renders and saves the stack, the
region preview and the masks the render used (the middle and right columns).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# the world's subject LoRAs are bound to class words (studio.world.concepts.CLASS_WORDS): "circle" calls the zorb,
# "square" the quix
PROMPT = "a large blue circle, striped, on a light background, center"
# the world's two-object grammar (studio.world.concepts.pair_caption) and its one-object region prompts
PAIR_PROMPT = "a small red circle, solid, on a light background, left, and a small blue square, solid, right"
REGION_PROMPTS = ("a small red circle, solid, on a light background, left",
                  "a small blue square, solid, on a light background, right")


def regions_page(page, seed: int):
    """Stack zorb (region left) and quix (a painted mask on the right), render with regional; returns the clip."""
    for name in ("subject-zorb", "subject-quix"):
        page.locator(".lora-card", has_text=name).get_by_role("button", name="Add to stack").click()
    page.wait_for_function("document.querySelectorAll('.stack-row').length == 2")
    page.locator("#prompt textarea").fill(PAIR_PROMPT)
    rows = page.locator(".stack-row")
    for i, (label, text) in enumerate(zip(("left", "mask: draw or upload"), REGION_PROMPTS)):
        rows.nth(i).locator(".stack-region input").click()
        page.get_by_role("option", name=label, exact=True).click()
        prompt = rows.nth(i).locator(".stack-region-prompt textarea, .stack-region-prompt input").first
        prompt.fill(text)
        prompt.press("Tab")
    canvas = rows.nth(1).locator(".stack-canvas")
    canvas.locator("button[aria-label='Brush']").first.click()
    box = canvas.locator("canvas").first.bounding_box()
    side = min(box["width"], box["height"]) * 0.8
    left, top = box["x"] + (box["width"] - side) / 2, box["y"] + (box["height"] - side) / 2
    for x in (0.62, 0.72, 0.82):  # three vertical strokes: a blob on the right half
        page.mouse.move(left + x * side, top + 0.25 * side)
        page.mouse.down()
        for k in range(1, 16):
            page.mouse.move(left + x * side, top + (0.25 + 0.5 * k / 15) * side)
        page.mouse.up()
    # each stroke reaches the server after the canvas uploads its layers (seconds on a busy machine): wait until the
    # status line has not changed for 3 s, so the render uses the whole drawing
    page.wait_for_function("document.querySelector('#stack-status').innerText.includes('drawn mask set')")
    last = None
    while (now := page.locator("#stack-status").inner_text()) != last:
        last = now
        page.wait_for_timeout(3000)
    seed_box = page.locator("#seed input[type=number]")
    seed_box.fill(str(seed))
    seed_box.press("Enter")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#progress').innerText.startsWith('Done')")
    page.locator("#region-masks img").first.wait_for()
    page.wait_for_timeout(500)
    top_y = min(rows.nth(0).bounding_box()["y"] - 40, page.locator("#generate").bounding_box()["y"] - 8)
    legend = page.locator("#region-legend").bounding_box()
    x0 = rows.nth(0).bounding_box()["x"] - 8
    return {"x": x0, "y": top_y, "width": 1280 - x0, "height": legend["y"] + legend["height"] + 8 - top_y}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="default assets/screenshots/ui.png (ui-regions.png)")
    ap.add_argument("--regions", action="store_true", help="the regions picture (see the module docstring)")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    args.out = args.out or ROOT / "assets" / "screenshots" / ("ui-regions.png" if args.regions else "ui.png")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    sys.path.insert(0, str(ROOT / "tests"))
    from playwright.sync_api import sync_playwright

    from ui.app import launch, make_app
    from ui_support import free_port

    os.chdir(ROOT)
    with tempfile.TemporaryDirectory() as tmp:
        demo, callbacks = make_app("tiny-sdxl", ["assets/loras/tiny-sdxl"], out_dir=tmp, scorer=None)
        port = free_port()
        launch(demo, callbacks, port=port, block=False, quiet=True)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=args.chromium,
                                            args=["--headless", "--no-sandbox", "--disable-gpu"])
                page = browser.new_page(viewport={"width": 1280, "height": 800})
                page.set_default_timeout(120_000)
                page.goto(f"http://127.0.0.1:{port}")
                page.wait_for_selector(".lora-card")
                if args.regions:
                    clip = regions_page(page, args.seed)
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    page.screenshot(path=str(args.out), full_page=True, clip=clip)
                    browser.close()
                    return print(args.out)
                for name in ("subject-zorb", "style-striped"):
                    page.locator(".lora-card", has_text=name).get_by_role("button", name="Add to stack").click()
                page.wait_for_function("document.querySelectorAll('.stack-row').length == 2")
                page.locator("#prompt textarea").fill(PROMPT)
                seed = page.locator("#seed input[type=number]")
                seed.fill(str(args.seed))
                seed.press("Enter")
                page.click("#generate")
                page.wait_for_function("document.querySelector('#progress').innerText.startsWith('Done')")
                page.locator("#gallery img").first.wait_for()
                page.evaluate("document.querySelector('#library-panel').scrollTop = 0")
                page.wait_for_timeout(500)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.out), full_page=False)
                browser.close()
        finally:
            demo.close(verbose=False)
    print(args.out)


if __name__ == "__main__":
    main()
