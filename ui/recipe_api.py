"""The web app's one endpoint for programs: render a whole recipe (``/render_recipe``).

A client sends a recipe as TOML or JSON text (the same fields as ``studio render --recipe`` and the PNG chunk:
prompt, negative prompt, strategy and its parameters, LoRAs with weight, step window, block weights, region and
region prompt, seed, steps, guidance, size) and gets the rendered images and the recipe of each, exactly as the studio recorded it::

    from gradio_client import Client
    client = Client("http://127.0.0.1:7860/")
    images, recipes = client.predict('{"model": "tiny-sdxl", "prompt": "a large red circle", "strategy": "switch",'
                                     ' "loras": [{"source": "tiny-sdxl/subject-zorb.safetensors", "weight": 0.8}]}',
                                     api_name="/render_recipe")

A LoRA ``source`` names a file of the app's library (its id as the library lists it, or its file name, or the
SHA-256 the recipe records): like the Restore tab, the endpoint never opens a path a client sends. Settings the
recipe leaves out take the model's defaults (:meth:`studio.Studio.render_defaults`), and every value passes the
same checks as the form (:meth:`ui.callbacks.Settings.checked`). The recipe's ``model`` must be the model the app
runs (the app loads one model).
"""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.errors import StudioError
from studio import Lora, Recipe

from . import regions, strategy_form
from .callbacks import Callbacks, Settings

MAX_IMAGES = 16


def parse_recipe_text(text: str) -> Recipe:
    """A :class:`studio.Recipe` from TOML or JSON text (JSON when the text starts with ``{``)."""
    if not isinstance(text, str) or not text.strip():
        raise StudioError("send a recipe: TOML or JSON text with at least 'model' and 'prompt'")
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise StudioError(f"recipe: invalid JSON ({str(e)[:200]})") from None
        if not isinstance(data, dict):
            raise StudioError("recipe: the JSON must be an object")
        return Recipe.from_dict(data, "recipe")
    return Recipe.from_toml(text, "recipe")


def library_loras(callbacks: Callbacks, recipe: Recipe) -> list[Lora]:
    """The recipe's LoRAs as library files (by SHA-256, id, path or name; never a client's path)."""
    loras = []
    for i, lora in enumerate(recipe.loras):
        entry = callbacks.library.find(source=lora.source, name=lora.name, sha256=lora.sha256,
                                       family=callbacks.family)
        label = lora.name or lora.source
        if entry is None:
            why = " with the recorded SHA-256" if lora.sha256 else ""
            raise StudioError(f"LoRA #{i + 1} '{label}' is not in the app's library{why} (sources name library "
                              "files: their id as the library lists it, or their file name)")
        if not entry.fits(callbacks.family):
            raise StudioError(f"LoRA #{i + 1} '{entry.id}' was made for {entry.info.base_name}, not this model")
        loras.append(Lora(source=entry.path, weight=lora.weight, name=lora.name, blocks=lora.blocks,
                          start=lora.start, end=lora.end, region=_library_region(callbacks, lora.region, entry.id),
                          prompt=lora.prompt))
    return loras


def _library_region(callbacks: Callbacks, region: str | None, label: str) -> str | None:
    """A recipe's region as the app may use it: presets, boxes and ``auto`` as sent; a mask only when it names one
    of the app's saved masks (by its hash name; a client's path is never opened)."""
    fields = regions.fields_for(region, callbacks.masks_dir, label)
    if fields.kind == regions.MASK and not fields.mask:
        raise StudioError(f"LoRA '{label}': region {str(region)[:200]!r} is not one of the app's saved masks "
                          "(masks/mask-<hash>.png in its output folder; paths a client sends are never opened); send "
                          "a preset or an x0,y0,x1,y1 box")
    if fields.note:
        raise StudioError(fields.note.removesuffix("; left without a region"))
    if fields.kind == regions.MASK:
        return fields.mask
    if fields.kind == regions.BOX:
        return fields.box
    return None if fields.kind == regions.NONE else fields.kind


def render_recipe(callbacks: Callbacks, text: str, count: int = 1) -> tuple[list[str], list[str]]:
    """Render ``count`` images (seeds ``seed``, ``seed+1``, ...) of the recipe ``text``; returns the PNG paths
    (recipes embedded) and each image's recipe as TOML."""
    recipe = parse_recipe_text(text)
    studio = callbacks.studio
    if recipe.model != studio.model:
        raise StudioError(f"recipe: model '{recipe.model}' is not the model this app runs ('{studio.model}')")
    if recipe.mode not in (None, "text2img"):  # its input images are files on the client's side
        raise StudioError(f"recipe: mode {recipe.mode} needs its input images; this endpoint renders "
                          "text-to-image recipes (use `studio render --recipe` with the files)")
    if recipe.strategy not in strategy_form.strategy_names():
        raise StudioError(f"recipe: unknown strategy '{recipe.strategy}' "
                          f"(available: {', '.join(strategy_form.strategy_names())})")
    params = {name: strategy_form.parse_value(recipe.strategy, name, value)
              for name, value in (recipe.strategy_params or {}).items()}
    strategy_form.strategy_class(recipe.strategy)(**params)  # unknown or out-of-range parameters fail here
    loras = library_loras(callbacks, recipe)
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_IMAGES:
        raise StudioError(f"count must be a whole number from 1 to {MAX_IMAGES}, got {count!r}")
    defaults = studio.render_defaults()
    settings = Settings(prompt=recipe.prompt, negative_prompt=recipe.negative_prompt, seed=recipe.seed,
                        steps=defaults.steps if recipe.steps is None else recipe.steps,
                        guidance=defaults.guidance if recipe.guidance is None else recipe.guidance,
                        width=defaults.width if recipe.width is None else recipe.width,
                        height=defaults.height if recipe.height is None else recipe.height,
                        count=count).checked(studio.limits)
    paths, recipes = [], []
    with callbacks.gpu:
        for k in range(settings.count):
            result = studio.compose(
                settings.prompt, loras, recipe.strategy, strategy_params=params,
                negative_prompt=settings.negative_prompt, seed=settings.seed + k, steps=settings.steps,
                guidance=settings.guidance, width=settings.width, height=settings.height, count=1,
                scheduler=recipe.scheduler)
            item = callbacks._save(result.image, result.recipe, recipe.strategy, f"{recipe.strategy} · api")
            paths.append(item.png)
            recipes.append(item.recipe)
    return paths, recipes


def render_recipe_endpoint(callbacks: Callbacks):
    """The Gradio function: ``(recipe text, count) -> (gallery of PNGs, recipes as one TOML text)``."""

    def endpoint(text: str, count: float = 1):
        count = int(count) if isinstance(count, (int, float)) and float(count).is_integer() else count
        paths, recipes = render_recipe(callbacks, text, count)
        gallery = [(path, Path(path).name) for path in paths]
        return gallery, "\n# ----\n".join(recipes)

    return endpoint


__all__ = ["library_loras", "parse_recipe_text", "render_recipe", "render_recipe_endpoint"]
