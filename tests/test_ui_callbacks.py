"""The web app's callbacks (``ui.callbacks``, ``ui.handlers``), without a browser, on the tiny SDXL model.

Images made through the app are compared with the same recipe rendered directly through the public API;
CLIPScores shown by Compare are compared with the scorer applied to the saved PNGs.
"""

from __future__ import annotations

import threading
import time

import gradio as gr
import numpy as np
import pytest
import tomli_w
from PIL import Image, PngImagePlugin

from fusion import REGISTRY, Param, Strategy, register
from pipelines.errors import LoraFileError, StudioError
from studio import Lora, Recipe, Studio
from studio.library import Library
from ui import stack as stk
from ui import strategy_form
from ui.callbacks import ALL_BASES, FITS, NO_LORAS, Callbacks, Finished, Item, Preview, Progress, Settings
from ui.handlers import Handlers, card_markdown, md_escape
from ui_support import TinyClipScorer, build_library

SUBJECT, STYLE, FLUX = "random-subject.safetensors", "styles/random-style.safetensors", "flux/flux-style.safetensors"


def no_progress(*args, **kwargs):
    pass


@pytest.fixture(scope="module")
def studio():
    return Studio("tiny-sdxl-random")


@pytest.fixture()
def cb(studio, tmp_path):
    library = Library(build_library(tmp_path / "loras"))
    return Callbacks(studio, library, out_dir=tmp_path / "out", scorer=TinyClipScorer(), preview_every=2,
                     max_upload_bytes=10**7)


@pytest.fixture()
def h(cb):
    return Handlers(cb)


def two_loras(cb):
    stack, rev, _ = cb.add(SUBJECT, [], 0)
    stack, rev, _ = cb.add(STYLE, stack, rev)
    stack = cb.set_field(stack, stack[1].uid, "weight", 0.8)
    stack = cb.set_field(stack, stack[1].uid, "start", 0.25)
    stack = cb.set_field(stack, stack[1].uid, "preset", "style: outer blocks")
    return stack


def pixels(image_or_path):
    image = image_or_path if isinstance(image_or_path, Image.Image) else Image.open(image_or_path)
    return np.asarray(image.convert("RGB"))


# ---------------------------------------------------------------------------------------------- library
def test_library_view_hides_loras_for_other_bases(cb):
    entries, total = cb.library_view("", FITS)
    assert sorted(e.id for e in entries) == [SUBJECT, STYLE] and total == 2
    assert sorted(e.id for e in cb.library_view("", ALL_BASES)[0]) == [FLUX, SUBJECT, STYLE]
    assert [e.id for e in cb.library_view("", "FLUX.1")[0]] == [FLUX]
    assert [e.id for e in cb.library_view("inkwash", FITS)[0]] == [STYLE]
    assert cb.base_filters() == [FITS, ALL_BASES, "FLUX.1", "SDXL"]
    assert cb.thumbnail(cb.library.get(SUBJECT)).size == (96, 96)
    assert cb.thumbnail(cb.library.get(STYLE)) is None


def test_card_text_is_escaped():
    assert md_escape("<img src=x onerror=alert(1)>*x*") == r"&lt;img src=x onerror=alert\(1\)&gt;\*x\*"


def test_card_shows_name_base_format_rank_and_triggers(cb):
    text = card_markdown(cb.library.get(STYLE))
    assert "random\\-style" in text and "SDXL · kohya · rank 4" in text and "*inkwash*" in text


# ---------------------------------------------------------------------------------------------- stack
def test_add_and_insert_trigger_words(cb):
    stack, rev, message = cb.add(SUBJECT, [], 0)
    assert [s.lora_id for s in stack] == [SUBJECT] and rev == 1 and message == f"Added {SUBJECT}."
    assert cb.insert_triggers(SUBJECT, "a cat,") == "a cat, zorb"
    assert cb.insert_triggers(SUBJECT, "a Zorb cat") == "a Zorb cat"
    assert cb.insert_triggers(STYLE, "") == "inkwash"


@pytest.mark.parametrize("crafted", ["../../etc/passwd", "/etc/passwd", "../loras/random-subject.safetensors",
                                     "random-subject", "styles/../random-subject.safetensors"])
def test_crafted_names_are_refused(cb, h, crafted):
    with pytest.raises(LoraFileError, match="is not a LoRA of the library"):
        cb.add(crafted, [], 0)
    with pytest.raises(gr.Error, match="is not a LoRA of the library"):
        h.add(crafted, [], 0)
    with pytest.raises(LoraFileError, match="is not a LoRA of the library"):
        cb.insert_triggers(crafted, "")


def test_add_refuses_other_bases_and_duplicates(cb):
    with pytest.raises(StudioError, match="made for FLUX.1; the loaded model is SDXL"):
        cb.add(FLUX, [], 0)
    stack, rev, _ = cb.add(SUBJECT, [], 0)
    with pytest.raises(StudioError, match="already in the stack"):
        cb.add(SUBJECT, stack, rev)


def test_stack_edits(cb, h):
    stack = two_loras(cb)
    assert (stack[1].weight, stack[1].start, stack[1].blocks) == (0.8, 0.25, "style: outer blocks")
    with pytest.raises(StudioError, match="0 <= start < end <= 1"):
        cb.set_field(stack, stack[1].uid, "end", 0.2)
    with pytest.raises(StudioError, match="block 'middle' does not exist"):
        cb.set_field(stack, stack[0].uid, "custom_blocks", "middle=0")
    with pytest.raises(StudioError, match="unknown block preset"):
        cb.set_field(stack, stack[0].uid, "preset", "no such preset")
    stack, show = h.set_preset(stack[0].uid, stack, "custom")
    assert show["visible"] is True
    stack = h.set_field(stack[0].uid, "custom_blocks", stack, "down=0, mid=0.5")
    assert stack[0].blocks == "down=0, mid=0.5"
    stack = h.set_field(stack[0].uid, "enabled", stack, False)
    assert [lora.source.name for lora in stk.to_loras(stack, cb.library)] == ["random-style.safetensors"]
    moved, rev = h.move(stack[1].uid, -1, stack, 3)
    assert [s.lora_id for s in moved] == [STYLE, SUBJECT] and rev == 4
    assert [s.lora_id for s in h.move(moved[0].uid, -1, moved, 0)[0]] == [STYLE, SUBJECT]  # already first
    removed, _ = h.remove(moved[0].uid, moved, 4)
    assert [s.lora_id for s in removed] == [SUBJECT]
    with pytest.raises(gr.Error, match="no longer in the stack"):
        h.remove(moved[0].uid, removed, 5)


def test_refresh_reports_unreadable_files(cb, h):
    (cb.library.roots[0] / "broken.safetensors").write_bytes(b"\x00" * 16)
    (cb.library.roots[0] / "styles" / "new.safetensors").write_bytes(cb.library.get(SUBJECT).path.read_bytes())
    rev, message, filters = h.refresh(0)
    assert rev == 1 and "styles/new.safetensors" in cb.library
    assert message.startswith("4 LoRA\\(s\\) in the library\\. Skipped 1 unreadable file") and "broken" in message


def test_block_presets_come_from_the_model_family(cb, studio):
    presets = cb.block_presets()
    assert set(presets) == set(studio.family.block_presets) | {"custom"} and presets[0] == "all"
    assert cb.block_names() == studio.family.block_names(studio.pipe)


# ---------------------------------------------------------------------------------------------- strategy
class _Knobs(Strategy):
    """A throwaway strategy with one parameter of every kind, to check the generated controls."""

    name = "test-knobs"
    summary = "test only"
    params = (Param("ratio", 0.3, "a bounded float", float, 0.0, 1.0),
              Param("scale", 2.0, "an unbounded float", float, 0.0),
              Param("every", 2, "a bounded int", int, 1, 10),
              Param("seed", 7, "a wide int", int, 0, 10**9),
              Param("flag", False, "a bool", bool),
              Param("mode", "mean", "a choice", str, choices=("mean", "max")))

    def plan(self, ctx):  # pragma: no cover - never rendered
        raise NotImplementedError


@pytest.fixture()
def knobs():
    register(_Knobs)
    yield _Knobs
    REGISTRY.pop(_Knobs.name)


def test_strategy_controls_are_generated_from_declared_params(knobs):
    assert strategy_form.strategy_names() == list(REGISTRY) and "test-knobs" in strategy_form.strategy_names()
    with gr.Blocks():
        controls = {p.name: strategy_form.control(p, p.default) for p in strategy_form.params_of("test-knobs")}
    kinds = {name: type(c).__name__ for name, c in controls.items()}
    assert kinds == {"ratio": "Slider", "scale": "Number", "every": "Slider", "seed": "Number", "flag": "Checkbox",
                     "mode": "Dropdown"}
    assert (controls["ratio"].minimum, controls["ratio"].maximum, controls["ratio"].value) == (0.0, 1.0, 0.3)
    assert controls["every"].step == 1 and controls["mode"].choices == [("mean", "mean"), ("max", "max")]
    assert controls["ratio"].info == "a bounded float"


def test_every_registered_strategy_gets_its_controls():
    for name in strategy_form.strategy_names():
        declared = strategy_form.params_of(name)
        with gr.Blocks():
            controls = [strategy_form.control(p, p.default) for p in declared]
        assert [c.label for c in controls] == [p.name for p in declared]
        assert strategy_form.values_for(name, {}) == {p.name: p.default for p in declared}


def test_param_edits_are_validated_and_kept_per_strategy(cb, h, knobs):
    store = cb.set_param({}, "test-knobs", "every", 4.0)
    store = cb.set_param(store, "switch", "tau", 2)
    assert store == {"test-knobs": {"every": 4}, "switch": {"tau": 2}}
    assert strategy_form.values_for("test-knobs", store)["every"] == 4
    with pytest.raises(gr.Error, match="must be &lt;= 10"):  # HTML-escaped: Gradio renders toasts as HTML
        h.set_param("test-knobs", "every", store, 11)
    with pytest.raises(gr.Error, match="must be one of"):
        h.set_param("test-knobs", "mode", store, "median")
    with pytest.raises(gr.Error, match="has no parameter 'nope'"):
        h.set_param("switch", "nope", store, 1)


# ---------------------------------------------------------------------------------------------- generate
def test_generate_equals_the_api_and_streams_progress_and_previews(cb, studio):
    stack = two_loras(cb)
    settings = Settings(prompt="a zorb, inkwash", negative_prompt="blurry", seed=5, steps=4, guidance=5.0,
                        width=64, height=64, count=2)
    events = list(cb.generate_events(settings, "switch", {"switch": {"tau": 2}}, stack))
    progress = [e for e in events if isinstance(e, Progress)]
    assert [(p.image, p.step) for p in progress] == [(i, s) for i in range(2) for s in range(1, 5)]
    assert len([e for e in events if isinstance(e, Preview)]) == 4  # steps 2 and 4 of both images
    assert len([e for e in events if isinstance(e, Finished)]) == 2
    items = events[-1]
    assert [type(i) for i in items] == [Item, Item]
    reference = studio.compose(
        "a zorb, inkwash",
        [Lora(cb.library.path(SUBJECT)),
         Lora(cb.library.path(STYLE), weight=0.8, start=0.25, blocks="style: outer blocks")],
        "switch", strategy_params={"tau": 2}, negative_prompt="blurry", seed=5, steps=4, width=64, height=64, count=2)
    for item, image, recipe in zip(items, reference.images, reference.recipes):
        assert np.array_equal(pixels(item.png), pixels(image))
        saved = Recipe.from_png(item.png)
        assert saved == recipe == Recipe.from_toml(item.recipe)
        assert Recipe.load(item.toml) == recipe
    assert [lora.source for lora in saved.loras] == [str(cb.library.path(SUBJECT)), str(cb.library.path(STYLE))]


def test_generate_handler_outputs(cb, h):
    stack = two_loras(cb)
    outputs = list(h.generate("a zorb", "", -1, 3, 5.0, 64, 64, 1, "composite", {}, stack, progress=no_progress))
    live, text, gallery, items, recipe, png, toml, seed = outputs[-1]
    assert 0 <= seed < 2**32 and text.startswith(f"Done: 1 image(s), seed {seed}")
    assert gallery == [(items[0].png, items[0].caption)] and items[0].caption.startswith("composite · seed")
    assert Recipe.from_png(png["value"]).seed == seed and Recipe.from_toml(recipe).strategy == "composite"
    assert toml["value"].endswith(".toml") and png["interactive"] is True
    assert any(isinstance(o[0], Image.Image) for o in outputs[:-1])  # live previews came before the end
    recipe_text, png2, toml2 = h.select(items, gr.SelectData(None, {"index": 0, "value": None}))
    assert recipe_text == recipe and png2["value"] == png["value"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=""), "write a prompt first"),
    (dict(steps=0), "steps must be at least 1"),
    (dict(seed=1.5), "seed must be a whole number"),
    (dict(seed=None), "seed must be a whole number, got None"),
    (dict(width=float("nan")), "width must be a whole number"),
    (dict(guidance=None), "guidance must be a number"),
    (dict(guidance=float("inf")), "guidance must be a finite number"),
    (dict(strategy="nope"), "unknown strategy 'nope'"),
    (dict(params={"switch": {"tau": 0}}, strategy="switch"), "'tau' must be &gt;= 1"),
])
def test_generate_errors_are_shown_before_anything_runs(cb, h, kwargs, message):
    args = dict(prompt="a zorb", negative="", seed=0, steps=3, guidance=5.0, width=64, height=64, count=1,
                strategy="merge", params={}, stack=two_loras(cb))
    args.update(kwargs)
    with pytest.raises(gr.Error, match=message):
        list(h.generate(**args, progress=no_progress))
    assert not list(cb.out_dir.iterdir())


def test_sizes_the_model_cannot_render_are_refused(cb, h):
    multiple = cb.studio.pipe.vae_scale_factor
    with pytest.raises(gr.Error, match=f"multiples of {multiple} for this model, got 63x64"):
        list(h.generate("a zorb", "", 0, 2, 5.0, 63, 64, 1, "merge", {}, [], progress=no_progress))


def test_a_lora_deleted_from_the_library_is_refused_at_generate(cb, h):
    stack = two_loras(cb)
    cb.library.path(STYLE).unlink()
    with pytest.raises(gr.Error, match="no longer a file inside the LoRA library"):
        list(h.generate("a zorb", "", 0, 3, 5.0, 64, 64, 1, "merge", {}, stack, progress=no_progress))


def test_stop_cancels_the_job_and_frees_the_gpu(cb):
    stack = two_loras(cb)
    settings = Settings(prompt="a zorb", seed=0, steps=50, width=64, height=64, count=3)
    events = cb.generate_events(settings, "composite", {}, stack)
    assert isinstance(next(events), Progress)
    events.close()  # what Gradio does when the user presses Stop
    deadline = time.monotonic() + 30
    while not cb.gpu.acquire(blocking=False):
        assert time.monotonic() < deadline, "the cancelled job still holds the GPU"
        time.sleep(0.05)
    cb.gpu.release()
    assert not list(cb.out_dir.glob("*.png"))  # aborted at a step boundary: nothing was saved


def test_jobs_run_one_at_a_time(cb):
    stack = two_loras(cb)
    active, peak = [0], [0]
    original = cb.studio.compose

    def counting_compose(*args, **kwargs):
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        try:
            return original(*args, **kwargs)
        finally:
            active[0] -= 1

    cb.studio.compose = counting_compose
    try:
        settings = [Settings(prompt=f"a zorb {i}", seed=i, steps=3, width=64, height=64) for i in range(3)]
        threads = [threading.Thread(target=lambda s=s: list(cb.generate_events(s, "merge", {}, stack)))
                   for s in settings]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        del cb.studio.compose
    assert peak[0] == 1 and len(list(cb.out_dir.glob("*.png"))) == 3


# ---------------------------------------------------------------------------------------------- compare
def test_compare_shows_scores_and_timings(cb, h):
    stack = two_loras(cb)
    outputs = list(h.compare(["merge", "composite"], True, "a zorb, inkwash", "", 9, 3, 5.0, 64, 64, {}, stack,
                             progress=no_progress))
    gallery, items, rows, text, recipe, png, toml = outputs[-1]
    assert [row[0] for row in rows] == [NO_LORAS, "merge", "composite"]
    expected = cb.scorer([Image.open(i.png).convert("RGB") for i in items], ["a zorb, inkwash"] * 3)
    assert [float(row[1]) for row in rows] == pytest.approx(expected, abs=0.006)
    assert all(float(row[2]) > 0 for row in rows)
    recipes = [Recipe.from_png(i.png) for i in items]
    assert [(r.strategy, len(r.loras), r.seed) for r in recipes] == [("merge", 0, 9), ("merge", 2, 9), ("composite", 2, 9)]
    assert not np.array_equal(pixels(items[1].png), pixels(items[2].png))
    assert len(gallery) == 3 and "Compared 3 run(s) at seed 9" in text


def test_compare_without_scorer_shows_na(cb, h):
    cb.scorer = None
    rows = list(h.compare(["merge"], False, "a zorb", "", 0, 2, 5.0, 64, 64, {}, two_loras(cb),
                          progress=no_progress))[-1][2]
    assert rows[0][:2] == ["merge", "n/a"]


def test_compare_needs_a_choice_and_a_stack(h, cb):
    with pytest.raises(gr.Error, match="choose at least one strategy"):
        list(h.compare([], False, "a zorb", "", 0, 2, 5.0, 64, 64, {}, [], progress=no_progress))
    with pytest.raises(gr.Error, match="the stack is empty"):
        list(h.compare(["merge"], False, "a zorb", "", 0, 2, 5.0, 64, 64, {}, [], progress=no_progress))


# ---------------------------------------------------------------------------------------------- restore
def test_restore_a_studio_png(cb, h, studio, tmp_path):
    loras = [Lora(cb.library.path(STYLE), weight=0.6, start=0.1, blocks={"down": 0.5, "mid": 0}),
             Lora(cb.library.path(SUBJECT), weight=1.2, blocks="subject: deep blocks")]
    result = studio.compose("a zorb, inkwash", loras, "switch", strategy_params={"tau": 3}, negative_prompt="ugly",
                            seed=123, steps=3, guidance=4.5)
    (png,) = result.save(tmp_path)
    out = h.restore(str(png), {}, "merge", 0, 0)
    prompt, negative, seed, steps, guidance, width, height, strategy, store, prev, stack, srev, status = out
    assert (prompt, negative, seed, steps, guidance, width, height) == ("a zorb, inkwash", "ugly", 123, 3, 4.5, 64, 64)
    assert strategy == "switch" and store == {"switch": {"tau": 3}} and prev == 1 and srev == 1
    assert [(s.lora_id, s.weight, s.start, s.blocks) for s in stack] == [
        (STYLE, 0.6, 0.1, "down=0.5,mid=0"), (SUBJECT, 1.2, 0.0, "subject: deep blocks")]
    assert "Restored the recipe" in status
    # the restored stack renders the same image again
    items = list(cb.generate_events(Settings(prompt, negative, seed, steps, guidance, width, height), strategy,
                                    store, stack))[-1]
    assert np.array_equal(pixels(items[0].png), pixels(result.image))


def _png_with(tmp_path, name, **chunks):
    info = PngImagePlugin.PngInfo()
    for key, value in chunks.items():
        info.add_itxt(key, value)
    path = tmp_path / name
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def test_restore_never_opens_paths_from_the_png(cb, tmp_path):
    data = Recipe(model="other-model", prompt="x", strategy="nope").to_dict()
    data["loras"] = [{"source": "../../etc/passwd", "name": "passwd"},
                     {"source": "/elsewhere/random-style.safetensors", "name": "random-style", "sha256": "0" * 64}]
    text = tomli_w.dumps(data)
    path = _png_with(tmp_path, "crafted.png", studio_recipe=text)
    settings, strategy, store, stack, notes = cb.restore(str(path), {}, "merge")
    assert stack == [] and strategy == "merge"
    assert any("'passwd' is not in the library" in n for n in notes)
    assert any("'random-style' is not in the library with the recorded SHA-256" in n for n in notes)
    assert any("made with model 'other-model'" in n for n in notes)
    assert any("strategy 'nope' is not available" in n for n in notes)


def test_restore_an_a1111_png(cb, tmp_path):
    text = ("a zorb in a garden <lora:random-style:0.6> <lora:missing:1>\nNegative prompt: blurry\n"
            "Steps: 12, Sampler: Euler a, CFG scale: 6, Seed: 42, Size: 64x64, Model: tiny-sdxl")
    path = _png_with(tmp_path, "a1111.png", parameters=text)
    settings, strategy, store, stack, notes = cb.restore(str(path), {}, "composite")
    assert (settings.prompt, settings.negative_prompt, settings.seed, settings.steps) == (
        "a zorb in a garden", "blurry", 42, 12)
    assert [(s.lora_id, s.weight) for s in stack] == [(STYLE, 0.6)] and strategy == "merge"
    assert any("'missing' is not in the library" in n for n in notes)


def test_restore_errors(h, tmp_path):
    with pytest.raises(gr.Error, match="drop a PNG"):
        h.restore(None, {}, "merge", 0, 0)
    with pytest.raises(gr.Error, match="carries no studio recipe"):
        h.restore(str(_png_with(tmp_path, "plain.png")), {}, "merge", 0, 0)


# ---------------------------------------------------------------------------------------------- upload
def test_upload_handler(cb, h, tmp_path):
    incoming = tmp_path / "gradio-cache" / "my lora.safetensors"
    incoming.parent.mkdir()
    incoming.write_bytes(cb.library.get(SUBJECT).path.read_bytes())
    rev, message, cleared = h.upload(str(incoming), 0)
    assert rev == 1 and md_escape("Added uploads/my_lora.safetensors") in message and cleared is None
    assert "uploads/my_lora.safetensors" in cb.library
    flux = tmp_path / "gradio-cache" / "f.safetensors"
    flux.write_bytes(cb.library.get(FLUX).path.read_bytes())
    with pytest.raises(gr.Error, match="f.safetensors"):
        h.upload(str(flux), 1)
    pickle = tmp_path / "gradio-cache" / "evil.ckpt"
    pickle.write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(gr.Error, match="only .safetensors"):
        h.upload(str(pickle), 1)
    assert sorted(p.name for p in (cb.library.roots[0] / "uploads").iterdir()) == ["my_lora.safetensors"]


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_ui_binds_locally_by_default(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import ui.app
    from studio.cli import app

    calls = {}
    monkeypatch.setattr(ui.app, "make_app", lambda model, dirs, **kw: calls.update(model=model, dirs=dirs, **kw)
                        or ("demo", "callbacks"))
    monkeypatch.setattr(ui.app, "launch", lambda demo, callbacks, **kw: calls.update(launch=kw))
    library = build_library(tmp_path / "loras")
    result = CliRunner().invoke(app, ["ui", "--lora-dir", str(library), "--max-upload-mb", "50"])
    assert result.exit_code == 0, result.output
    assert calls["model"] == "tiny-sdxl" and calls["dirs"] == [library] and calls["max_upload_mb"] == 50
    assert calls["launch"] == {"host": "127.0.0.1", "port": None}
    result = CliRunner().invoke(app, ["ui", "--lora-dir", str(library), "--host", "0.0.0.0", "--port", "7000"])
    assert calls["launch"] == {"host": "0.0.0.0", "port": 7000} and "anyone who can reach it" in result.output
