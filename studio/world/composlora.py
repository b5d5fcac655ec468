"""ComposLoRA-mini: every 2- and 3-LoRA composition of the tiny world under every strategy, judged.

The benchmark follows the evaluation of the multi-LoRA composition papers (ComposLoRA in Zhong et al. 2024,
reused by CMLoRA): one subject LoRA plus a style and/or a background LoRA, rendered with each strategy, and
asked whether the image shows *every* requested concept. Here the question goes to the world's concept judge
(:mod:`.judge`) instead of GPT-4V, and CLIPScore comes from the world's tiny CLIP.

Compositions: 2 subjects x (2 styles + 2 backgrounds) two-LoRA stacks and 2 x 2 x 2 three-LoRA stacks, 16 in
all. Strategies defined for two LoRAs (``klora``, ``max_loras = 2``) run on the two-LoRA half. ``qr`` runs twice: on the
ordinary LoRAs (its orthogonal merge) and, when they are built, on the world's QR-LoRA adapters (the merge
the QR-LoRA paper describes), reported as ``qr[qr-lora]``. Strategies asked for on the SHiRA stacks run on the
world's SHiRA adapters (:mod:`.shira`) in the same compositions, reported as ``<strategy>[shira]``.

Rendering is an ordinary resumable batch (:func:`studio.batch.run_batch`), so an interrupted benchmark picks up
where it stopped and leaves a browsable ``report.html``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipelines.assets import assets_root

from .concepts import HELD_OUT
from .demo import TINY_CLIP_NAME, Composition, composition_items

QR_LORA_LABEL = "qr[qr-lora]"
SHIRA_SUFFIX = "[shira]"
COLORS = ("red", "green", "blue", "yellow")


def compositions() -> list[Composition]:
    """The 16 compositions, two-LoRA ones first; colours and positions vary, shapes are large (textures
    stay readable at 64x64)."""
    subjects = [c.name for c in HELD_OUT if c.category == "subject"]
    styles = [c.name for c in HELD_OUT if c.category == "style"]
    backgrounds = [c.name for c in HELD_OUT if c.category == "background"]
    stacks = [(s, x) for s in subjects for x in styles + backgrounds]
    stacks += [(s, st, bg) for s, st, bg in itertools.product(subjects, styles, backgrounds)]
    return [Composition(stack, COLORS[i % 4], "large", ("center", "left", "right")[i % 3])
            for i, stack in enumerate(stacks)]


def shira_choice(spec: str):
    """A strategy spec (``"composite:reduce=sum"``) labelled for the SHiRA stacks: ``composite(reduce=sum)[shira]``."""
    from dataclasses import replace

    from studio.grid import StrategyChoice

    choice = StrategyChoice.parse(spec)
    return replace(choice, label=f"{choice.label}{SHIRA_SUFFIX}")


def benchmark_items(family: str, strategies: Sequence[str], seeds: Sequence[int], *, assets: Path | None = None,
                    steps: int | None = None, comps: Sequence[Composition] | None = None,
                    shira_strategies: Sequence[str] = ()) -> list:
    """Batch items for every composition x strategy x seed (``qr`` also on the QR-LoRA files), and for every
    composition x ``shira_strategies`` x seed on the world's SHiRA adapters (labels ending in ``[shira]``)."""
    comps = list(comps or compositions())
    assets = assets or assets_root()
    items = []
    for strategy in strategies:
        items += composition_items(comps, family, [strategy], seeds, assets=assets, steps=steps)
        if strategy == "qr" and (assets / "qr-loras" / f"tiny-{family}").is_dir():
            items += composition_items(comps, family, [{"name": "qr", "label": QR_LORA_LABEL}], seeds,
                                       assets=assets, steps=steps, lora_folder="qr-loras")
    if shira_strategies:
        items += composition_items(comps, family, [shira_choice(s) for s in shira_strategies], seeds, assets=assets,
                                   steps=steps, lora_folder="shira-loras")
    prompts = {c.prompt(family): i for i, c in enumerate(comps)}
    for position, item in enumerate(items):  # one report section per composition
        item.position, item.prompt_index = position, prompts[item.prompt]
    return items


def requested(record: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """``{lora name: (attribute, value)}`` of the held-out concepts an image was asked to show."""
    by_name = {c.name: c for c in HELD_OUT}
    return {name: (by_name[name].attribute, by_name[name].value) for name in record["item"]["concepts"]}


@dataclass
class StrategyScore:
    label: str
    images: int
    success: float  # all requested concepts detected
    per_category: dict[str, float]  # subject / style / background detection rate
    clip: tuple[float, float]  # mean, std of the full-prompt CLIPScore
    concept_clip: float  # mean CLIPScore of the LoRAs' concept texts
    seconds: float  # mean render time per image

    def row(self) -> dict[str, Any]:
        return {"strategy": self.label, "images": self.images, "success": self.success,
                **{f"{k}_detected": v for k, v in self.per_category.items()},
                "clip_mean": self.clip[0], "clip_std": self.clip[1], "concept_clip": self.concept_clip,
                "seconds_per_image": self.seconds}


def judge_records(records: Sequence[dict[str, Any]], folder: Path, judge) -> list[dict[str, Any]]:
    """Add ``detected`` (lora name -> bool) to every finished record, judging its PNG."""
    from PIL import Image

    ok = [r for r in records if r.get("status") == "ok"]
    judged = []
    for start in range(0, len(ok), 64):
        chunk = ok[start:start + 64]
        predictions = judge.predict([Image.open(folder / r["file"]).convert("RGB") for r in chunk])
        for record, seen in zip(chunk, predictions):
            detected = {name: seen[attribute] == value for name, (attribute, value) in requested(record).items()}
            judged.append({**record, "detected": detected})
    return judged


def summarise(judged: Sequence[dict[str, Any]]) -> list[StrategyScore]:
    by_strategy: dict[str, list[dict[str, Any]]] = {}
    for record in judged:
        by_strategy.setdefault(record["item"]["strategy"], []).append(record)
    category = {c.name: c.category for c in HELD_OUT}
    scores = []
    for label, records in by_strategy.items():
        per_category: dict[str, list[bool]] = {}
        for r in records:
            for name, hit in r["detected"].items():
                per_category.setdefault(category[name], []).append(hit)
        clip = [r["scores"]["clip"] for r in records if r.get("scores")]
        concept_clip = [v for r in records if r.get("scores") for v in r["scores"]["concepts"].values()]
        scores.append(StrategyScore(
            label=label, images=len(records),
            success=float(np.mean([all(r["detected"].values()) for r in records])),
            per_category={k: float(np.mean(v)) for k, v in sorted(per_category.items())},
            clip=(float(np.mean(clip)), float(np.std(clip))) if clip else (float("nan"), float("nan")),
            concept_clip=float(np.mean(concept_clip)) if concept_clip else float("nan"),
            seconds=float(np.mean([r["timings"]["render_s"] for r in records])),
        ))
    return sorted(scores, key=lambda s: (-s.success, -s.clip[0]))


def markdown_table(scores: Sequence[StrategyScore], merge_label: str = "merge") -> str:
    merge = next((s.seconds for s in scores if s.label == merge_label), None)
    lines = ["| strategy | images | success | subject | style | background | CLIPScore | concept CLIPScore "
             "| s/image | time vs merge |", "|" + "---|" * 10]
    for s in scores:
        c = s.per_category
        ratio = f"{s.seconds / merge:.2f}x" if merge else "n/a"
        lines.append(f"| {s.label} | {s.images} | {s.success:.0%} | {c.get('subject', 0):.0%} | "
                     f"{c.get('style', 0):.0%} | {c.get('background', 0):.0%} | {s.clip[0]:.1f} ± {s.clip[1]:.1f} | "
                     f"{s.concept_clip:.1f} | {s.seconds:.2f} | {ratio} |")
    return "\n".join(lines)


def run_benchmark(out: Path, *, family: str = "sdxl", strategies: Sequence[str] | None = None,
                  seeds: Sequence[int] = (0, 1), steps: int | None = None, assets: Path | None = None,
                  comps: Sequence[Composition] | None = None, reporter=None,
                  shira_strategies: Sequence[str] = ()) -> list[StrategyScore]:
    """Render (resuming), judge and summarise; returns one score per strategy label. ``strategies=[]`` with
    ``shira_strategies`` runs only the SHiRA stacks."""
    from studio import manifest as mf
    from studio.batch import BatchOptions, run_batch

    from .demo import all_strategies
    from .judge import load_judge

    assets = assets or assets_root()
    if strategies is None or (not strategies and not shira_strategies):
        strategies = all_strategies()
    items = benchmark_items(family, strategies, seeds, assets=assets, steps=steps, comps=comps,
                            shira_strategies=shira_strategies)
    run_batch(items, out, BatchOptions(score=True, clip_model=str(assets / "models" / TINY_CLIP_NAME)), reporter)
    planned = {item.id for item in items}
    records = [r for r in mf.load_records(Path(out)).values() if r["id"] in planned]
    judged = judge_records(records, Path(out), load_judge(assets / "judges" / "concept-judge"))
    return summarise(judged)
