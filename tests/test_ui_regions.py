"""Regions in the web app's callbacks (``ui.regions``, ``ui.callbacks``, ``ui.handlers``), without a browser, on the
tiny SDXL model: region controls -> ``Lora(region=..., prompt=...)``, drawn and uploaded masks, the overlay before
rendering against the masks the render used, Compare with a region stack, and the recipe round trip.

References are independent of the app: hand-made boxes and block-averaged masks computed with numpy, and images
rendered directly through the public API with ``Lora(region=...)``.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image

import tomli_w

from pipelines.errors import StudioError
from studio import Lora, Recipe
from test_ui_callbacks import STYLE, SUBJECT, cb, h, no_progress, pixels, studio  # noqa: F401 (fixtures)
from ui import region_overlay, regions
from ui import stack as stk
from ui.callbacks import Settings
from ui.recipe_api import render_recipe

SETTINGS = dict(prompt="a zorb and a garden", seed=3, steps=2, width=64, height=64)
GRID = 32  # the tiny SDXL model's latent grid at 64x64 (its VAE downsamples by 2)


def two(cb):
    stack, rev, _ = cb.add(SUBJECT, [], 0)
    stack, _, _ = cb.add(STYLE, stack, rev)
    return stack


def painted(rows: slice, cols: slice, side: int = 256) -> dict:
    """An ImageEditor value with one layer painted (alpha 255) over ``rows`` x ``cols`` of a ``side``² canvas."""
    layer = np.zeros((side, side, 4), np.uint8)
    layer[rows, cols] = (230, 25, 75, 255)
    return {"background": np.full((side, side, 4), 255, np.uint8), "layers": [layer], "composite": None}


def with_regions(cb, box="0.5,0.25,1,0.75"):
    """Subject: preset ``left`` with a region prompt; style: a box."""
    stack = two(cb)
    stack = cb.set_field(stack, stack[0].uid, "region_kind", "left")
    stack = cb.set_field(stack, stack[0].uid, "region_prompt", "  a big zorb ")
    stack = cb.set_field(stack, stack[1].uid, "region_kind", "box")
    return cb.set_field(stack, stack[1].uid, "region_box", box)


def adapter_name(label: str) -> str:
    """The studio names a file loaded again from another folder (each test has its own library) ``name#k``."""
    return label.split("#")[0]


def api_loras(cb, style_region="0.5,0.25,1,0.75"):
    return [Lora(cb.library.path(SUBJECT), region="left", prompt="a big zorb"),
            Lora(cb.library.path(STYLE), region=style_region)]


# ---------------------------------------------------------------------------------------------- controls -> Lora
def test_region_controls_become_the_loras_regions(cb):
    stack = two(cb)
    stack = cb.set_field(stack, stack[1].uid, "region_kind", "box")
    with pytest.raises(StudioError, match="random-style: type the region's box"):
        stk.to_loras(stack, cb.library)
    stack = with_regions(cb)
    loras = stk.to_loras(stack, cb.library)
    assert [(lora.region, lora.prompt) for lora in loras] == [("left", "a big zorb"), ("0.5,0.25,1,0.75", None)]
    assert [(lora.region, lora.prompt) for lora in stk.to_loras(stack, cb.library, regions=False)] == [(None, None)] * 2
    # a region on a strategy that cannot read regions switches it to regional, and says so
    strategy, note = cb.region_strategy(stack, "merge")
    assert strategy == "regional" and "switched from merge to regional" in note
    assert cb.region_strategy(stack, "regional") == ("regional", "")
    plain = [stk.update(stack, e.uid, region_kind="none", region_prompt="") for e in stack][-1]
    plain = stk.update(plain, plain[0].uid, region_kind="none", region_prompt="")
    assert cb.region_strategy(plain, "merge") == ("merge", "")
    # a disabled entry's region does not count
    off = stk.update(stk.update(stack, stack[0].uid, enabled=False), stack[1].uid, enabled=False)
    assert cb.region_strategy(off, "merge") == ("merge", "")


def test_region_handlers_show_the_right_fields_and_switch_the_strategy(cb, h):
    stack = two(cb)
    uid = stack[0].uid
    stack, box, mask_area, strategy, status = h.set_region_kind(uid, stack, "box", "merge")
    assert box["visible"] is True and mask_area["visible"] is False
    assert strategy == "regional" and "switched from merge to regional" in status
    stack, box, mask_area, strategy, status = h.set_region_kind(uid, stack, "mask", "regional")
    assert box["visible"] is False and mask_area["visible"] is True and not isinstance(strategy, str)
    with pytest.raises(gr.Error, match="unknown region"):
        h.set_region_kind(uid, stack, "../../etc/passwd", "regional")


@pytest.mark.parametrize("box, message", [
    ("0.5,0,1.2,1", "outside the image"), ("0.6,0,0.4,1", "is empty"), ("0,0,1,1", "covers the whole image"),
    ("-0.1,0,0.5,1", "outside the image"), ("nan,0,1,1", "finite"), ("left", "four fractions"),
    ("/etc/passwd", "four fractions"),
])
def test_bad_boxes_are_refused_and_nothing_is_attached(cb, h, box, message):
    stack = two(cb)
    stack = cb.set_field(stack, stack[1].uid, "region_kind", "box")
    with pytest.raises(gr.Error, match=message) as error:
        h.set_region_text(stack[1].uid, "region_box", stack, box, "regional")
    assert "random-style" in str(error.value)
    assert stack[1].region_box == ""  # the state Gradio keeps is the one passed in: unchanged


# ---------------------------------------------------------------------------------------------- masks
def test_a_drawn_mask_becomes_the_loras_region(cb, studio):
    stack = two(cb)
    uid = stack[1].uid
    stack = cb.set_field(stack, uid, "region_kind", "mask")
    with pytest.raises(StudioError, match="none is drawn yet"):
        stk.to_loras(stack, cb.library)
    assert cb.set_region_mask(stack, uid, {"background": None, "layers": [], "composite": None}) == (stack, "")
    stack, note = cb.set_region_mask(stack, uid, painted(slice(64, 192), slice(160, 256)))
    assert note == "random-style: drawn mask set (19% of the image)."
    path = Path(stack[1].region_mask)
    assert path.parent == cb.masks_dir and regions.MASK_NAME.fullmatch(path.name)
    alpha = np.zeros((256, 256), np.uint8)
    alpha[64:192, 160:256] = 255
    assert np.array_equal(np.asarray(Image.open(path)), alpha)
    assert stk.to_loras(stack, cb.library)[1].region == str(path)
    # the same drawing again is no edit; the canvas showing the saved mask gives the same mask back
    assert cb.set_region_mask(stack, uid, painted(slice(64, 192), slice(160, 256))) == (stack, "")
    assert cb.set_region_mask(stack, uid, regions.editor_value(str(path), (256, 256))) == (stack, "")
    # a stroke on the canvas showing the saved mask adds to it
    shown = regions.editor_value(str(path), (256, 256))
    shown["layers"] = [painted(slice(0, 32), slice(0, 32))["layers"][0]]
    grown, note = cb.set_region_mask(stack, uid, shown)
    union = alpha.copy()
    union[:32, :32] = 255
    assert np.array_equal(np.asarray(Image.open(grown[1].region_mask)), union) and "drawn mask set" in note
    # what the render will use: the painted area averaged over the latent cells (8x8 canvas pixels each)
    ((label, lane),) = region_overlay.planned_masks(studio, ["random-style"], [str(path)], [None], 64, 64)
    expected = alpha.reshape(GRID, 8, GRID, 8).mean(axis=(1, 3)) / 255
    assert label == "random-style" and np.allclose(lane.numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("layer, message", [
    (painted(slice(0, 0), slice(0, 0)), "drawn mask is empty"),
    (painted(slice(0, 256), slice(0, 256)), "covers the whole image"),
])
def test_empty_or_full_drawings_detach_the_mask(cb, layer, message):
    stack = two(cb)
    uid = stack[1].uid
    stack, _ = cb.set_region_mask(cb.set_field(stack, uid, "region_kind", "mask"), uid,
                                  painted(slice(0, 100), slice(0, 100)))
    stack, note = cb.set_region_mask(stack, uid, layer)
    assert message in note and stack[1].region_mask == ""
    with pytest.raises(StudioError, match="none is drawn yet"):  # no render with a stale or unusable mask
        stk.to_loras(stack, cb.library)


def test_crafted_canvas_values_are_refused(cb, h):
    stack = two(cb)
    uid = stack[1].uid
    huge = np.broadcast_to(np.zeros((1, 1, 4), np.uint8), (4100, 4100, 4))  # a view: no memory
    wide = {"background": None, "layers": [huge], "composite": None}
    uneven = {"background": None, "layers": [np.zeros((8, 8, 4), np.uint8), np.zeros((9, 8, 4), np.uint8)]}
    for value, message in ((wide, "at most 16.8 megapixels"), (uneven, "different sizes")):
        with pytest.raises(gr.Error, match=message):
            h.set_region_mask(uid, stack, value, "regional")
    assert not cb.masks_dir.exists() or not list(cb.masks_dir.iterdir())


def _png_header_only(path: Path, width: int, height: int) -> Path:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IEND", b""))
    return path


def test_mask_uploads_are_checked_before_anything_is_attached(cb, h, tmp_path):
    stack = two(cb)
    uid = stack[1].uid
    text = tmp_path / "mask.png"
    text.write_text("not an image")
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (regions.MAX_MASK_BYTES + 1))
    black = tmp_path / "black.png"
    Image.new("L", (40, 40)).save(black)
    cases = [(text, "mask.png is not a readable image"), (big, "a mask may have at most 20 MB"),
             (_png_header_only(tmp_path / "wide.png", 5000, 5000), "larger than 16.8 megapixels.*5000x5000"),
             (_png_header_only(tmp_path / "bomb.png", 100_000, 100_000), "larger than 16.8 megapixels"),
             (black, "mask black.png is empty"), (tmp_path / "gone.png", "did not arrive")]
    for path, message in cases:
        with pytest.raises(gr.Error, match=message):
            h.upload_region_mask(uid, stack, str(path), (64, 64), "merge")
    assert not cb.masks_dir.exists() or not list(cb.masks_dir.iterdir())
    good = tmp_path / "right.png"
    Image.fromarray(np.repeat(np.array([[0] * 64 + [255] * 64], np.uint8), 32, axis=0)).save(good)  # 128x32
    new_stack, canvas, strategy, status = h.upload_region_mask(uid, stack, str(good), (64, 64), "merge")
    assert new_stack[1].region_kind == "mask" and strategy == "regional"
    status = status.replace("\\", "")  # markdown escapes
    assert "right.png (128x32) resized to the canvas (256x256)" in status and "switched" in status
    saved = np.asarray(Image.open(new_stack[1].region_mask))
    assert saved.shape == (256, 256) and (saved[:, :128] == 0).all() and (saved[:, 128:] == 255).all()
    assert np.array_equal(255 - canvas["background"][..., 1], saved)  # the canvas shows it, ready to edit
    assert canvas["layers"] == [] and (canvas["background"][..., 0] == 255).all()


# ---------------------------------------------------------------------------------------------- preview vs render
def test_the_preview_shows_exactly_what_the_render_uses(cb, studio):
    stack = with_regions(cb)
    params = {"regional": {"feather": 2.0}}
    image, legend = cb.region_preview(stack, 64, 64, "regional", params)
    assert "**red**: random\\-subject" in legend and "**blue**: random\\-style" in legend
    events = list(cb.generate_events(Settings(**SETTINGS), "regional", params, stack))
    (item,) = events[-1]
    reference = studio.compose(SETTINGS["prompt"], api_loras(cb), "regional", strategy_params={"feather": 2.0},
                               seed=3, steps=2, width=64, height=64)
    assert np.array_equal(pixels(item.png), pixels(reference.image))
    planned = region_overlay.planned_masks(studio, ["random-subject", "random-style"], ["left", "0.5,0.25,1,0.75"],
                                    ["a big zorb", None], 64, 64, {"feather": 2.0})
    assert [label for label, _ in planned] == ["random-subject", "random-style"]
    assert [adapter_name(label) for label in reference.region_masks] == ["random-subject", "random-style"]
    for (_, mask), used in zip(planned, reference.region_masks.values()):
        assert torch.equal(mask, used)
    assert np.array_equal(np.asarray(image), np.asarray(region_overlay.overlay(region_overlay.plain_canvas(64, 64), planned)))
    assert np.array_equal(np.asarray(item.masks),
                          np.asarray(region_overlay.overlay(reference.image, list(reference.region_masks.items()))))
    assert "random\\-style" in item.masks_legend


def test_hard_boxes_in_the_preview_against_hand_made_masks(cb):
    image, _ = cb.region_preview(with_regions(cb), 64, 64, "regional", {})
    left = np.zeros((GRID, GRID))
    left[:, :16] = 1
    box = np.zeros((GRID, GRID))
    box[8:24, 16:] = 1
    planned = region_overlay.planned_masks(cb.studio, ["a", "b"], ["left", "0.5,0.25,1,0.75"], [None, None], 64, 64)
    assert np.array_equal(planned[0][1].numpy(), left) and np.array_equal(planned[1][1].numpy(), box)
    rgb = np.asarray(image).astype(int)  # 256x256: 8 display pixels per latent cell
    red, blue = region_overlay.COLOURS[0][1], region_overlay.COLOURS[1][1]
    for (y, x), colour in (((40, 40), red), ((80, 220), blue)):  # away from the labels
        assert np.abs(rgb[y, x] - np.array(colour)).max() < 0.45 * 255, (y, x, rgb[y, x])
        assert rgb[y, x].argmax() == int(np.argmax(colour))
    canvas = np.asarray(region_overlay.plain_canvas(64, 64)).astype(int)
    assert np.array_equal(rgb[20, 220], canvas[20, 220])  # outside both regions: the image area, untouched
    assert cb.region_preview(two(cb), 64, 64, "merge", {}) == (None, "")  # no regions: nothing shown


def test_the_preview_reports_a_region_that_is_not_ready(cb):
    stack = two(cb)
    stack = cb.set_field(stack, stack[0].uid, "region_kind", "mask")
    stack = cb.set_field(stack, stack[1].uid, "region_kind", "right")
    image, legend = cb.region_preview(stack, 64, 64, "regional", {})
    assert image is not None and "none is drawn yet" in legend and "random\\-style" in legend


# ---------------------------------------------------------------------------------------------- compare
def test_compare_runs_strategies_without_regions_on_the_plain_stack(cb, h):
    stack = with_regions(cb)
    outputs = list(h.compare(["regional", "merge"], False, SETTINGS["prompt"], "", 3, 2, 5.0, 64, 64, {}, stack,
                             progress=no_progress))
    _, items, rows, *_ = outputs[-1]
    assert [row[0] for row in rows] == ["regional", "merge (no regions)"]
    regional, merge = items
    assert regional.masks is not None and merge.masks is None
    assert all(lora.region is None for lora in Recipe.from_png(merge.png).loras)
    plain = cb.studio.compose(SETTINGS["prompt"], [cb.library.path(SUBJECT), cb.library.path(STYLE)], "merge",
                              seed=3, steps=2, width=64, height=64)
    assert np.array_equal(pixels(merge.png), pixels(plain.image))


# ---------------------------------------------------------------------------------------------- recipes
def test_regions_round_trip_through_png_and_toml_recipes(cb, h):
    stack = with_regions(cb)
    uid = stack[1].uid
    stack = cb.set_field(stack, uid, "region_kind", "mask")
    stack, _ = cb.set_region_mask(stack, uid, painted(slice(32, 224), slice(128, 256)))
    (item,) = list(cb.generate_events(Settings(**SETTINGS), "regional", {}, stack))[-1]
    recipe = Recipe.from_png(item.png)
    assert [(lora.region, lora.prompt) for lora in recipe.loras] == [("left", "a big zorb"),
                                                                       (stack[1].region_mask, None)]
    out = h.restore(item.png, {}, "merge", 0, 0)
    strategy, restored, status = out[7], out[10], out[12]
    fields = lambda s: [(e.lora_id, e.region_kind, e.region, e.region_prompt) for e in s]  # noqa: E731
    assert strategy == "regional" and fields(restored) == fields(stack) and "Restored" in status
    (again,) = list(cb.generate_events(Settings(**SETTINGS), strategy, out[8], restored))[-1]
    assert np.array_equal(pixels(again.png), pixels(item.png))
    # the TOML recipe through the app's API endpoint: the same image
    paths, _ = render_recipe(cb, Path(item.toml).read_text())
    assert np.array_equal(pixels(paths[0]), pixels(item.png))


def test_recipe_regions_the_app_cannot_open_are_reported(cb, h, tmp_path):
    outside = tmp_path / "mask-0123456789abcdef.png"  # a hash-like name, but not in the app's masks folder
    Image.new("L", (8, 8), 255).save(outside)
    fields = regions.fields_for(str(outside), cb.masks_dir, "x")
    assert fields.kind == "mask" and fields.mask == "" and "not one of this app's saved masks" in fields.note
    assert regions.fields_for("left-half", cb.masks_dir, "x") == regions.RegionFields(kind="left")
    assert regions.fields_for("0.1,0.2,0.3,0.4", cb.masks_dir, "x") == regions.RegionFields(kind="box",
                                                                                             box="0.1,0.2,0.3,0.4")
    assert regions.fields_for(None, cb.masks_dir, "x") == regions.RegionFields()
    data = Recipe(model=cb.studio.model, prompt="x", strategy="regional", seed=1, steps=2, width=64,
                  height=64).to_dict()
    data["loras"] = [{"source": SUBJECT, "region": "/etc/passwd"}]
    with pytest.raises(StudioError, match="not one of the app's saved masks"):
        render_recipe(cb, tomli_w.dumps(data))
    data["loras"] = [{"source": SUBJECT, "region": "0,0,1.5,1"}]
    with pytest.raises(StudioError, match="outside the image"):
        render_recipe(cb, tomli_w.dumps(data))


def test_auto_regions_are_announced_before_and_shown_after_the_render(cb, studio):
    assert ("auto: from attention", "auto") in regions.kind_choices()  # offered: the studio accepts region=auto
    stack = two(cb)
    stack = cb.set_field(stack, stack[0].uid, "region_kind", "auto")
    stack = cb.set_field(stack, stack[1].uid, "region_kind", "right")
    image, legend = cb.region_preview(stack, 64, 64, "regional", {})
    assert "random\\-subject: auto: its mask comes from the cross\\-attention" in legend
    assert "**red**: random\\-style" in legend and image is not None  # the box is drawn; the auto mask is not known yet
    assert cb.region_preview(stack, 64, 64, "regional", {"regional": {"auto": True}})[0] is None
    settings = dict(SETTINGS, steps=3)
    (item,) = list(cb.generate_events(Settings(**settings), "regional", {}, stack))[-1]
    reference = studio.compose(settings["prompt"], [Lora(cb.library.path(SUBJECT), region="auto"),
                                                    Lora(cb.library.path(STYLE), region="right")],
                               "regional", seed=3, steps=3, width=64, height=64)
    assert np.array_equal(pixels(item.png), pixels(reference.image))
    assert {adapter_name(label) for label in reference.region_masks} == {"random-subject", "random-style"}
    assert np.array_equal(np.asarray(item.masks),
                          np.asarray(region_overlay.overlay(reference.image, list(reference.region_masks.items()))))
    assert "random\\-subject" in item.masks_legend


def test_clora_masks_are_shown_after_the_render(cb, studio):
    """CLoRA finds its masks from attention (no region controls): the app shows them next to the image."""
    settings = dict(SETTINGS, prompt="a zorb, inkwash", steps=3)
    (item,) = list(cb.generate_events(Settings(**settings), "clora", {}, two(cb)))[-1]
    reference = studio.compose(settings["prompt"], [cb.library.path(SUBJECT), cb.library.path(STYLE)], "clora",
                               seed=3, steps=3, width=64, height=64)
    assert np.array_equal(pixels(item.png), pixels(reference.image))
    assert reference.region_masks and item.masks is not None
    assert np.array_equal(np.asarray(item.masks),
                          np.asarray(region_overlay.overlay(reference.image, list(reference.region_masks.items()))))


def test_flux_preview_is_on_the_token_grid_and_matches_the_render(tmp_path):
    """FLUX predicts on 2x2-patch tokens: the preview shows that grid, and the render uses the same masks."""
    from studio import Studio
    from studio.library import Library
    from ui.callbacks import Callbacks
    from ui_support import build_library

    flux = Studio("tiny-flux-random")
    fcb = Callbacks(flux, Library(build_library(tmp_path / "loras")), out_dir=tmp_path / "out")
    stack, _, _ = fcb.add("flux/flux-style.safetensors", [], 0)
    stack = fcb.set_field(stack, stack[0].uid, "region_kind", "left-third")
    image, legend = fcb.region_preview(stack, 64, 64, "regional", {})
    scale = int(flux.pipe.vae_scale_factor) * 2
    grid = 64 // scale
    assert f"{grid}x{grid} grid" in legend
    (item,) = list(fcb.generate_events(Settings(**SETTINGS), "regional", {}, stack))[-1]
    reference = flux.compose(SETTINGS["prompt"], [Lora(fcb.library.path("flux/flux-style.safetensors"),
                                                       region="left-third")], "regional", seed=3, steps=2,
                             guidance=5.0, width=64, height=64)
    assert np.array_equal(pixels(item.png), pixels(reference.image))
    ((_, planned),) = region_overlay.planned_masks(flux, ["flux-style"], ["left-third"], [None], 64, 64)
    ((_, used),) = reference.region_masks.items()
    assert planned.shape == (grid, grid) and torch.equal(planned, used)
    expected = torch.zeros(grid, grid)
    expected[:, :round(grid / 3)] = 1
    assert torch.equal(planned, expected)
