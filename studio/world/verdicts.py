"""The concept judge's verdicts for a batch folder of tiny-world images, and what they say about the strategies.

CLIPScore from the world's tiny CLIP is not a measure of composition here: on fresh renders it names the right
shape about as often as chance (``assets/world/metrics.json``: 21.9% for five shapes), so a noise image can
outscore a correct one. The concept judge (:mod:`studio.world.judge`, 99%+ on every attribute) reads what each
image shows; :func:`judge_folder` stores, per image, whether each requested LoRA concept is the judge's top
prediction (``record["judge"]``: LoRA name -> true/false), and the batch report shows these verdicts beside the
CLIPScores. :func:`strategy_guide` turns a folder's verdicts into the demo report's advice: which strategies
showed every concept of two- and three-LoRA stacks, with the measured reasons why others did not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from pipelines.assets import assets_root

from .concepts import ATTRIBUTES, HELD_OUT

WORLD_MODELS = ("tiny-sdxl", "tiny-flux")
_BY_NAME = {c.name: c for c in HELD_OUT}


def held_out_names(record: dict[str, Any]) -> dict[str, str]:
    """``{concept label: held-out concept name}`` for the record's requested concepts: a label that is itself a
    held-out name (the demo's), or the name of a recipe LoRA whose file is a world LoRA (``subject-zorb...``)."""
    concepts = (record.get("item") or {}).get("concepts") or {}
    by_label = {}
    for lora in (record.get("recipe") or {}).get("loras") or []:
        stem = Path(str(lora.get("source", ""))).stem
        if stem in _BY_NAME:
            by_label[lora.get("name") or stem] = stem
    return {label: label if label in _BY_NAME else by_label.get(label) for label in concepts}


def judgeable(record: dict[str, Any]) -> bool:
    """A finished tiny-world image whose requested concepts are all the world's held-out LoRA concepts."""
    model = (record.get("recipe") or {}).get("model", "")
    names = held_out_names(record)
    return record.get("status") == "ok" and model in WORLD_MODELS and bool(names) and all(names.values())


def judge_folder(folder: str | Path, records: Sequence[dict[str, Any]], judge=None) -> list[dict[str, Any]]:
    """Every record, the judgeable ones with ``judge`` verdicts added (``{lora name: detected}``)."""
    from PIL import Image

    from .judge import load_judge

    folder = Path(folder)
    todo = [r for r in records if "judge" not in r and judgeable(r) and (folder / r["file"]).is_file()]
    if not todo:
        return list(records)
    judge = judge or load_judge(assets_root() / "judges" / "concept-judge")
    verdicts: dict[str, dict[str, bool]] = {}
    for start in range(0, len(todo), 64):
        chunk = todo[start:start + 64]
        seen = judge.predict([Image.open(folder / r["file"]).convert("RGB") for r in chunk])
        for record, top in zip(chunk, seen):
            verdicts[record["id"]] = {label: top[_BY_NAME[name].attribute] == _BY_NAME[name].value
                                      for label, name in held_out_names(record).items()}
    return [{**r, "judge": verdicts[r["id"]]} if r["id"] in verdicts else r for r in records]


def clip_shape_accuracy() -> tuple[float, float] | None:
    """(tiny CLIP's shape accuracy on fresh renders, chance) from the shipped world metrics, if present."""
    try:
        metrics = json.loads((assets_root() / "world" / "metrics.json").read_text())
        return float(metrics["judges"]["clip"]["vae"]["shape"]), 1.0 / len(ATTRIBUTES["shape"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def success_by_size(records: Sequence[dict[str, Any]]) -> dict[str, dict[int, tuple[int, int]]]:
    """Per strategy label and stack size (number of LoRAs): (images showing every concept, images judged)."""
    out: dict[str, dict[int, tuple[int, int]]] = {}
    for r in records:
        if "judge" not in r:
            continue
        label, n = r["item"]["strategy"], len(r["judge"])
        hits, total = out.setdefault(label, {}).get(n, (0, 0))
        out[label][n] = (hits + all(r["judge"].values()), total + 1)
    return out


# Why a strategy misses concepts in this world, measured in the README's "tiny world" section: the LoRAs' trigger
# words (zorb, quix, striped, dotted, bricks, waves) are words the base model never learned, so a concept appears
# only where its LoRA acts with enough strength for enough steps.
REASONS = {
    "composite": "averages the N LoRA-conditioned predictions every step, so each LoRA acts at 1/N of its strength",
    "cmlora": "averages the LoRAs' predictions like composite (a frequency-based order and caching), so each acts "
              "at about 1/N strength",
    "switch": "runs one LoRA at a time, so each LoRA acts in only about 1/N of the steps",
    "klora": "picks one of two LoRAs per layer (K-LoRA), so the other's concept is lost where it was not chosen",
}


def strategy_guide(records: Sequence[dict[str, Any]]) -> list[str]:
    """Plain-text lines for the report: measured success per strategy and stack size, best first, with reasons."""
    table = success_by_size(records)
    if not table:
        return []
    lines = []
    sizes = sorted({n for per in table.values() for n in per})
    for n in sizes:
        ranked = sorted(((label, per[n]) for label, per in table.items() if n in per),
                        key=lambda kv: -kv[1][0] / kv[1][1])
        best = [f"{label} {hits}/{total}" for label, (hits, total) in ranked if hits]
        none = [label for label, (hits, _) in ranked if not hits]
        text = f"{n} LoRAs: every concept shown by " + (", ".join(best) if best else "no strategy")
        if none:
            text += f"; none by {', '.join(none)}"
        lines.append(text + ".")
    for label, why in REASONS.items():
        if label in table:
            lines.append(f"{label}: {why}.")
    overall = {label: (sum(h for h, _ in per.values()), sum(t for _, t in per.values())) for label, per in table.items()}
    top = max(h / t for h, t in overall.values())
    leaders = [label for label, (h, t) in overall.items() if h / t == top]
    missed = [label for label, (h, _) in overall.items() if not h]
    lines.append("Unknown words: the trigger words (zorb, quix, striped, dotted, bricks, waves) mean nothing to the "
                 "base model, so a concept appears only where its LoRA acts at (near) full strength in enough steps. "
                 f"Here {', '.join(leaders)} showed every concept most often ({top:.0%} of images)"
                 + (f"; {', '.join(missed)} never did" if missed else "") + ".")
    accuracy = clip_shape_accuracy()
    if accuracy:
        lines.append(f"CLIPScore here comes from the world's tiny CLIP, which names the right shape in "
                     f"{accuracy[0]:.0%} of fresh renders (chance {accuracy[1]:.0%}): read the judge's verdicts, "
                     "not the CLIPScores, for subjects.")
    return lines


__all__ = ["clip_shape_accuracy", "judge_folder", "judgeable", "strategy_guide", "success_by_size"]
