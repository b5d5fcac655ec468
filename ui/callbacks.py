"""What the app's controls do, as plain Python on top of the public :mod:`studio` API.

:class:`Callbacks` holds what all browser sessions share (one :class:`studio.Studio`, one
:class:`studio.library.Library`, the optional scorer, the output folder and the GPU lock); per-session values
(the stack, strategy parameters, gallery items) are passed in and returned, the way Gradio keeps them in
``gr.State``. ``ui/app.py`` only lays out components and wires them to these methods, so they are unit-tested
without a browser.

Scorer interface (for Compare): any callable ``scorer(images: list[PIL.Image], texts: list[str]) -> list[float]``,
e.g. a CLIPScore; without one, Compare shows timings and "n/a" for scores.
"""

from __future__ import annotations

import random
import re
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from PIL import Image

from studio import Lora, Recipe, Studio, StudioError
from studio.library import Library, LibraryEntry
from studio.preview import LatentPreview

from . import region_overlay, regions
from . import stack as stk
from . import strategy_form
from .controlnets import resolve_choice
from .jobs import stream

Scorer = Callable[[list[Image.Image], list[str]], list[float]]

SEED_MAX = 2**32 - 1
FITS = "fits the loaded model"
ALL_BASES = "all bases"
NO_LORAS = "no LoRAs"
MAX_CARDS = 40


@dataclass
class Settings:
    """The generation settings shared by Generate and Compare."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 30
    guidance: float = 5.0
    width: int = 1024
    height: int = 1024
    count: int = 1
    # img2img / inpainting (pipelines.modes): the input image and mask (PIL) and the strength; None: text-to-image
    image: Any = None
    mask_image: Any = None
    strength: float | None = None
    # ControlNet (pipelines.controlnets): the control image (PIL), the name of one of the app's ControlNets
    # (ui.controlnets) and the conditioning scale
    control_image: Any = None
    controlnet: str | None = None
    controlnet_scale: float | None = None

    def checked(self, limits=None) -> "Settings":
        """The settings checked by the one validation the API, CLI and batch share (:mod:`studio.settings`);
        a negative seed means "pick one at random"."""
        from studio.settings import DEFAULT_LIMITS, check_settings

        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise StudioError("write a prompt first")
        for name in ("seed", "steps", "width", "height", "count", "guidance"):
            if getattr(self, name) is None:  # the form always sends a value; None is not "the default" here
                kind = "number" if name == "guidance" else "whole number"
                raise StudioError(f"{name} must be a {kind}, got None")
        if isinstance(self.seed, (int, float)) and not isinstance(self.seed, bool) and self.seed < 0:
            self.seed = random.randint(0, SEED_MAX)
        checked = check_settings(prompt=self.prompt, negative_prompt=self.negative_prompt, steps=self.steps,
                                 guidance=self.guidance, width=self.width, height=self.height, seed=self.seed,
                                 count=self.count, limits=limits or DEFAULT_LIMITS)
        for name, value in checked.items():
            setattr(self, name, value)
        return self


@dataclass
class Progress:
    image: int          # 0-based index of the image being rendered
    images: int
    step: int           # 1-based step just finished
    steps: int
    label: str = ""


@dataclass
class Preview:
    image: Image.Image
    label: str = ""


@dataclass
class Finished:
    """One image of the job is done (saved, with its recipe)."""

    item: "Item"
    image: Image.Image


@dataclass
class Item:
    """One rendered image in a gallery, with its recipe."""

    png: str
    toml: str
    caption: str
    recipe: str
    label: str = ""
    scores: dict[str, Any] = field(default_factory=dict)
    masks: Any = None       # the region masks the render used, drawn over the image (ui.region_overlay.overlay); or None
    masks_legend: str = ""


class Callbacks:
    def __init__(self, studio: Studio, library: Library, *, out_dir: str | Path, scorer: Scorer | None = None,
                 max_upload_bytes: int = 1 << 30, preview_every: int | None = None, preview_max_side: int = 384,
                 controlnets: Mapping[str, Path] | None = None, control_loras: Mapping[str, Path] | None = None):
        self.studio, self.library, self.scorer = studio, library, scorer
        self.controlnets = dict(controlnets or {})  # name -> folder (ui.controlnets.find_controlnets)
        self.control_loras = dict(control_loras or {})  # name -> file (ui.controlnets.find_control_loras)
        self.out_dir = Path(out_dir).expanduser().resolve()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_upload_bytes = int(max_upload_bytes)
        self.preview_every, self.preview_max_side = preview_every, preview_max_side
        self.gpu = threading.Lock()
        self._counter = 0
        self._counter_lock = threading.Lock()

    # ------------------------------------------------------------------------------------------ model facts
    @property
    def family(self) -> str:
        return self.studio.family.name

    def block_presets(self) -> list[str]:
        presets = [p for p in self.studio.family.block_presets if p != stk.ALL_BLOCKS]
        return [stk.ALL_BLOCKS, *presets, stk.CUSTOM_BLOCKS]

    def block_names(self) -> list[str]:
        return self.studio.block_names()

    def default_settings(self) -> Settings:
        """The model's defaults, from the one source the CLI and API use (``Studio.render_defaults``)."""
        defaults = self.studio.render_defaults()
        return Settings(prompt="", steps=defaults.steps, guidance=defaults.guidance, width=defaults.width,
                        height=defaults.height)

    def model_summary(self) -> str:
        return (f"Model **{self.studio.model}** ({self.studio.family.name.upper()}) on {self.studio.device}; "
                f"{len(self.library)} LoRA(s) in {', '.join(str(r) for r in self.library.roots)}")

    # ------------------------------------------------------------------------------------------ library
    def base_filters(self) -> list[str]:
        return [FITS, ALL_BASES, *self.library.bases()]

    def library_view(self, query: str = "", base_filter: str = FITS) -> tuple[list[LibraryEntry], int]:
        """The cards to show (at most ``MAX_CARDS``) and how many entries matched in all."""
        family = self.family if base_filter in (FITS, None, "") else None
        matches = self.library.search(query or "", family)
        if base_filter not in (FITS, ALL_BASES, None, ""):
            matches = [e for e in matches if e.info.base_name == base_filter]
        return matches[:MAX_CARDS], len(matches)

    def refresh_library(self, rev: int) -> tuple[int, str]:
        self.library.refresh()
        message = f"{len(self.library)} LoRA(s) in the library."
        if self.library.errors:
            message += f" Skipped {len(self.library.errors)} unreadable file(s): " + "; ".join(
                str(e) for e in self.library.errors)
        return rev + 1, message

    @staticmethod
    @lru_cache(maxsize=512)
    def _thumbnail(path: str, mtime: int, side: int) -> Image.Image:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((side, side))
            return image

    def thumbnail(self, entry: LibraryEntry, side: int = 160) -> Image.Image | None:
        if entry.preview is None:
            return None
        try:
            return self._thumbnail(str(entry.preview), entry.preview.stat().st_mtime_ns, side)
        except (OSError, ValueError):
            return None

    def upload(self, file: str | None, rev: int) -> tuple[int, str]:
        """Validate an uploaded ``.safetensors`` and add it to the library's upload folder."""
        if not file:
            return rev, ""
        path = Path(file)
        with self.gpu:
            entry = self.library.add_upload(path, path.name, max_bytes=self.max_upload_bytes,
                                            validate=self.studio.inspect)
        return rev + 1, f"Added {entry.id} to the library."

    # ------------------------------------------------------------------------------------------ stack
    def add(self, lora_id: str, stack: list[stk.StackEntry], rev: int) -> tuple[list[stk.StackEntry], int, str]:
        """Add the library LoRA ``lora_id`` to the stack; ids that are not in the library are refused."""
        entry = self.library.get(lora_id)
        if not entry.fits(self.family):
            raise StudioError(f"{entry.id} was made for {entry.info.base_name}; the loaded model is "
                              f"{self.family.upper()}")
        if any(item.lora_id == entry.id for item in stack):
            raise StudioError(f"{entry.id} is already in the stack")
        label = entry.info.name if entry.info.name == entry.path.stem else f"{entry.info.name} ({entry.path.stem})"
        return [*stack, stk.new_entry(entry.id, label)], rev + 1, f"Added {entry.id}."

    def insert_triggers(self, lora_id: str, prompt: str) -> str:
        """Append the LoRA's trigger words that the prompt does not contain yet."""
        entry = self.library.get(lora_id)
        present = (prompt or "").lower()
        missing = [w for w in entry.info.triggers if w.lower() not in present]
        if not missing:
            return prompt or ""
        return ", ".join(p for p in [(prompt or "").strip().rstrip(","), *missing] if p)

    def set_field(self, stack: list[stk.StackEntry], uid: int, name: str, value: Any) -> list[stk.StackEntry]:
        """Change one field of a stack entry (weight, start, end, preset, custom_blocks, enabled)."""
        if name in ("weight", "start", "end"):
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise StudioError(f"{name} must be a number, got {value!r}") from None
        elif name == "enabled":
            value = bool(value)
        elif name == "preset":
            if value not in self.block_presets():
                raise StudioError(f"unknown block preset '{value}'; presets: {', '.join(self.block_presets())}")
        elif name == "custom_blocks":
            value = str(value or "").strip()
            if value:
                self.studio.block_weights(value)  # raises a StudioError naming the bad block or value
        elif name == "region_kind":
            value = regions.check_kind(value)
        elif name == "region_box":
            value = regions.check_box(value, stack[stk.find(stack, uid)].label)
        elif name == "region_prompt":
            value = regions.check_region_prompt(value, stack[stk.find(stack, uid)].label)
        else:
            raise StudioError(f"a stack entry has no field '{name}'")
        entry = stack[stk.find(stack, uid)]
        if name in ("start", "end"):
            start, end = (value, entry.end) if name == "start" else (entry.start, value)
            if not 0.0 <= start < end <= 1.0:
                raise StudioError(f"{entry.label}: the step window must satisfy 0 <= start < end <= 1 "
                                  f"(start {start:g}, end {end:g})")
        return stk.update(stack, uid, **{name: value})

    # ------------------------------------------------------------------------------------------ regions
    @property
    def masks_dir(self) -> Path:
        """Where drawn and uploaded region masks are saved (inside the output folder, named by their hash)."""
        return self.out_dir / "masks"

    def set_region_mask(self, stack: list[stk.StackEntry], uid: int, value: Any) -> tuple[list[stk.StackEntry], str]:
        """Take the mask painted on an entry's canvas (a Gradio ``ImageEditor`` value); returns the stack and a
        note. An empty or all-covering drawing detaches the entry's mask (the render then asks for one)."""
        entry = stack[stk.find(stack, uid)]
        mask = regions.mask_from_editor(value)
        if (mask is None or not mask.any()) and not entry.region_mask:
            return stack, ""  # an empty canvas appearing is not an edit
        mask, problem = regions.mask_from_editor_checked(value, entry.label)
        if problem:
            return stk.update(stack, uid, region_mask=""), problem
        path = regions.save_mask(mask, self.masks_dir)
        if str(path) == entry.region_mask and entry.region_kind == regions.MASK:
            return stack, ""
        coverage = float(mask.mean()) / 255
        return (stk.update(stack, uid, region_kind=regions.MASK, region_mask=str(path)),
                f"{entry.label}: drawn mask set ({coverage:.0%} of the image).")

    def upload_region_mask(self, stack: list[stk.StackEntry], uid: int, file: Any,
                           size: tuple[int, int]) -> tuple[list[stk.StackEntry], str]:
        """An uploaded mask image becomes the entry's region (checked first: an image, not too large, neither
        empty nor covering everything; on any problem nothing is attached)."""
        entry = stack[stk.find(stack, uid)]
        mask, note = regions.read_mask_upload(file, entry.label, regions.canvas_size(*size))
        path = regions.save_mask(mask, self.masks_dir)
        return stk.update(stack, uid, region_kind=regions.MASK, region_mask=str(path)), note + "."

    @staticmethod
    def region_strategy(stack: list[stk.StackEntry], strategy: str) -> tuple[str, str]:
        """The strategy to use once an entry has a region: a strategy that reads regions is kept; any other is
        switched to ``regional`` (an artist who draws a region wants it to act), with a note saying so."""
        if not any(e.enabled and e.has_region for e in stack) or strategy_form.strategy_class(strategy).uses_regions:
            return strategy, ""
        return "regional", (f"Strategy switched from {strategy} to regional: only strategies that read regions use "
                            "them (choose another strategy to render without regions; Compare runs the others "
                            "without them).")

    def region_preview(self, stack: list[stk.StackEntry], width: int, height: int, strategy: str,
                       params_store: Mapping | None, background: Image.Image | None = None):
        """The regions of the enabled entries as the render will use them, drawn over the image area (or over
        ``background``); returns ``(image or None, legend markdown)``."""
        try:
            width, height = int(width), int(height)
        except (TypeError, ValueError):
            return None, ""
        entries = [e for e in stack if e.enabled]
        if not any(e.region_kind != regions.NONE for e in entries):
            return None, ""  # nothing to show: every LoRA acts on the whole image
        names, chosen, prompts, notes = [], [], [], []
        for entry in entries:
            try:
                region = entry.region
            except StudioError as e:
                notes.append(str(e))
                region = None
            if region == regions.AUTO:
                notes.append(f"{entry.label}: auto: its mask comes from the cross-attention while rendering "
                             "(shown next to the image afterwards)")
                region = None
            names.append(entry.label)
            chosen.append(region)
            prompts.append(entry.region_prompt.strip() or None)
        params = strategy_form.values_for(strategy, params_store) if strategy in strategy_form.strategy_names() else {}
        if params.get("auto") is True:  # the strategy makes every region automatic
            return None, region_overlay.legend([], [f"{strategy}: auto is on, so every region's mask comes from "
                                                    "the cross-attention while rendering (shown next to the image "
                                                    "afterwards)"])
        try:
            masks = region_overlay.planned_masks(self.studio, names, chosen, prompts, width, height, params)
        except StudioError as e:
            return None, region_overlay.legend([], [str(e), *notes])
        if not masks:
            return None, region_overlay.legend([], notes)
        image = background if background is not None else region_overlay.plain_canvas(width, height)
        return region_overlay.overlay(image, masks), region_overlay.legend(masks, notes)

    def remove(self, stack, uid, rev):
        return stk.remove(stack, uid), rev + 1

    def move(self, stack, uid, offset, rev):
        return stk.move(stack, uid, offset), rev + 1

    def clear(self, rev):
        return [], rev + 1

    # ------------------------------------------------------------------------------------------ strategy
    def set_param(self, store: Mapping[str, Mapping[str, Any]], strategy: str, name: str, value: Any) -> dict:
        parsed = strategy_form.parse_value(strategy, name, value)
        out = {k: dict(v) for k, v in (store or {}).items()}
        out.setdefault(strategy, {})[name] = parsed
        return out

    # ------------------------------------------------------------------------------------------ jobs
    def _next_stem(self, label: str, seed: int) -> str:
        with self._counter_lock:
            self._counter += 1
            n = self._counter
        safe = re.sub(r"[^\w.-]+", "_", label)
        return f"{time.strftime('%Y%m%d-%H%M%S')}-{n:04d}-{safe}-seed{seed}"

    def _save(self, image: Image.Image, recipe: Recipe, label: str, caption: str) -> Item:
        stem = self._next_stem(label, recipe.seed)
        png = recipe.save_png(image, self.out_dir / f"{stem}.png")
        toml = self.out_dir / f"{stem}.toml"
        text = recipe.to_toml()
        if not recipe.loras:  # e.g. Compare's "no LoRAs" run: say that no strategy acted (a TOML comment)
            text = f"# no LoRAs: the base model alone; strategy {recipe.strategy!r} had nothing to act on\n{text}"
        toml.write_text(text, encoding="utf-8")
        return Item(png=str(png), toml=str(toml), caption=caption, recipe=text, label=label)

    def _preview_every(self, steps: int) -> int:
        if self.preview_every is not None:
            return self.preview_every
        return max(1, steps // 6)

    def _compose(self, emit, settings: Settings, loras, strategy: str, params: Mapping[str, Any], *,
                 label: str, index: int, total: int):
        def on_step(step: int, num_steps: int) -> None:
            emit(Progress(image=index, images=total, step=step + 1, steps=num_steps, label=label))

        def on_preview(step: int, num_steps: int, image: Image.Image) -> None:
            emit(Preview(image=image, label=f"{label}, step {step + 1}/{num_steps}"))

        callback = LatentPreview(self.studio, on_preview, every=self._preview_every(settings.steps),
                                 max_side=self.preview_max_side, on_step=on_step)
        callback.set_size(settings.width, settings.height)
        return self.studio.compose(
            settings.prompt, loras, strategy, strategy_params=params, negative_prompt=settings.negative_prompt,
            seed=settings.seed, steps=settings.steps, guidance=settings.guidance, width=settings.width,
            height=settings.height, count=1, callback=callback, image=settings.image,
            mask_image=settings.mask_image, strength=settings.strength, control_image=settings.control_image,
            **self._control(settings))

    def _control(self, settings: Settings) -> dict[str, Any]:
        """The compose arguments of the control choice: a ControlNet at its scale, or a control LoRA at that
        weight (ui.controlnets); nothing without a control image."""
        picked = resolve_choice(settings.controlnet, {**self.controlnets, **self.control_loras},
                                settings.control_image is not None)
        if picked is None:
            return {}
        if settings.controlnet in self.control_loras:
            weight = 1.0 if settings.controlnet_scale is None else settings.controlnet_scale
            return {"control_lora": Lora(source=picked, weight=weight)}
        return {"controlnet": picked, "controlnet_conditioning_scale": settings.controlnet_scale}

    @staticmethod
    def _attach_masks(item: Item, result) -> None:
        """The region masks the render used (``Result.region_masks``), drawn over its image, on the item."""
        masks = list((getattr(result, "region_masks", None) or {}).items())
        if masks:
            item.masks, item.masks_legend = region_overlay.overlay(result.image, masks), region_overlay.legend(masks)

    def generate_events(self, settings: Settings, strategy: str, params_store: Mapping, stack) -> Iterator[Any]:
        """Render ``settings.count`` images (seeds ``seed``, ``seed+1``, ...).

        Yields :class:`Progress` every step, :class:`Preview` every few steps, :class:`Finished` per image and
        finally the list of saved :class:`Item`.
        """
        settings = settings.checked(self.studio.limits)
        self._control(settings)  # the control choice checked before the job queues
        loras = stk.to_loras(stack, self.library)
        params = strategy_form.values_for(strategy, params_store)
        strategy_form.strategy_class(strategy)(**params)  # validate before the job queues

        def work(emit):
            items = []
            for k in range(settings.count):
                one = Settings(**{**settings.__dict__, "seed": settings.seed + k})
                result = self._compose(emit, one, loras, strategy, params, label=f"image {k + 1}/{settings.count}",
                                       index=k, total=settings.count)
                caption = f"{strategy} · seed {one.seed} · {result.timings['render_s']:.2f} s"
                items.append(self._save(result.image, result.recipe, strategy, caption))
                self._attach_masks(items[-1], result)
                emit(Finished(items[-1], result.image))
            emit(items)

        yield from stream(work, self.gpu)

    def compare_events(self, settings: Settings, strategies: Sequence[str], include_base: bool,
                       params_store: Mapping, stack) -> Iterator[Any]:
        """Render the same recipe under each strategy (and without LoRAs), then score all images.

        Yields like :meth:`generate_events`; the final items carry ``scores`` (``clipscore``, ``render_s``).
        """
        settings = settings.checked(self.studio.limits)
        settings.count = 1
        runs = [s for s in strategies if s]
        if not runs and not include_base:
            raise StudioError("choose at least one strategy to compare")
        loras = stk.to_loras(stack, self.library)
        if runs and not loras:
            raise StudioError("the stack is empty: add LoRAs from the library to compare strategies")
        # a strategy that does not read regions runs the stack without them (labelled so), so a region stack can
        # be compared with merge & co.
        plain = stk.to_loras(stack, self.library, regions=False)
        has_regions = any(e.enabled and e.has_region for e in stack)
        plans = []
        for name in runs:
            reads = strategy_form.strategy_class(name).uses_regions
            label = name if reads or not has_regions else f"{name} (no regions)"
            plans.append((label, loras if reads else plain, name, strategy_form.values_for(name, params_store)))
        for _, _, name, params in plans:
            strategy_form.strategy_class(name)(**params)
        if include_base:
            plans.insert(0, (NO_LORAS, [], "merge", {}))

        def work(emit):
            results = []
            for i, (label, run_loras, strategy, params) in enumerate(plans):
                result = self._compose(emit, settings, run_loras, strategy, params, label=label, index=i,
                                       total=len(plans))
                results.append((label, result))
                emit(Finished(Item(png="", toml="", caption=label, recipe="", label=label), result.image))
            images = [r.image for _, r in results]
            scores = (list(self.scorer(images, [settings.prompt] * len(images))) if self.scorer is not None
                      else [None] * len(images))
            items = []
            for (label, result), score in zip(results, scores):
                render_s = result.timings["render_s"]
                shown = "n/a" if score is None else f"{score:.2f}"
                item = self._save(result.image, result.recipe, label, f"{label} · CLIPScore {shown} · {render_s:.2f} s")
                item.scores = {"clipscore": score, "render_s": render_s}
                self._attach_masks(item, result)
                items.append(item)
            emit(items)

        yield from stream(work, self.gpu)

    # ------------------------------------------------------------------------------------------ restore
    def restore(self, file: str | None, store: Mapping[str, Mapping[str, Any]], strategy: str):
        """Read a recipe from a PNG (studio chunk or A1111 ``parameters``) and map it onto the app.

        Returns ``(settings, strategy, params_store, stack, notes)``; LoRAs are matched to library entries by
        hash, path or name (:meth:`studio.library.Library.find`); paths in the PNG are never opened.
        """
        if not file:
            raise StudioError("drop a PNG made by the studio (or by A1111) to restore its recipe")
        name = Path(str(file)).name  # the name the user knows, not the server's temporary path
        try:
            from studio.recipe import MAX_PNG_BYTES

            size = Path(str(file)).stat().st_size if Path(str(file)).is_file() else 0
            if size > MAX_PNG_BYTES:
                raise StudioError(f"{file}: {size} bytes is more than the {MAX_PNG_BYTES} a recipe PNG may have")
            recipe = Recipe.from_png(file)
        except StudioError as e:
            raise StudioError(f"{name}: {str(e).removeprefix(str(file) + ': ')}") from None
        notes = []
        if recipe.model and recipe.model != self.studio.model:
            notes.append(f"made with model '{recipe.model}'; this app runs '{self.studio.model}'")
        restored_strategy = strategy
        new_store = {k: dict(v) for k, v in (store or {}).items()}
        if recipe.strategy in strategy_form.strategy_names():
            restored_strategy = recipe.strategy
            params = {}
            for name, value in (recipe.strategy_params or {}).items():
                try:
                    params[name] = strategy_form.parse_value(recipe.strategy, name, value)
                except StudioError as e:
                    notes.append(f"ignored parameter: {e}")
            new_store[recipe.strategy] = params
        else:
            notes.append(f"strategy '{recipe.strategy}' is not available here; kept '{strategy}'")
        presets = self.studio.family.block_presets
        stack = []
        for lora in recipe.loras:
            entry = self.library.find(source=lora.source, name=lora.name, sha256=lora.sha256)
            label = lora.name or Path(lora.source).stem
            if entry is None:
                why = " with the recorded SHA-256" if lora.sha256 else ""
                notes.append(f"LoRA '{label}' is not in the library{why}; left out")
                continue
            if not entry.fits(self.family):
                notes.append(f"LoRA '{entry.id}' was made for {entry.info.base_name}; left out")
                continue
            if any(s.lora_id == entry.id for s in stack):
                continue
            region = regions.fields_for(lora.region, self.masks_dir, entry.id)
            if region.note:
                notes.append(region.note)
            stack.append(stk.new_entry(entry.id, entry.info.name, weight=float(lora.weight), start=float(lora.start),
                                       end=float(lora.end), **stk.blocks_fields(lora.blocks, presets),
                                       region_kind=region.kind, region_box=region.box, region_mask=region.mask,
                                       region_prompt=lora.prompt or ""))
        defaults = self.studio.render_defaults()  # a setting the recipe leaves out means the model's default
        settings = Settings(prompt=recipe.prompt, negative_prompt=recipe.negative_prompt, seed=recipe.seed,
                            steps=defaults.steps if recipe.steps is None else recipe.steps,
                            guidance=defaults.guidance if recipe.guidance is None else recipe.guidance,
                            width=defaults.width if recipe.width is None else recipe.width,
                            height=defaults.height if recipe.height is None else recipe.height)
        return settings, restored_strategy, new_store, stack, notes

    # ------------------------------------------------------------------------------------------ misc
    @staticmethod
    def random_seed() -> int:
        return random.randint(0, SEED_MAX)
