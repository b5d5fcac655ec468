"""`Recipe`: everything needed to reproduce an image, as TOML and inside the PNG itself.

Every studio PNG carries two text chunks:

* ``studio_recipe``: the recipe as TOML (model, LoRAs with their SHA-256, strategy and parameters, prompt,
  negative prompt, seed, steps, guidance, size, scheduler, 4-bit runtime, studio version);
* ``parameters``: the A1111 "infotext" (prompt with ``<lora:name:weight>`` tags, ``Negative prompt:``, and a
  ``Steps: …, Sampler: …, CFG scale: …, Seed: …, Size: …`` line), so other tools show the settings too.

:meth:`Recipe.from_png` reads either chunk; an A1111 image without a studio chunk gives a recipe with what
A1111 records (LoRAs by name, to be found in a LoRA library).
"""

from __future__ import annotations

import io
import json
import math
import re
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
from PIL import Image, PngImagePlugin

from pipelines.atomic_files import atomic_write_bytes  # noqa: F401  (also imported from here)
from pipelines.errors import RecipeError, StudioError

from . import __version__

RECIPE_CHUNK = "studio_recipe"
A1111_CHUNK = "parameters"
# Outside text is bounded before it is parsed, and every parser here runs in time linear in its input.
MAX_TEXT_CHARS = 1_000_000      # a recipe TOML or an A1111 text (real ones are a few KB)
MAX_PNG_BYTES = 64 * 1024 * 1024
MAX_LORAS = 64


@dataclass
class LoraRecipe:
    source: str
    weight: float = 1.0
    name: str | None = None
    blocks: dict[str, float] | str | None = None
    start: float = 0.0
    end: float = 1.0
    sha256: str | None = None
    region: str | None = None  # regional strategy: preset, x0,y0,x1,y1 or mask file (older recipes: none)
    prompt: str | None = None  # regional strategy: the region's prompt

    def to_lora_kwargs(self) -> dict[str, Any]:
        return {"source": self.source, "weight": self.weight, "name": self.name, "blocks": self.blocks,
                "start": self.start, "end": self.end, "region": self.region, "prompt": self.prompt}


@dataclass
class Recipe:
    model: str
    prompt: str
    negative_prompt: str = ""
    strategy: str = "merge"
    strategy_params: dict[str, Any] = field(default_factory=dict)
    loras: list[LoraRecipe] = field(default_factory=list)
    seed: int = 0
    # None: the model's default (studio.settings.render_defaults), resolved when the recipe renders
    steps: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    scheduler: str | None = None
    # how a 4-bit model's layers ran (pipelines.quant.runtime): triton, reference (both W4A4), dequant (W4A16);
    # "auto" for 16-bit models and for recipes written before the field existed
    runtime: str = "auto"
    # img2img / inpainting (pipelines.modes); None: text-to-image (and every recipe written before modes).
    # ``inputs`` maps a role ("image", "mask_image") to {"source": file or "<image>", "sha256": ...}
    mode: str | None = None
    strength: float | None = None
    inputs: dict[str, dict[str, str]] | None = None
    controlnet: str | list[str] | None = None  # ControlNet mode: a folder / Hub id, "<pipeline>" (from_pipe's) or
    controlnet_conditioning_scale: float | list[float] | None = None  # "<ControlNet>"; multi-ControlNet: lists
    control_lora: dict[str, Any] | None = None  # control-lora mode: {source, sha256, weight} (pipelines.control_lora)
    studio_version: str = __version__

    # ------------------------------------------------------------------------------------------ dict / TOML
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["loras"] = [{k: v for k, v in lora.items() if v is not None} for lora in data["loras"]]
        return {k: v for k, v in data.items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str = "recipe") -> "Recipe":
        if not isinstance(data, dict):
            raise RecipeError(f"{origin}: a recipe is a table of settings, got {type(data).__name__}")
        data = dict(data)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(str(k) for k in set(data) - known)
        if unknown:
            raise RecipeError(f"{origin}: unknown recipe keys {unknown}")
        if "model" not in data or "prompt" not in data:
            raise RecipeError(f"{origin}: a recipe needs at least 'model' and 'prompt'")
        loras = []
        raw_loras = data.pop("loras", []) or []
        if not isinstance(raw_loras, list) or len(raw_loras) > MAX_LORAS:
            raise RecipeError(f"{origin}: 'loras' must be a list of at most {MAX_LORAS} tables")
        for i, item in enumerate(raw_loras):
            if not isinstance(item, dict) or "source" not in item:
                raise RecipeError(f"{origin}: LoRA #{i + 1} needs a 'source'")
            bad = sorted(set(item) - set(LoraRecipe.__dataclass_fields__))
            if bad:
                raise RecipeError(f"{origin}: LoRA #{i + 1} has unknown keys {bad}")
            loras.append(_lora_entry(item, f"{origin}: LoRA #{i + 1}"))
        try:
            recipe = cls(loras=loras, **data)
            recipe.check()
            recipe.seed = int(recipe.seed)
            recipe.steps = None if recipe.steps is None else int(recipe.steps)
            recipe.width = None if recipe.width is None else int(recipe.width)
            recipe.height = None if recipe.height is None else int(recipe.height)
            recipe.guidance = None if recipe.guidance is None else float(recipe.guidance)
            if not isinstance(recipe.runtime, str):
                raise ValueError(f"runtime must be a string such as 'auto', got {recipe.runtime!r}")
            from .recipe_inputs import check_mode_fields

            check_mode_fields(recipe)
        except (TypeError, ValueError, StudioError) as e:
            raise RecipeError(f"{origin}: {e}") from None
        return recipe

    def check(self, limits=None) -> None:
        """Every field's type and range (:mod:`studio.settings`; ``limits`` as there, ``None``: types only).

        The strategy is checked as a name with a table of values; whether this studio has it is decided where
        the recipe is used (the web app keeps its own strategy when a recipe names an unknown one)."""
        from .settings import check_settings, check_strategy_types

        if not isinstance(self.model, str) or len(self.model) > 4096:
            raise RecipeError(f"model must be a name or path, got {str(self.model)[:60]!r}")
        if not isinstance(self.studio_version, str):
            raise RecipeError(f"studio_version must be text, got {str(self.studio_version)[:60]!r}")
        check_strategy_types(self.strategy, self.strategy_params)
        checked = check_settings(prompt=self.prompt, negative_prompt=self.negative_prompt, steps=self.steps,
                                 guidance=self.guidance, width=self.width, height=self.height, seed=self.seed,
                                 scheduler=self.scheduler, limits=limits)
        for name, value in checked.items():  # normalised: whole numbers as int, guidance as float
            setattr(self, name, value)

    def with_sources(self, policy, origin: str) -> "Recipe":
        """This recipe with every LoRA source resolved through ``policy`` (:class:`studio.path_policy.PathPolicy`):
        only files in the folders the user allowed are ever opened."""
        from dataclasses import replace

        from fusion.region_masks import is_mask_file

        loras = [replace(lora, source=str(policy.resolve(lora.source, origin, lora.sha256)),
                         region=str(policy.resolve(lora.region, origin)) if is_mask_file(lora.region) else lora.region)
                 for lora in self.loras]
        return replace(self, loras=loras)

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    @classmethod
    def from_toml(cls, text: str, origin: str = "recipe") -> "Recipe":
        if not isinstance(text, str):
            raise RecipeError(f"{origin}: a recipe is TOML text")
        if len(text) > MAX_TEXT_CHARS:
            raise RecipeError(f"{origin}: the recipe has {len(text)} characters; at most {MAX_TEXT_CHARS} are read")
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise RecipeError(f"{origin}: invalid TOML ({str(e)[:200]})") from None
        except RecursionError:
            raise RecipeError(f"{origin}: invalid TOML (nested too deeply)") from None
        return cls.from_dict(data, origin)

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        """Read a recipe from a ``.toml`` file or a PNG made by the studio (or by A1111)."""
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"{path}: file not found")
        size = path.stat().st_size
        if path.suffix.lower() == ".png":
            if size > MAX_PNG_BYTES:
                raise RecipeError(f"{path}: {size} bytes is more than the {MAX_PNG_BYTES} a recipe PNG may have")
            return cls.from_png(path)
        if size > 4 * MAX_TEXT_CHARS:
            raise RecipeError(f"{path}: {size} bytes is more than a recipe may have")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise RecipeError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        return cls.from_toml(text, str(path))

    # ------------------------------------------------------------------------------------------ A1111 text
    def a1111_parameters(self) -> str:
        tags = " ".join(f"<lora:{lora.name or Path(lora.source).stem}:{lora.weight:g}>" for lora in self.loras)
        prompt = f"{self.prompt} {tags}".strip()
        fields = [
            ("Steps", self.steps),
            ("Sampler", self.scheduler or "default"),
            ("CFG scale", f"{self.guidance:g}"),
            ("Seed", self.seed),
            ("Size", f"{self.width}x{self.height}"),
            ("Model", self.model),
        ]
        hashes = ", ".join(f"{lora.name or Path(lora.source).stem}: {lora.sha256[:12]}" for lora in self.loras if lora.sha256)
        if hashes:
            fields.append(("Lora hashes", json.dumps(hashes)))
        fields.append(("Composition", self.strategy))
        fields.append(("Version", f"lora-composition-studio {self.studio_version}"))
        line = ", ".join(f"{k}: {v}" for k, v in fields)
        negative = f"\nNegative prompt: {self.negative_prompt}" if self.negative_prompt else ""
        return f"{prompt}{negative}\n{line}"

    @classmethod
    def from_a1111(cls, text: str, origin: str = "parameters") -> "Recipe":
        """Read an A1111 "infotext" in time linear in its length (no backtracking regular expression runs over
        the prompt); texts over ``MAX_TEXT_CHARS`` are refused unread."""
        if not isinstance(text, str):
            raise RecipeError(f"{origin}: the A1111 parameters are not text")
        if len(text) > MAX_TEXT_CHARS:
            raise RecipeError(f"{origin}: the A1111 parameters have {len(text)} characters; at most "
                              f"{MAX_TEXT_CHARS} are read")
        lines = text.strip().split("\n")
        last = lines[-1]
        if not (last.startswith("Steps: ") or ", Steps: " in last):
            raise RecipeError(f"{origin}: not an A1111 parameters text (no 'Steps:' line)")
        settings = _a1111_fields(last)
        body = lines[:-1]
        negative = ""
        for i, line in enumerate(body):
            if line.startswith("Negative prompt:"):
                negative = "\n".join([line.removeprefix("Negative prompt:").strip(), *body[i + 1 :]])
                body = body[:i]
                break
        prompt, tags = _split_lora_tags("\n".join(body))
        if len(tags) > MAX_LORAS:
            raise RecipeError(f"{origin}: {len(tags)} LoRA tags; at most {MAX_LORAS} are read")
        loras = []
        for name, weight in tags:
            try:
                value = float(weight)
            except ValueError:
                value = float("nan")
            if not math.isfinite(value):
                raise RecipeError(f"{origin}: the weight of <lora:{name[:60]}:{weight[:20]}> is not a number")
            loras.append(LoraRecipe(source=name, name=name, weight=value))
        size = settings.get("Size")
        width = height = None
        if size is not None:
            parts = size.split("x")
            if len(parts) != 2 or not all(p.strip().isascii() and p.strip().isdigit() for p in parts):
                raise RecipeError(f"{origin}: Size must look like 1024x768, got {size[:40]!r}")
            width, height = (int(p) for p in parts)
        sampler = _diffusers_scheduler(settings.get("Sampler"))
        recipe = cls(
            model=settings.get("Model", ""), prompt=prompt, negative_prompt=negative,
            strategy=settings.get("Composition", "merge"), loras=loras, seed=settings.get("Seed", 0),
            steps=settings.get("Steps"), guidance=settings.get("CFG scale"), width=width, height=height,
            scheduler=sampler,
        )
        try:
            recipe.check()
            recipe.seed = int(recipe.seed)
            recipe.steps = None if recipe.steps is None else int(recipe.steps)
            recipe.guidance = None if recipe.guidance is None else float(recipe.guidance)
        except StudioError as e:
            raise RecipeError(f"{origin}: {e}") from None
        return recipe

    # ------------------------------------------------------------------------------------------------- PNG
    def png_info(self) -> PngImagePlugin.PngInfo:
        info = PngImagePlugin.PngInfo()
        info.add_itxt(RECIPE_CHUNK, self.to_toml())
        info.add_itxt(A1111_CHUNK, self.a1111_parameters())
        return info

    def save_png(self, image: Image.Image, path: str | Path) -> Path:
        """Write ``image`` with this recipe embedded, atomically (temporary file + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", pnginfo=self.png_info())
        atomic_write_bytes(path, buffer.getvalue())
        return path

    @classmethod
    def from_png(cls, path: str | Path | Image.Image) -> "Recipe":
        origin = "image" if isinstance(path, Image.Image) else str(path)
        try:
            image = path if isinstance(path, Image.Image) else Image.open(path)
            # the text chunks before the pixels; pixels are decoded only for a small image (never a bomb)
            texts = dict(image.info)
            if RECIPE_CHUNK not in texts and A1111_CHUNK not in texts and image.width * image.height <= 4096 * 4096:
                texts.update(getattr(image, "text", {}) or {})
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise RecipeError(f"{origin}: cannot read PNG ({str(e)[:200]})") from None
        texts = {k: v for k, v in texts.items() if isinstance(v, str)}
        if RECIPE_CHUNK in texts:
            return cls.from_toml(texts[RECIPE_CHUNK], origin)
        if A1111_CHUNK in texts:
            return cls.from_a1111(texts[A1111_CHUNK], origin)
        raise RecipeError(f"{origin}: the PNG carries no studio recipe and no A1111 parameters")


def _a1111_fields(line: str) -> dict[str, str]:
    """``Key: value, Key: "quoted, value", ...`` -> dict, scanning ``line`` once (each field costs its length)."""
    key_at = re.compile(r" *([\w ]{1,40}): *")  # anchored at a position, at most ~40 characters tried
    quoted_at = re.compile(r'"(?:[^"\\]|\\.)*"')
    fields: dict[str, str] = {}
    pos, n = 0, len(line)
    while pos < n:
        key = key_at.match(line, pos)
        if key is None:  # not a field: skip to the next comma
            comma = line.find(",", pos)
            pos = n if comma < 0 else comma + 1
            continue
        pos = key.end()
        quoted = quoted_at.match(line, pos) if pos < n and line[pos] == '"' else None
        if quoted is not None:
            value, pos = quoted.group(0)[1:-1], quoted.end()
            comma = line.find(",", pos)
            pos = n if comma < 0 else comma + 1
        else:
            comma = line.find(",", pos)
            end = n if comma < 0 else comma
            value, pos = line[pos:end], end + 1
        fields[key.group(1).strip()] = value.strip()
    return fields


def _split_lora_tags(text: str) -> tuple[str, list[tuple[str, str]]]:
    """The prompt without its ``<lora:name[:weight][:...]>`` tags (and the spaces before them), and the tags'
    (name, weight text), in one pass over ``text``."""
    parts: list[str] = []
    tags: list[tuple[str, str]] = []
    pos = 0
    while True:
        start = text.find("<lora:", pos)
        end = text.find(">", start) if start >= 0 else -1
        if start < 0 or end < 0:
            parts.append(text[pos:])
            break
        parts.append(text[pos:start].rstrip())
        fields = text[start + len("<lora:"):end].split(":")
        name = fields[0].strip()
        if name:
            tags.append((name, fields[1].strip() if len(fields) > 1 and fields[1].strip() else "1"))
        pos = end + 1
    return "".join(parts).strip(), tags


def _lora_entry(item: dict[str, Any], where: str) -> LoraRecipe:
    """A recipe's LoRA table with every field of the right type (source text, finite weight, window in [0, 1])."""
    from .settings import check_blocks, check_number

    try:
        source = item["source"]
        if not isinstance(source, str) or not source or len(source) > 4096:
            raise RecipeError(f"{where}: source must be a file name or path, got {str(source)[:60]!r}")
        for key in ("name", "sha256", "region", "prompt"):
            if item.get(key) is not None and not isinstance(item[key], str):
                raise RecipeError(f"{where}: {key} must be text, got {item[key]!r:.60}")
        weight = check_number(f"{where}: weight", item.get("weight", 1.0), -100.0, 100.0)
        start = check_number(f"{where}: start", item.get("start", 0.0), 0.0, 1.0)
        end = check_number(f"{where}: end", item.get("end", 1.0), 0.0, 1.0)
        check_blocks(item.get("blocks"), where)
    except StudioError as e:
        raise RecipeError(str(e)) from None
    return LoraRecipe(**{**item, "weight": weight, "start": start, "end": end})


def _diffusers_scheduler(sampler: str | None) -> str | None:
    """The ``Sampler`` of an infotext when it names a diffusers scheduler (the studio writes those); A1111's
    own sampler names ("Euler a", "DPM++ 2M") mean nothing to diffusers and leave the model's default."""
    from .settings import check_scheduler

    if not sampler or sampler == "default":
        return None
    try:
        return check_scheduler(sampler)
    except StudioError:
        return None
