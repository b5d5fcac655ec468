"""A small seeded fuzz of the LoRA loader over every mutation family of ``lora_mutations`` (the large corpus is
``benchmarks/fuzz_loader.py``): each damaged file is refused with a :class:`StudioError`, or loads complete, or
loads with a warning of what it dropped; never a raw exception, never adapters left attached, never a silent
partial load, never a broken file silently accepted."""

from __future__ import annotations

from pathlib import Path

import pytest

import lora_mutations as mut
from studio import Studio

ROOT = Path(__file__).resolve().parent.parent
FILES = ["subject-zorb", "subject-quix", "style-striped", "background-bricks"]  # kohya, PEFT, LoHa, LoKr


@pytest.fixture(scope="module")
def studio():
    return Studio("tiny-sdxl")


@pytest.mark.parametrize("name", FILES)
def test_every_mutation_family_is_refused_cleanly_or_loads_whole(studio, tmp_path, name):
    source = ROOT / "assets" / "loras" / "tiny-sdxl" / f"{name}.safetensors"
    data = source.read_bytes()
    baseline = mut.layer_count(studio, source)
    outcomes = {}
    for index, family in enumerate(mut.FAMILIES):
        content, description = mut.make_case(data, family, seed=7 * index + len(name))
        path = tmp_path / f"{family.name}.safetensors"
        path.write_bytes(content)
        outcome = mut.classify(studio, path, family.expect, baseline, hang_s=float("inf"))
        outcomes[family.name] = (outcome.kind, description, outcome.message)
        assert not studio.composer.adapters and not studio.composer.layers
    bad = {k: v for k, v in outcomes.items() if v[0] in mut.BAD}
    assert not bad, bad
    refused = [k for k, v in outcomes.items() if v[0] == mut.CLEAN_ERROR]
    assert len(refused) >= len(mut.FAMILIES) - 3  # nearly every family breaks the file; the rest stay valid
