"""``studio score DIR``: (re)score a folder of images with CLIPScore and rebuild its report.

The images come from the folder's manifest (a ``studio batch`` folder) or, without one, from the recipes
embedded in its PNGs (any folder of ``studio render`` images); then a manifest is written for them. Scores are
computed in batches and stored back into the manifest, which is replaced atomically.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Mapping

from PIL import Image

from pipelines.errors import RecipeError, StudioError

from . import manifest as mf
from .recipe import Recipe
from .scoring import ClipScorer


def records_from_pngs(folder: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Manifest records for the studio PNGs of ``folder`` (recursively; ``grids/`` excluded)."""
    records, skipped, prompts = [], [], {}
    for path in sorted(folder.rglob("*.png")):
        rel = path.relative_to(folder)
        if rel.parts[0] == "grids":
            continue
        try:
            recipe = Recipe.from_png(path)
        except RecipeError as e:
            skipped.append(str(e))
            continue
        data = recipe.to_dict()
        normal = {k: v for k, v in data.items() if k != "studio_version"}
        rid = hashlib.sha256(json.dumps(normal, sort_keys=True).encode()).hexdigest()[:16]
        index = prompts.setdefault(recipe.prompt, len(prompts))
        records.append({
            "id": rid, "status": "ok", "file": rel.as_posix(), "recipe": data,
            "item": {"prompt_index": index, "position": len(records), "stack": "", "strategy": recipe.strategy,
                     "row": recipe.strategy, "column": f"seed {recipe.seed}", "group": recipe.prompt,
                     "weights": [lora.weight for lora in recipe.loras], "concepts": {}},
            "scores": {}, "timings": {},
        })
    return records, skipped


def score_folder(folder: str | Path, scorer: ClipScorer, *, concepts: Mapping[str, str] | None = None,
                 batch_size: int = 32, progress: Callable[[int, int], None] | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """Score every image of ``folder``; returns the records (written back to the manifest) and warnings."""
    folder = Path(folder)
    if not folder.is_dir():
        raise StudioError(f"{folder}: folder not found")
    warnings: list[str] = []
    if mf.manifest_files(folder):
        for path in mf.manifest_files(folder):
            mf.repair_tail(path)
        mf.merge_shards(folder)
        records = list(mf.load_records(folder).values())
    else:
        records, warnings = records_from_pngs(folder)
        if not records:
            raise StudioError(f"{folder}: no manifest.jsonl and no PNG with a studio recipe")
    if concepts:
        names = {lora.get("name") for r in records for lora in (r.get("recipe") or {}).get("loras", [])}
        unknown = sorted(set(concepts) - names)
        if unknown:
            raise StudioError(f"--concept {unknown}: no image of {folder} has a LoRA of that name "
                              f"(names: {sorted(n for n in names if n)})")
    todo = []
    for record in records:
        if record.get("status") != "ok":
            continue
        if concepts:
            record["item"]["concepts"] = {**record["item"].get("concepts", {}), **concepts}
        if not (folder / record["file"]).is_file():
            warnings.append(f"{record['file']}: listed in the manifest but missing; not scored")
            continue
        todo.append(record)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        images, texts = [], []
        for record in chunk:
            with Image.open(folder / record["file"]) as image:
                images.append(image.convert("RGB"))
            names = list(record["item"].get("concepts", {}))
            texts.append([record["recipe"]["prompt"], *(record["item"]["concepts"][n] for n in names)])
        for record, values in zip(chunk, scorer.score_many(images, texts)):
            names = list(record["item"].get("concepts", {}))
            record["scores"] = {"clip": values[0], "concepts": dict(zip(names, values[1:]))}
            record["scorer"] = scorer.name
        if progress is not None:
            progress(min(start + batch_size, len(todo)), len(todo))
    mf.rewrite(folder / mf.MANIFEST, records)
    return records, warnings
