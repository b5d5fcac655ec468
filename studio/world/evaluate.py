"""Measuring the world: do the base models draw what they are asked, do the LoRAs show their concept, do the
judges see correctly?

Everything renders through the public :class:`studio.Studio` API on the shipped assets, so these numbers are
what a user of ``tiny-sdxl`` / ``tiny-flux`` gets.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .concepts import ATTRIBUTES, BASE, HELD_OUT, HeldOut, SceneSampler

from .layout import BUILD_ASSETS as ASSETS  # measures (and writes metrics into) the source tree's world


def _render(studio, prompts: list[str], seed: int, loras=(), strategy="merge", **kw):
    images = []
    for i, prompt in enumerate(prompts):
        images.append(studio.compose(prompt, loras, strategy, seed=seed + i, **kw).image)
    return images


def base_accuracy(studio, judge, n: int = 48, seed: int = 0) -> dict[str, float]:
    """Judge accuracy per attribute on renders of random base-concept prompts, plus all-correct rate."""
    rng = np.random.default_rng(seed)
    scenes = [SceneSampler(pool=dict(BASE)).sample(rng) for _ in range(n)]
    predictions = judge.predict(_render(studio, [s.caption() for s in scenes], seed))
    out = {a: float(np.mean([p[a] == s.value(a) for p, s in zip(predictions, scenes)])) for a in ATTRIBUTES}
    out["all"] = float(np.mean([all(p[a] == s.value(a) for a in ATTRIBUTES) for p, s in zip(predictions, scenes)]))
    # position is the hardest attribute for the tiny models (a global layout named by the caption's last word)
    out["all_but_position"] = float(np.mean([all(p[a] == s.value(a) for a in ATTRIBUTES if a != "position")
                                             for p, s in zip(predictions, scenes)]))
    return out


def lora_alone(studio, judge, lora: str | Path, concept: HeldOut, n: int = 20, seed: int = 100,
               family: str | None = None) -> float:
    """How often the judge sees the LoRA's concept in renders of prompts that call it as ``family``'s adapters are
    called (its trigger word, or the class word a subject is bound to)."""
    rng = np.random.default_rng(seed)
    sampler = SceneSampler(pool=dict(BASE), fixed={concept.attribute: concept.value})
    scenes = [sampler.sample(rng) for _ in range(n)]
    predictions = judge.predict(_render(studio, [s.caption(family) for s in scenes], seed, loras=[str(lora)]))
    return float(np.mean([p[concept.attribute] == concept.value for p in predictions]))


# metrics.json key -> assets folder of each adapter set of the world (one file per held-out concept and family)
ADAPTER_SETS = {"loras": "loras", "qr_loras": "qr-loras", "shira_loras": "shira-loras"}


def adapters_alone(studio, judge, assets: Path, family: str, key: str, n_lora: int = 20) -> dict[str, float]:
    """:func:`lora_alone` for every concept of one adapter set (``key`` of :data:`ADAPTER_SETS`)."""
    folder = assets / ADAPTER_SETS[key] / f"tiny-{family}"
    return {concept.name: lora_alone(studio, judge, folder / f"{concept.name}.safetensors", concept, n_lora,
                                     family=family)
            for concept in HELD_OUT}


def evaluate_world(assets: Path = ASSETS, families=("sdxl", "flux"), n_base: int = 48, n_lora: int = 20,
                   adapter_sets: tuple[str, ...] | None = None) -> dict:
    """The base models' accuracy and every adapter set alone; with ``adapter_sets`` only those sets (no base)."""
    from studio import Studio

    from .judge import load_judge

    judge = load_judge(assets / "judges" / "concept-judge")
    report: dict = {"families": {}}
    for family in families:
        studio = Studio(f"tiny-{family}")
        entry = {} if adapter_sets else {"base": base_accuracy(studio, judge, n_base)}
        for key in adapter_sets or [k for k, folder in ADAPTER_SETS.items()
                                    if (assets / folder / f"tiny-{family}").is_dir()]:
            entry[key] = adapters_alone(studio, judge, assets, family, key, n_lora)
        report["families"][family] = entry
    return report


def update_report(path: Path, partial: dict) -> dict:
    """``path``'s report with the family entries of ``partial`` written over (other entries kept)."""
    report = json.loads(path.read_text()) if path.exists() else {"families": {}}
    for family, entry in partial["families"].items():
        report.setdefault("families", {}).setdefault(family, {}).update(entry)
    write_report(report, path)
    return report


def evaluate_judges(assets: Path = ASSETS, n: int = 1000, seed: int = 99) -> dict:
    """Judge and tiny-CLIP accuracy on fresh renderer images of every concept (a seed no training set used),
    clean and through the shipped VAE (what generated images go through)."""
    from diffusers import AutoencoderKL

    from . import tokenizer
    from .clip import zero_shot_accuracy
    from .data import render_set
    from .judge import accuracy, load_judge

    data = render_set(SceneSampler(pool=dict(ATTRIBUTES)), n, seed, desc="eval renders")
    vae = AutoencoderKL.from_pretrained(str(assets / "models" / "tiny-sdxl" / "vae"), dtype=torch.float32)
    judge = load_judge(assets / "judges" / "concept-judge")
    import open_clip

    clip_dir = assets / "models" / "tiny-clip"
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{clip_dir}")
    model.eval()
    tok = tokenizer.clip_tokenizer(clip_dir) if (clip_dir / "vocab.json").exists() else None
    if tok is None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(clip_dir))
    with torch.no_grad():
        return {
            "judge": {"clean": accuracy(judge, data), "vae": accuracy(judge, data, vae)},
            "clip": {"clean": zero_shot_accuracy(model, tok, data), "vae": zero_shot_accuracy(model, tok, data, vae)},
        }


def write_report(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
