"""``studio demo``: real compositions on the tiny world, every registered strategy, one HTML report, offline.

The demo is an ordinary ``studio batch`` (:mod:`studio.batch`): a fixed set of compositions of the world's
LoRAs (subject + style, subject + background, subject + style + background), every strategy in the registry,
two seeds, scored with the world's tiny CLIP for the full prompt and for each LoRA's concept, written with the
batch report. It resumes like any batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipelines.assets import asset_path, assets_root

from .concepts import HeldOut, Scene, held_out

TINY_CLIP_NAME = "tiny-clip"  # assets/models/<this>


@dataclass(frozen=True)
class Composition:
    concepts: tuple[str, ...]  # held-out concept names, subject first
    color: str = "red"
    size: str = "large"
    position: str = "center"

    def held(self) -> list[HeldOut]:
        return [held_out(n) for n in self.concepts]

    def prompt(self, family: str | None = None) -> str:
        """The composition in the world's caption grammar, its subject called as ``family``'s LoRAs call it."""
        chosen = {c.attribute: c.value for c in self.held()}
        return Scene(shape=chosen.get("shape", "circle"), color=self.color, texture=chosen.get("texture", "solid"),
                     background=chosen.get("background", "light"), size=self.size,
                     position=self.position).caption(family)


DEMO_COMPOSITIONS = (
    Composition(("subject-zorb", "style-striped"), "blue"),
    Composition(("subject-quix", "background-waves"), "yellow"),
    Composition(("subject-zorb", "style-dotted", "background-bricks"), "green"),
)


def lora_path(family: str, concept: str, assets: Path | None = None, folder: str = "loras") -> Path:
    """A world LoRA file: ``folder`` is ``loras`` (ordinary formats) or ``qr-loras`` (QR-LoRA adapters);
    ``assets`` defaults to the shipped world (:func:`pipelines.assets.assets_root`)."""
    return (assets or assets_root()) / folder / f"tiny-{family}" / f"{concept}.safetensors"


def composition_items(compositions, family: str, strategies, seeds, *, assets: Path | None = None, steps=None,
                      lora_folder: str = "loras"):
    """Batch items for ``compositions`` on ``tiny-<family>`` (every strategy x seed; a strategy defined for
    fewer LoRAs than a composition has, such as K-LoRA's two, skips it)."""
    from studio.grid import Axes, PromptSpec, StrategyChoice, build_stack, expand

    from studio.strategies import REGISTRY

    choices = [s if isinstance(s, StrategyChoice) else StrategyChoice.parse(s) for s in strategies]
    items = []
    for comp in compositions:
        fitting = [c for c in choices if (REGISTRY[c.name].max_loras or len(comp.concepts)) >= len(comp.concepts)]
        if not fitting:
            continue
        entries = [{"source": str(lora_path(family, c.name, assets, lora_folder)), "name": c.name,
                    "concept": c.concept_text} for c in comp.held()]
        stack = build_stack(" + ".join(comp.concepts), entries, base_dir=None, lora_dir=None, origin="demo")
        prompt = PromptSpec(text=comp.prompt(family))
        axes = Axes(strategies=fitting, seeds=list(seeds), steps=[steps])
        for item in expand(f"tiny-{family}", [prompt], [stack], axes, origin="demo"):
            item.position, item.prompt_index = len(items), compositions.index(comp)
            items.append(item)
    return items


def all_strategies() -> list[str]:
    """Every registered strategy that acts on a plain stack: the demo's stacks carry no regions, so a strategy that
    reads regions (``regional``) would only repeat merge (its stated fallback)."""
    from studio.strategies import REGISTRY

    return [name for name, cls in REGISTRY.items() if not cls.uses_regions]


def run_demo(out: Path, *, family: str = "sdxl", seeds=(0, 1), strategies=None, score: bool = True,
             assets: Path | None = None, reporter=None):
    from studio.batch import BatchOptions, run_batch

    if assets is None:  # the shipped world: each file it needs must be there (a clear error names the first gap)
        for comp in DEMO_COMPOSITIONS:
            for concept in comp.concepts:
                asset_path("loras", f"tiny-{family}", f"{concept}.safetensors", what=f"tiny-{family} LoRA {concept}")
        asset_path("models", f"tiny-{family}", "model_index.json", what=f"tiny-{family} model")
        assets = assets_root()
    items = composition_items(DEMO_COMPOSITIONS, family, strategies or all_strategies(), seeds, assets=assets)
    options = BatchOptions(score=score, clip_model=str(assets / "models" / TINY_CLIP_NAME))
    summary = run_batch(items, out, options, reporter)
    summary.judged = judge_demo(Path(out), {item.id for item in items})
    return summary


def judge_demo(out: Path, planned: set[str]) -> dict[str, tuple[int, int]]:
    """Add the concept judge's verdicts to the demo's manifest and rebuild its report with the advice of
    :func:`studio.world.verdicts.strategy_guide`; returns, per strategy, (images showing every concept, images)."""
    from studio import manifest as mf
    from studio.report import write_outputs

    from .verdicts import judge_folder, strategy_guide, success_by_size

    records = judge_folder(out, list(mf.load_records(out).values()))
    mf.rewrite(out / mf.MANIFEST, records)
    mine = [r for r in records if r["id"] in planned]
    write_outputs(out, records, notes=strategy_guide(mine))
    return {label: (sum(h for h, _ in per.values()), sum(t for _, t in per.values()))
            for label, per in success_by_size(mine).items()}
