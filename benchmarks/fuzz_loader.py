"""Fuzz the LoRA loader with a large seeded corpus of hostile files made from the shipped LoRAs.

    python benchmarks/fuzz_loader.py                      # 1,584 cases: 12 shipped LoRAs x 22 families x 6 seeds
    python benchmarks/fuzz_loader.py --seeds 2 --json out.json

Every case is one shipped LoRA (``assets/loras/tiny-sdxl`` and ``tiny-flux``) damaged by one mutation family of
``tests/lora_mutations.py`` (container: truncation, header length, header bytes, nested brackets, offsets, dtypes,
shapes, metadata; tensors: a factor dropped, renamed or added, huge or non-finite values, a rank that disagrees,
empty, scalar or 1-D factors, a vector alpha, integer weights, a transposed factor, a huge LoKr, a wrong
``dora_scale``), loaded into the matching tiny model and classified: clean error / other exception / hang
(> 5 s) / stale adapters after a failure / loaded with a warning of what was dropped / loaded complete (a
mutation that left a valid file) / silently accepted (part dropped, or a file that should have been refused).
It also times the A1111 infotext parser on 1 MB adversarial texts. Prints a table; exit status 1 if any case
is in a bad class, took over 5 s, or grew the process by more than 1 GB.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import lora_mutations as mut  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def infotext_timings() -> list[tuple[str, int, float, str]]:
    from pipelines.errors import StudioError
    from studio.recipe import Recipe

    texts = {
        "issue reproducer, 1 MB ('a ' x 500k after Steps:)": "a cat\nSteps: 2, " + "a " * 499_990,
        "1 MB of spaces before a tag": "a" + " " * 999_980 + "<lora:x:1>\nSteps: 2",
        "1 MB of unterminated <lora: tags": "<lora:x:1" * 111_000 + "\nSteps: 2",
        "1 MB of 'Key: ' fields without commas": "p\nSteps: 2, " + "Key " * 249_990,
        "1 MB of quotes": 'p\nSteps: 2, A: "' + '\\"' * 499_990,
    }
    rows = []
    for label, text in texts.items():
        t0 = time.perf_counter()
        try:
            Recipe.from_a1111(text)
            outcome = "parsed"
        except StudioError as e:
            outcome = f"refused ({str(e)[:50]})"
        rows.append((label, len(text), time.perf_counter() - t0, outcome))
    return rows


def parser_timings(tmp: Path) -> list[tuple[str, int, float, str]]:
    """Other parsers of outside text at their size caps: a grid, a recipe TOML, a prompt list, LoRA metadata."""
    from pipelines.adapters.metadata import trigger_words
    from pipelines.errors import StudioError
    from studio.grid import load_grid
    from studio.prompt_list import read_prompts
    from studio.recipe import Recipe

    grid = tmp / "grid.toml"
    grid.write_text('model = "tiny-sdxl"\n' + "".join(f'[[prompts]]\ntext = "p{i}"\n' for i in range(36_000)))
    jsonl = tmp / "prompts.jsonl"
    jsonl.write_text("".join(f'{{"prompt": "a zorb number {i}", "concepts": {{}}}}\n' for i in range(300_000)))
    tags = {"set": {f"tag{i}": i for i in range(700_000)}}
    cases = [
        ("grid, 36,000 [[prompts]] tables", grid.stat().st_size, lambda: load_grid(grid)),
        ("recipe TOML, 1 MB of nested arrays", 1_000_000, lambda: Recipe.from_toml("a = " + "[" * 999_996)),
        ("recipe TOML, 1 MB prompt", 1_000_000, lambda: Recipe.from_toml('model = "m"\nprompt = "' + "x" * 999_970 + '"')),
        ("prompt list (JSONL), 300,000 lines", jsonl.stat().st_size, lambda: read_prompts(jsonl)),
        ("ss_tag_frequency, 700,000 tags", len(json.dumps(tags)),
         lambda: trigger_words({"ss_tag_frequency": json.dumps(tags)})),
        ("ss_tag_frequency, 10^5 nested brackets", 100_000, lambda: trigger_words({"ss_tag_frequency": "[" * 100_000})),
    ]
    rows = []
    for label, size, run in cases:
        t0 = time.perf_counter()
        try:
            run()
            outcome = "parsed"
        except StudioError as e:
            outcome = f"refused ({str(e)[:50]})"
        rows.append((label, size, time.perf_counter() - t0, outcome))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=6, help="cases per (file, family); 6 gives 1,584")
    parser.add_argument("--json", type=Path, help="also write every case's outcome here")
    args = parser.parse_args()

    import torch

    from studio import Studio

    torch.set_num_threads(int(os.environ.get("STUDIO_TEST_THREADS", "1")))
    cases = []
    started = time.perf_counter()
    worst = {"seconds": 0.0, "case": "", "growth_mb": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        for model in ("tiny-sdxl", "tiny-flux"):
            studio = Studio(model)
            base_rss = rss_mb()
            for source in sorted((ROOT / "assets" / "loras" / model).glob("*.safetensors")):
                data = source.read_bytes()
                baseline = mut.layer_count(studio, source)
                for f_index, family in enumerate(mut.FAMILIES):
                    for seed in range(args.seeds):
                        content, description = mut.make_case(data, family, seed * 1000 + f_index)
                        path = Path(tmp) / f"{model}-{source.stem}-{family.name}-{seed}.safetensors"
                        path.write_bytes(content)
                        before_peak = peak_mb()
                        outcome = mut.classify(studio, path, family.expect, baseline)
                        growth = max(0.0, peak_mb() - max(before_peak, base_rss))
                        path.unlink()
                        if outcome.seconds > worst["seconds"]:
                            worst.update(seconds=outcome.seconds, case=f"{path.name}: {description}")
                        worst["growth_mb"] = max(worst["growth_mb"], peak_mb() - base_rss)
                        cases.append({"model": model, "file": source.name, "family": family.name,
                                      "expect": family.expect, "mutation": description, "outcome": outcome.kind,
                                      "seconds": round(outcome.seconds, 4), "message": outcome.message,
                                      "growth_mb": round(growth, 1)})
            del studio
    total_s = time.perf_counter() - started

    by_class = collections.Counter(c["outcome"] for c in cases)
    by_family: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for c in cases:
        by_family[c["family"]][c["outcome"]] += 1
    print(f"# LoRA loader fuzz: {len(cases)} cases from {len({c['file'] for c in cases})} shipped LoRA names "
          f"x 2 models, {len(mut.FAMILIES)} mutation families, {args.seeds} seeds each")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}; total {total_s:.1f} s\n")
    print("| outcome | cases |\n|---|---:|")
    order = [mut.CLEAN_ERROR, mut.LOADED_WARNED, mut.LOADED_COMPLETE, mut.OTHER_EXCEPTION, mut.HANG, mut.STALE,
             mut.SILENT_PARTIAL, mut.SILENT_BAD]
    for kind in order:
        print(f"| {kind} | {by_class.get(kind, 0)} |")
    print(f"\nslowest case: {worst['seconds']:.3f} s ({worst['case']})")
    print(f"largest growth of the process's peak memory over its size after loading the model: "
          f"{worst['growth_mb']:.0f} MB")
    print("\n| family | expect | " + " | ".join(k.split(":")[0].split(",")[0] for k in order[:3]) + " | bad |")
    print("|---|---|---:|---:|---:|---:|")
    for family in mut.FAMILIES:
        counts = by_family[family.name]
        bad = sum(counts.get(k, 0) for k in mut.BAD)
        print(f"| {family.name} | {family.expect} | " + " | ".join(str(counts.get(k, 0)) for k in order[:3])
              + f" | {bad} |")
    print("\n| A1111 infotext (adversarial) | characters | seconds | outcome |\n|---|---:|---:|---|")
    timings = infotext_timings()
    for label, size, seconds, outcome in timings:
        print(f"| {label} | {size} | {seconds:.4f} | {outcome} |")
    print("\n| other parser of outside text | bytes | seconds | outcome |\n|---|---:|---:|---|")
    with tempfile.TemporaryDirectory() as tmp:
        others = parser_timings(Path(tmp))
    for label, size, seconds, outcome in others:
        print(f"| {label} | {size} | {seconds:.3f} | {outcome} |")
    bad_cases = [c for c in cases if c["outcome"] in mut.BAD]
    for c in bad_cases[:30]:
        print(f"BAD {c['outcome']}: {c['model']} {c['file']} {c['family']} ({c['mutation']}): {c['message'][:200]}")
    if args.json:
        args.json.write_text(json.dumps({"cases": cases, "infotext": timings, "parsers": others}, indent=1))
    failed = bad_cases or worst["seconds"] > 5 or worst["growth_mb"] > 1024 or any(t[2] > 1 for t in timings)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
