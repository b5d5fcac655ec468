"""Two-object scenes in the tiny world (issue 14): the caption grammar, the pair data, the fine-tuning stage
(studio/world/pairs.py) and the shipped bases drawing two objects."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from studio.world.concepts import BASE, Scene, SceneSampler, pair_caption
from studio.world.data import Mixture, render_pairs, render_set, sample_pair
from studio.world.render import render_pair

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("bench_two_subjects", ROOT / "benchmarks" / "bench_two_subjects.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_one_two_object_grammar_for_training_and_the_benchmark():
    left = Scene("circle", "red", "checkered", "light", "small", "left")
    right = Scene("square", "blue", "solid", "light", "small", "right")
    assert pair_caption(left, right) == ("a small red circle, checkered, on a light background, left, "
                                         "and a small blue square, solid, right")
    with pytest.raises(ValueError, match="left object first"):
        pair_caption(right, left)
    bench = _bench()
    for scene in bench.SCENES + bench.BASE_SCENES:
        assert scene.prompt() == pair_caption(scene.scene("left"), scene.scene("right"))
        assert scene.caption("left") == scene.scene("left").caption()  # a regional lane's one-object prompt


def test_pair_data_are_base_concepts_captioned_as_rendered():
    data = render_pairs(6, seed=5)
    again = render_pairs(6, seed=5)
    assert np.array_equal(data.images, again.images) and data.images.shape == (6, 64, 64, 3)
    rng = np.random.default_rng(5)  # the same draws, rendered directly
    for i in range(6):
        left, right = data.pair(i)
        assert (left, right) == sample_pair(rng)
        expected = np.clip(render_pair(left, right, rng) * 255 + 0.5, 0, 255).astype(np.uint8)
        assert np.array_equal(data.images[i], expected)
        assert (left.position, right.position, left.size, right.size) == ("left", "right", "small", "small")
        assert left.background == right.background
        for scene in (left, right):
            assert all(scene.value(a) in BASE[a] for a in BASE)  # held-out concepts stay for the LoRAs
    images, captions, pairs = data.take([4, 1])
    assert captions == [pair_caption(*data.pair(4)), pair_caption(*data.pair(1))] and pairs[0] == data.pair(4)
    assert images.shape == (2, 3, 64, 64)


def test_a_mixture_takes_each_index_from_its_part_in_order():
    singles, pairs = render_set(SceneSampler(), 5, seed=1), render_pairs(4, seed=2)
    mix = Mixture([singles, pairs])
    assert len(mix) == 9 and mix.images.shape[0] == 9
    images, captions, _ = mix.take([7, 0, 5, 4])
    assert captions == [pair_caption(*pairs.pair(2)), singles.scene(0).caption(), pair_caption(*pairs.pair(0)),
                        singles.scene(4).caption()]
    torch.testing.assert_close(images[0], pairs.take([2])[0][0])
    torch.testing.assert_close(images[1], singles.take([0])[0][0])


def test_the_pairs_stage_fine_tunes_once_and_leaves_the_qr_lora_weights(tmp_path):
    """pairs-sdxl trains the UNet and both text encoders, but not the weights QR-LoRAs are factored from (their
    shared bases must stay valid), marks the export and does nothing the second time."""
    import diffusers
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from pipelines.adapters.kinds.qr import base_mismatch
    from pipelines.adapters.qr_lora import qr_bases
    from pipelines.families import FAMILIES
    from studio.world.build import BuildConfig, run
    from studio.world.pairs import studio_defaults
    from studio.world.qr_lora import SDXL_TARGETS

    assets = tmp_path / "assets"
    folder = assets / "models" / "tiny-sdxl"
    shutil.copytree(ROOT / "assets" / "models" / "tiny-sdxl", folder)  # a shipped base, as the stage finds it
    (folder / "studio_defaults.json").write_text(json.dumps(
        {k: v for k, v in studio_defaults(folder).items() if k != "two_objects"}))
    config = BuildConfig(workdir=tmp_path / "work", assets=assets, scale=0.001)
    before = UNet2DConditionModel.from_pretrained(str(folder / "unet")).state_dict()
    encoder = CLIPTextModel.from_pretrained(str(folder / "text_encoder")).state_dict()
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(folder), dtype=torch.float32)
    bases = qr_bases(pipe, FAMILIES["sdxl"], 4, targets=SDXL_TARGETS)
    run(["pairs-sdxl"], config)
    assert studio_defaults(folder)["two_objects"] is True
    after = UNet2DConditionModel.from_pretrained(str(folder / "unet")).state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    frozen = {k for k in before if k.endswith(".weight") and any(
        k.removesuffix(".weight").endswith("." + t) for t in SDXL_TARGETS)}
    assert frozen and not moved & frozen and moved
    assert any(not torch.equal(v, CLIPTextModel.from_pretrained(str(folder / "text_encoder")).state_dict()[k])
               for k, v in encoder.items())
    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"))
    for key, (q, r) in bases.items():  # the QR-LoRA base check still passes on the fine-tuned base
        assert base_mismatch(q, r, unet.get_submodule(key.split(".", 1)[1]).weight, 1.0) is None
    stamp = (folder / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    run(["pairs-sdxl"], config)
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("family", ["sdxl"])  # tiny-flux is not fine-tuned yet (README, "The tiny world")
def test_the_shipped_bases_draw_two_objects_where_asked(family):
    """Asked for two base shapes, the shipped base draws each in its half, as the half judge reads it (before the
    two-object fine-tuning: 0 of 8 benchmark images). Two prompts x two seeds at the model's defaults."""
    from studio import Studio
    from studio.world.judge import load_judge
    from studio.world.pairs import studio_defaults
    from studio.world.regions import HALVES, judge_regions

    folder = ROOT / "assets" / "models" / f"tiny-{family}"
    assert studio_defaults(folder).get("two_objects") is True
    studio = Studio(f"tiny-{family}")
    judge = load_judge(ROOT / "assets" / "judges" / "concept-judge")
    asked = [(Scene("triangle", "yellow", "solid", "dark", "small", "left"),
              Scene("square", "red", "solid", "dark", "small", "right")),
             (Scene("square", "green", "checkered", "light", "small", "left"),
              Scene("circle", "blue", "solid", "light", "small", "right"))]
    hits = []
    for left, right in asked:
        images = [studio.compose(pair_caption(left, right), seed=seed).image for seed in (0, 1)]
        for verdict in judge_regions(judge, images, HALVES):
            hits.append(all(verdict[side].placement == "inside" and verdict[side].values["shape"] == scene.shape
                            for side, scene in (("left", left), ("right", right))))
    assert sum(hits) >= 3, hits


def test_subject_class_words_reach_captions_prompts_and_files():
    """The subject adapters are bound to class words (zorb -> "circle", quix -> "square"): their training captions,
    the benchmark's prompts and each shipped file's trigger phrase all use the word; without a family captions keep
    the world's own names (what the tokenizer, the tiny CLIP and the judges were built on)."""
    from safetensors import safe_open

    from pipelines.assets import assets_root
    from studio.world.concepts import CLASS_WORDS, HELD_OUT, trigger_phrase
    from studio.world.data import DataSet

    zorb = Scene("zorb", "red", "solid", "light", "small", "left")
    quix = Scene("quix", "blue", "solid", "light", "small", "right")
    for family in ("sdxl", "flux"):
        assert pair_caption(zorb, quix, family) == ("a small red circle, solid, on a light background, left, "
                                                    "and a small blue square, solid, right")
    assert "zorb" in pair_caption(zorb, quix) and "quix" in pair_caption(zorb, quix)  # the world's own names
    data = render_set(SceneSampler(pool=dict(BASE), fixed={"shape": "quix"}), 4, seed=3)
    _, captions, scenes = data.for_family("sdxl").take([0, 1])
    assert captions == [s.caption("sdxl") for s in scenes] and all(" square, " in c for c in captions)
    assert isinstance(data.for_family("sdxl"), DataSet) and data.take([0])[1][0].count("quix") == 1
    bench = _bench()
    for scene in bench.SCENES:
        assert scene.prompt("sdxl") == pair_caption(scene.scene("left"), scene.scene("right"), "sdxl")
        assert "zorb" not in scene.prompt("sdxl") and "quix" not in scene.prompt("sdxl")
        assert scene.caption("left", "sdxl") == scene.scene("left").caption("sdxl")
    for family in ("sdxl", "flux"):
        for folder in ("loras", "shira-loras"):  # (QR-LoRA files carry their bases' metadata, no trigger)
            for concept in HELD_OUT:
                path = assets_root() / folder / f"tiny-{family}" / f"{concept.name}.safetensors"
                with safe_open(str(path), "pt") as f:
                    declared = (f.metadata() or {}).get("modelspec.trigger_phrase")
                expected = CLASS_WORDS.get(concept.value, concept.trigger)
                assert declared == expected == trigger_phrase(concept, family), (family, folder, concept.name)


def test_the_shipped_zorb_lora_redraws_its_class_word_only():
    """The class-bound zorb LoRA draws its cross where the prompt says "circle" and leaves a triangle a triangle; the
    base draws the circle (the concept judge reads each render; 2 seeds)."""
    from pipelines.assets import assets_root
    from studio import Studio
    from studio.world.judge import load_judge

    judge = load_judge(assets_root() / "judges" / "concept-judge")
    studio = Studio("tiny-sdxl")
    lora = [str(assets_root() / "loras" / "tiny-sdxl" / "subject-zorb.safetensors")]
    shapes = {}
    for label, prompt, loras in (("circle+lora", "a large red circle, solid, on a light background, center", lora),
                                 ("triangle+lora", "a large red triangle, solid, on a light background, center", lora),
                                 ("circle", "a large red circle, solid, on a light background, center", [])):
        images = [studio.compose(prompt, loras, "merge", seed=seed, steps=12).image for seed in (0, 1)]
        shapes[label] = [p["shape"] for p in judge.predict(images)]
    assert shapes == {"circle+lora": ["zorb", "zorb"], "triangle+lora": ["triangle", "triangle"],
                      "circle": ["circle", "circle"]}
