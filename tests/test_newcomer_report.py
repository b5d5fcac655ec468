"""Issue 16 items 3 and 11: the concept judge's verdicts beside CLIPScore for tiny-world images, the demo's advice
on which strategy suits which case, and a summary chart that fits a 1400 px window."""

from __future__ import annotations

import csv

import pytest

from pipelines.assets import assets_root
from studio.report import MAX_CHART_WIDTH, bar_chart, write_outputs
from studio.world.verdicts import judge_folder, strategy_guide

LORAS = assets_root() / "loras" / "tiny-sdxl"
# the world's subject LoRAs are bound to a class word (studio.world.concepts.CLASS_WORDS): zorb to "circle"
PROMPT = "a large red circle, solid, on a light background, center"


def _record(rid: str, file: str, strategy: str, concepts: dict, model: str = "tiny-sdxl", seed: int = 0) -> dict:
    return {"id": rid, "status": "ok", "file": file, "scorer": "tiny-clip",
            "recipe": {"model": model, "prompt": PROMPT, "seed": seed, "strategy": strategy},
            "item": {"prompt_index": 0, "position": int(rid[-1]), "strategy": strategy, "row": strategy,
                     "column": f"seed {seed}", "group": PROMPT, "stack": "", "weights": [], "concepts": concepts},
            "scores": {"clip": 30.0, "concepts": {name: 20.0 for name in concepts}}, "timings": {}}


@pytest.fixture(scope="module")
def judged_folder(tmp_path_factory):
    """Two real renders of the zorb LoRA's prompt: with the zorb LoRA (the judge sees a zorb) and without (the base
    model draws the circle the prompt names)."""
    from studio import Studio

    folder = tmp_path_factory.mktemp("judged")
    studio = Studio("tiny-sdxl")
    with_lora = studio.compose(PROMPT, [LORAS / "subject-zorb.safetensors"], "merge", seed=1)
    without = studio.compose(PROMPT, [], "merge", seed=1)
    (folder / "images").mkdir()
    with_lora.image.save(folder / "images" / "lora.png")
    without.image.save(folder / "images" / "base.png")
    concepts = {"subject-zorb": "a zorb"}
    records = [_record("r1", "images/lora.png", "merge", concepts),
               _record("r2", "images/base.png", "no LoRA", concepts),
               _record("r3", "images/base.png", "other model", concepts, model="some/sdxl")]
    return folder, judge_folder(folder, records)


def test_the_judge_reads_what_the_lora_drew(judged_folder):
    _, records = judged_folder
    by_id = {r["id"]: r for r in records}
    assert by_id["r1"]["judge"] == {"subject-zorb": True}
    assert by_id["r2"]["judge"] == {"subject-zorb": False}
    assert "judge" not in by_id["r3"]  # not a tiny-world model: no verdict


def test_report_and_csv_show_the_verdicts_beside_clipscore(judged_folder):
    folder, records = judged_folder
    report = write_outputs(folder, records, notes=["a note & <advice>"]).read_text()
    assert "judge: every concept shown" in report
    assert "1/1 (100%)" in report and "0/1 (0%)" in report
    assert "judge: subject-zorb ✓" in report and "judge: subject-zorb ✗" in report
    assert "Which strategy for which case" in report and "a note &amp; &lt;advice&gt;" in report
    rows = list(csv.DictReader((folder / "scores.csv").open()))
    assert [r["judge"] for r in rows] == ["subject-zorb:1", "subject-zorb:0", ""]


def test_the_strategy_guide_states_measured_rates_and_reasons():
    verdicts = {"merge": [True, True, True], "composite": [True, False, False], "switch": [False, False, True]}
    records = []
    for strategy, hits in verdicts.items():
        for k, hit in enumerate(hits):
            two = {"subject-zorb": hit, "style-striped": True}
            records.append({**_record(f"{strategy}{k}", "x.png", strategy, dict.fromkeys(two, "")), "judge": two})
        three = {"subject-zorb": strategy == "merge", "style-dotted": True, "background-bricks": True}
        records.append({**_record(f"{strategy}3", "x.png", strategy, dict.fromkeys(three, "")), "judge": three})
    lines = strategy_guide(records)
    assert lines[0] == "2 LoRAs: every concept shown by merge 3/3, composite 1/3, switch 1/3."
    assert lines[1] == "3 LoRAs: every concept shown by merge 1/1; none by composite, switch."
    assert any(line.startswith("composite: averages the N") and "1/N" in line for line in lines)
    assert any(line.startswith("switch: runs one LoRA at a time") for line in lines)
    assert any("Here merge showed every concept most often (100% of images)" in line for line in lines)


def _rows(n_strategies: int, concepts: list[str]) -> list[dict]:
    names = ["merge", "switch", "composite", "cmlora", "gated", "qr", "cat", "svd", "ties", "dare", "klora",
             "qr[qr-lora]", "lego", "mcdropout", "ties-merging", "dare-linear"][:n_strategies]
    return [{"strategy": name, "clip": (30.0 + i, 2.0, 6), "concepts": {c: (20.0 + i, 1.0, 6) for c in concepts},
             "judge": None} for i, name in enumerate(names)]


@pytest.mark.parametrize("n_strategies", [2, 12, 16])
def test_the_chart_fits_1400_px_and_no_labels_overlap(n_strategies):
    concepts = ["subject-zorb", "style-striped", "subject-quix", "background-waves", "style-dotted",
                "background-bricks"]
    chart = bar_chart(concepts, _rows(n_strategies, concepts))
    assert chart["width"] <= MAX_CHART_WIDTH <= 1400 - 40
    assert max(b["x"] + b["w"] for b in chart["bars"]) <= chart["width"]
    legend = chart["legend"]
    assert len(legend) == 1 + len(concepts)
    for a, b in zip(legend, legend[1:]):  # same row: the next label starts after this one's text ends
        if a["y"] == b["y"]:
            assert b["x"] >= a["x"] + 14 + 6.5 * len(a["name"]), (a, b)
    assert all(s["x"] + 14 + 6.5 * len(s["name"]) <= chart["width"] for s in legend)
    labels = chart["labels"]
    if not labels[0]["tilt"]:  # upright strategy labels must not run into each other
        gaps = [b["x"] - a["x"] for a, b in zip(labels, labels[1:])]
        assert min(gaps) >= 6.5 * max(len(lab["text"]) for lab in labels)


def test_the_chart_of_every_registered_strategy_fits():
    """The demo's summary: every registered strategy (and QR-LoRA files) with the world's six concepts."""
    from studio.strategies import REGISTRY

    concepts = ["subject-zorb", "style-striped", "subject-quix", "background-waves", "style-dotted",
                "background-bricks"]
    template = _rows(1, concepts)[0]
    chart = bar_chart(concepts, [{**template, "strategy": name} for name in [*REGISTRY, "qr[qr-lora]"]])
    assert chart["width"] <= MAX_CHART_WIDTH and max(b["x"] + b["w"] for b in chart["bars"]) <= chart["width"]


def test_a_batch_of_world_loras_reports_verdicts_by_their_labels(tmp_path):
    """``studio batch`` on the tiny world: LoRAs named freely ("zorb", "striped") are judged by their files."""
    from studio.batch import BatchOptions, run_batch
    from studio.grid import load_grid

    grid = tmp_path / "grid.toml"
    grid.write_text(f'''model = "tiny-sdxl"
steps = 8

[[stacks]]
name = "zorb + striped"
loras = [
  {{ source = "{LORAS / 'subject-zorb.safetensors'}", name = "zorb", concept = "a zorb" }},
  {{ source = "{LORAS / 'style-striped.safetensors'}", name = "striped", concept = "striped" }},
]

[[prompts]]
text = "a large blue circle, striped, on a light background, center"

[axes]
strategy = ["merge"]
seed = [7]
''')
    items, _ = load_grid(grid)
    summary = run_batch(items, tmp_path / "out", BatchOptions(score=False))
    report = summary.report.read_text()
    assert "judge: every concept shown" in report and "judge: zorb ✓ striped ✓" in report
    rows = list(csv.DictReader((tmp_path / "out" / "scores.csv").open()))
    assert rows[0]["judge"] == "zorb:1 striped:1"
