"""Take the README's web-app screenshot (``assets/screenshots/ui.png``) on the tiny world, in headless Chromium.

    python benchmarks/readme_screenshot.py [--out assets/screenshots/ui.png] [--chromium /usr/bin/chromium]

Runs ``studio ui`` on ``tiny-sdxl`` with the shipped tiny-sdxl LoRAs (a relative library path, so no machine's
folder shows), stacks the zorb and striped LoRAs, renders the README's two-LoRA example with ``merge`` at 1280 px
wide, and saves a screenshot of the page.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a large blue zorb, striped, on a light background, center"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "assets" / "screenshots" / "ui.png")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
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
