"""`Recipe`: everything needed to reproduce an image, as TOML and inside the PNG itself.

Every studio PNG carries two text chunks:

* ``studio_recipe``: the recipe as TOML (model, LoRAs with their SHA-256, strategy and parameters, prompt,
  negative prompt, seed, steps, guidance, size, scheduler, studio version);
* ``parameters``: the A1111 "infotext" (prompt with ``<lora:name:weight>`` tags, ``Negative prompt:``, and a
  ``Steps: …, Sampler: …, CFG scale: …, Seed: …, Size: …`` line), so other tools show the settings too.

:meth:`Recipe.from_png` reads either chunk; an A1111 image without a studio chunk gives a recipe with what
A1111 records (LoRAs by name, to be found in a LoRA library).
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
from PIL import Image, PngImagePlugin

from pipelines.errors import RecipeError

from . import __version__

RECIPE_CHUNK = "studio_recipe"
A1111_CHUNK = "parameters"


@dataclass
class LoraRecipe:
    source: str
    weight: float = 1.0
    name: str | None = None
    blocks: dict[str, float] | str | None = None
    start: float = 0.0
    end: float = 1.0
    sha256: str | None = None

    def to_lora_kwargs(self) -> dict[str, Any]:
        return {"source": self.source, "weight": self.weight, "name": self.name, "blocks": self.blocks,
                "start": self.start, "end": self.end}


@dataclass
class Recipe:
    model: str
    prompt: str
    negative_prompt: str = ""
    strategy: str = "merge"
    strategy_params: dict[str, Any] = field(default_factory=dict)
    loras: list[LoraRecipe] = field(default_factory=list)
    seed: int = 0
    steps: int = 30
    guidance: float = 5.0
    width: int = 1024
    height: int = 1024
    scheduler: str | None = None
    studio_version: str = __version__

    # ------------------------------------------------------------------------------------------ dict / TOML
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["loras"] = [{k: v for k, v in lora.items() if v is not None} for lora in data["loras"]]
        return {k: v for k, v in data.items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str = "recipe") -> "Recipe":
        data = dict(data)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise RecipeError(f"{origin}: unknown recipe keys {unknown}")
        if "model" not in data or "prompt" not in data:
            raise RecipeError(f"{origin}: a recipe needs at least 'model' and 'prompt'")
        loras = []
        for i, item in enumerate(data.pop("loras", []) or []):
            if not isinstance(item, dict) or "source" not in item:
                raise RecipeError(f"{origin}: LoRA #{i + 1} needs a 'source'")
            bad = sorted(set(item) - set(LoraRecipe.__dataclass_fields__))
            if bad:
                raise RecipeError(f"{origin}: LoRA #{i + 1} has unknown keys {bad}")
            loras.append(LoraRecipe(**item))
        try:
            recipe = cls(loras=loras, **data)
            recipe.seed, recipe.steps = int(recipe.seed), int(recipe.steps)
            recipe.width, recipe.height = int(recipe.width), int(recipe.height)
            recipe.guidance = float(recipe.guidance)
        except (TypeError, ValueError) as e:
            raise RecipeError(f"{origin}: {e}") from None
        return recipe

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    @classmethod
    def from_toml(cls, text: str, origin: str = "recipe") -> "Recipe":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise RecipeError(f"{origin}: invalid TOML ({e})") from None
        return cls.from_dict(data, origin)

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        """Read a recipe from a ``.toml`` file or a PNG made by the studio (or by A1111)."""
        path = Path(path)
        if not path.exists():
            raise RecipeError(f"{path}: file not found")
        if path.suffix.lower() == ".png":
            return cls.from_png(path)
        return cls.from_toml(path.read_text(encoding="utf-8"), str(path))

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
        lines = text.strip().split("\n")
        if not lines or not re.search(r"(^|, )Steps: ", lines[-1]):
            raise RecipeError(f"{origin}: not an A1111 parameters text (no 'Steps:' line)")
        settings = dict(
            (m.group(1), m.group(2).strip('"'))
            for m in re.finditer(r'\s*([\w ]+):\s*("(?:[^"\\]|\\.)*"|[^,]*)(?:,|$)', lines[-1])
        )
        body = lines[:-1]
        negative = ""
        for i, line in enumerate(body):
            if line.startswith("Negative prompt:"):
                negative = "\n".join([line.removeprefix("Negative prompt:").strip(), *body[i + 1 :]])
                body = body[:i]
                break
        prompt = "\n".join(body)
        loras = [LoraRecipe(source=m.group(1), name=m.group(1), weight=float(m.group(2) or 1.0))
                 for m in re.finditer(r"<lora:([^:>]+)(?::([-\d.eE+]+))?[^>]*>", prompt)]
        prompt = re.sub(r"\s*<lora:[^>]*>", "", prompt).strip()
        try:
            width, height = (int(x) for x in settings.get("Size", "1024x1024").split("x"))
            return cls(
                model=settings.get("Model", ""),
                prompt=prompt,
                negative_prompt=negative,
                strategy=settings.get("Composition", "merge"),
                loras=loras,
                seed=int(settings.get("Seed", 0)),
                steps=int(settings.get("Steps", 30)),
                guidance=float(settings.get("CFG scale", 5.0)),
                width=width,
                height=height,
                scheduler=settings.get("Sampler"),
            )
        except ValueError as e:
            raise RecipeError(f"{origin}: {e}") from None

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
            texts = dict(getattr(image, "text", {}) or image.info)
        except (OSError, ValueError) as e:
            raise RecipeError(f"{origin}: cannot read PNG ({e})") from None
        if RECIPE_CHUNK in texts:
            return cls.from_toml(texts[RECIPE_CHUNK], origin)
        if A1111_CHUNK in texts:
            return cls.from_a1111(texts[A1111_CHUNK], origin)
        raise RecipeError(f"{origin}: the PNG carries no studio recipe and no A1111 parameters")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
