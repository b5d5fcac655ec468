"""Gradio-shaped wrappers around :class:`ui.callbacks.Callbacks`: component values in, component values out.

Each method takes the values of its input components (in the order ``app.py`` wires them) and returns or yields
the values of its outputs. A :class:`studio.StudioError` becomes a ``gr.Error`` with the same message, which
the browser shows as a toast; anything else is a bug and surfaces as Gradio's generic error.
"""

from __future__ import annotations

import contextlib
import functools
import html
import inspect
import re
from pathlib import Path
from typing import Any

import gradio as gr

from studio import StudioError
from studio.library import LibraryEntry

from .callbacks import Callbacks, Finished, Item, Preview, Progress, Settings


@contextlib.contextmanager
def _user_errors():
    try:
        yield
    except StudioError as e:  # the toast renders HTML: file names and recipe text are shown as text
        raise gr.Error(html.escape(str(e), quote=False), print_exception=False) from None


RESTORE_TIMEOUT_S = 15.0


def within_time(fn, seconds: float, what: str):
    """Run ``fn()`` in a worker thread and wait at most ``seconds`` for it, so a hostile upload cannot hold the
    request (the parsers are also linear and size-capped, :mod:`studio.recipe`); errors pass through."""
    import queue
    import threading

    box: queue.Queue = queue.Queue(maxsize=1)

    def work():
        try:
            box.put((True, fn()))
        except BaseException as e:  # handed to the caller's thread
            box.put((False, e))

    threading.Thread(target=work, daemon=True, name="studio-parse").start()
    try:
        ok, value = box.get(timeout=seconds)
    except queue.Empty:
        raise StudioError(f"{what}: reading it took longer than {seconds:g} s; refused") from None
    if not ok:
        raise value
    return value


def user_errors(fn):
    """Turn :class:`StudioError` into ``gr.Error`` for plain functions and generators alike."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            with _user_errors():
                yield from fn(*args, **kwargs)
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _user_errors():
            return fn(*args, **kwargs)
    return wrapper


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~])")


def md_escape(text: Any) -> str:
    """Markdown- and HTML-escape text taken from LoRA files (metadata is untrusted)."""
    return _MD_SPECIAL.sub(r"\\\1", html.escape(str(text), quote=False))


def card_markdown(entry: LibraryEntry) -> str:
    info = entry.info
    rank = info.rank if info.rank is not None else "?"
    lines = [f"**{md_escape(info.name)}**",
             f"{md_escape(info.base_name)} · {md_escape(info.format)} · rank {md_escape(rank)} · "
             f"{info.size_bytes / 1e6:.1f} MB",
             f"<small>{md_escape(entry.id)}</small>" if entry.id != info.name else ""]
    if info.triggers:
        lines.append("triggers: " + ", ".join(f"*{md_escape(t)}*" for t in info.triggers[:6]))
    return "  \n".join(line for line in lines if line)


def _gallery(items: list[Item]) -> list[tuple[str, str]]:
    return [(item.png, item.caption) for item in items]


def _progress(event: Progress, progress) -> str:
    done, total = event.image * event.steps + event.step, event.images * event.steps
    text = f"{event.label}: step {event.step}/{event.steps}"
    progress((done, total), desc=text)
    return text


class Handlers:
    def __init__(self, callbacks: Callbacks):
        self.cb = callbacks

    # ------------------------------------------------------------------------------------------ library / stack
    @user_errors
    def add(self, lora_id, stack, rev):
        stack, rev, message = self.cb.add(lora_id, stack or [], rev or 0)
        return stack, rev, md_escape(message)

    @user_errors
    def insert_triggers(self, lora_id, prompt):
        return self.cb.insert_triggers(lora_id, prompt)

    @user_errors
    def upload(self, file, rev):
        rev, message = self.cb.upload(file, rev or 0)
        return rev, md_escape(message), None

    @user_errors
    def refresh(self, rev):
        rev, message = self.cb.refresh_library(rev or 0)
        return rev, md_escape(message), gr.update(choices=self.cb.base_filters())

    @user_errors
    def set_field(self, uid, name, stack, value):
        return self.cb.set_field(stack, uid, name, value)

    @user_errors
    def set_preset(self, uid, stack, value):
        """A preset change also shows or hides the custom block field."""
        return self.cb.set_field(stack, uid, "preset", value), gr.update(visible=value == "custom")

    @user_errors
    def move(self, uid, offset, stack, rev):
        return self.cb.move(stack, uid, offset, rev or 0)

    @user_errors
    def remove(self, uid, stack, rev):
        return self.cb.remove(stack, uid, rev or 0)

    @user_errors
    def set_param(self, strategy, name, store, value):
        return self.cb.set_param(store, strategy, name, value)

    # ------------------------------------------------------------------------------------------ regions
    def _with_strategy(self, before, stack, strategy, note=""):
        """``(stack, strategy update, status)``: an edit that gives a LoRA a region while the strategy does not
        read regions switches it to ``regional`` (:meth:`Callbacks.region_strategy`), said in the status line. A
        control that reports without a change (a canvas appearing, a field losing focus) switches nothing."""
        new, switched = self.cb.region_strategy(stack, strategy) if stack != before else (strategy, "")
        status = " ".join(md_escape(n) for n in (note, switched) if n)
        return stack, (new if new != strategy else gr.skip()), status if status else gr.skip()

    @user_errors
    def set_region_kind(self, uid, stack, kind, strategy):
        """Outputs: stack, box field, mask area (canvas and upload), strategy, status."""
        stack, strategy, status = self._with_strategy(stack, self.cb.set_field(stack, uid, "region_kind", kind),
                                                      strategy)
        return (stack, gr.update(visible=kind == "box"), gr.update(visible=kind == "mask"), strategy, status)

    @user_errors
    def set_region_text(self, uid, name, stack, value, strategy):
        """The box or the region prompt. Outputs: stack, strategy, status."""
        return self._with_strategy(stack, self.cb.set_field(stack, uid, name, value), strategy)

    @user_errors
    def set_region_mask(self, uid, stack, value, strategy):
        """A stroke on the canvas. Outputs: stack, strategy, status."""
        new, note = self.cb.set_region_mask(stack, uid, value)
        return self._with_strategy(stack, new, strategy, note)

    @user_errors
    def upload_region_mask(self, uid, stack, file, size, strategy):
        """Outputs: stack, canvas (showing the uploaded mask), strategy, status."""
        from . import regions, stack as stk

        new, note = self.cb.upload_region_mask(stack, uid, file, tuple(size))
        entry = new[stk.find(new, uid)]
        stack, strategy, status = self._with_strategy(stack, new, strategy, note)
        return stack, regions.editor_value(entry.region_mask, regions.canvas_size(*size)), strategy, status

    def region_preview(self, stack, width, height, strategy, params):
        """Outputs: the overlay of the regions before rendering, its legend."""
        try:
            image, legend = self.cb.region_preview(stack or [], width, height, strategy, params)
        except StudioError as e:  # a preview never blocks editing; the render reports the problem
            return gr.update(value=None, visible=False), md_escape(str(e))
        return gr.update(value=image, visible=image is not None), legend

    @staticmethod
    def masks_of(items: list[Item], index: int = 0):
        """Outputs: the region masks a gallery item's render used, and their legend (hidden when it has none)."""
        item = items[index] if items and 0 <= index < len(items) else None
        if item is None or item.masks is None:
            return gr.update(value=None, visible=False), ""
        return gr.update(value=item.masks, visible=True), item.masks_legend

    def select_masks(self, items: list[Item], evt: gr.SelectData):
        return self.masks_of(items, int(evt.index) if evt.index is not None else -1)

    # ------------------------------------------------------------------------------------------ generate
    @user_errors
    def generate(self, prompt, negative, seed, steps, guidance, width, height, count, strategy, params, stack,
                 image=None, mask=None, strength=None, control_image=None, controlnet=None, controlnet_scale=None,
                 progress=gr.Progress()):
        """Outputs: preview image, progress text, gallery, gallery items, recipe, PNG download, TOML download, seed.

        ``image`` (and ``mask``, white = repaint) make it img2img (inpainting) at ``strength``; ``control_image``
        adds the ControlNet named ``controlnet`` (one the app was started with) at ``controlnet_scale``."""
        settings = Settings(prompt=prompt or "", negative_prompt=negative or "", seed=seed, steps=steps,
                            guidance=guidance, width=width, height=height, count=count, image=image,
                            mask_image=mask, strength=strength if image is not None else None,
                            control_image=control_image, controlnet=controlnet, controlnet_scale=controlnet_scale)
        skip = gr.skip()
        done: list[tuple[Any, str]] = []
        for event in self.cb.generate_events(settings, strategy, params, stack or []):
            if isinstance(event, Progress):
                text = _progress(event, progress)
                yield skip, text, skip, skip, skip, skip, skip, settings.seed
            elif isinstance(event, Preview):
                yield event.image, event.label, skip, skip, skip, skip, skip, skip
            elif isinstance(event, Finished):
                done.append((event.item.png, event.item.caption))
                yield event.image, event.item.caption, list(done), skip, skip, skip, skip, skip
            else:
                items: list[Item] = event
                first = items[0]
                message = f"Done: {len(items)} image(s), seed {settings.seed}" + (
                    f" to {settings.seed + len(items) - 1}" if len(items) > 1 else "")
                yield (skip, message, _gallery(items), items, first.recipe, gr.update(value=first.png, interactive=True),
                       gr.update(value=first.toml, interactive=True), settings.seed)

    def select(self, items: list[Item], evt: gr.SelectData):
        """Show the recipe of the gallery item the user picked and point the downloads at it."""
        if not items or evt.index is None or not 0 <= int(evt.index) < len(items):
            return gr.skip(), gr.skip(), gr.skip()
        item = items[int(evt.index)]
        return item.recipe, gr.update(value=item.png, interactive=True), gr.update(value=item.toml, interactive=True)

    # ------------------------------------------------------------------------------------------ compare
    @user_errors
    def compare(self, strategies, include_base, prompt, negative, seed, steps, guidance, width, height, params,
                stack, progress=gr.Progress()):
        """Outputs: gallery, items, score table, progress text, recipe, PNG download, TOML download."""
        settings = Settings(prompt=prompt or "", negative_prompt=negative or "", seed=seed, steps=steps,
                            guidance=guidance, width=width, height=height, count=1)
        skip = gr.skip()
        done: list[tuple[Any, str]] = []
        for event in self.cb.compare_events(settings, strategies or [], bool(include_base), params, stack or []):
            if isinstance(event, Progress):
                yield skip, skip, skip, _progress(event, progress), skip, skip, skip
            elif isinstance(event, Finished):
                done.append((event.image, event.item.caption))
                yield list(done), skip, skip, skip, skip, skip, skip
            elif isinstance(event, list):
                items: list[Item] = event
                rows = [[item.label,
                         "n/a" if item.scores["clipscore"] is None else f"{item.scores['clipscore']:.2f}",
                         f"{item.scores['render_s']:.3f}"] for item in items]
                first = items[0]
                yield (_gallery(items), items, rows, f"Compared {len(items)} run(s) at seed {settings.seed}.",
                       first.recipe, gr.update(value=first.png, interactive=True),
                       gr.update(value=first.toml, interactive=True))

    # ------------------------------------------------------------------------------------------ restore
    @user_errors
    def restore(self, file, store, strategy, stack_rev, params_rev):
        """Outputs: prompt, negative, seed, steps, guidance, width, height, strategy, params, params rev, stack,
        stack rev, status."""
        name = Path(str(file)).name if file else "recipe"
        settings, strategy, store, stack, notes = within_time(lambda: self.cb.restore(file, store, strategy),
                                                              RESTORE_TIMEOUT_S, name)
        names = ", ".join(md_escape(s.lora_id) for s in stack) or "none"
        status = f"Restored the recipe: strategy **{md_escape(strategy)}**, LoRAs: {names}."
        if notes:
            status += "".join(f"\n- {md_escape(n)}" for n in notes)
        return (settings.prompt, settings.negative_prompt, settings.seed, settings.steps, settings.guidance,
                settings.width, settings.height, strategy, store, (params_rev or 0) + 1, stack, (stack_rev or 0) + 1,
                status)
