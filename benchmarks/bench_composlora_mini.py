"""ComposLoRA-mini: does a strategy actually compose concepts? Measured on the tiny trained world.

    python benchmarks/bench_composlora_mini.py                      # tiny-sdxl, every strategy, seeds 0 and 1
    python benchmarks/bench_composlora_mini.py --family flux --seeds 0 1 2
    python benchmarks/bench_composlora_mini.py --strategy merge --strategy composite --limit 4

16 compositions (one subject LoRA + a style and/or a background LoRA; see :mod:`studio.world.composlora`) x
every registered strategy x seeds, rendered through the batch runner into ``--work`` (resumable: run it again
to finish an interrupted benchmark; ``report.html`` there shows every image), then judged. Per strategy:
composition success (the concept judge sees *every* requested concept), detection rate per category, CLIPScore
of the full prompt and of each LoRA's concept text (tiny world CLIP), and render time per image (wall clock,
also as a ratio to ``merge`` in the same run). Results go to ``benchmarks/results/composlora-mini-<family>.json``
and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from studio.world.composlora import compositions, markdown_table, run_benchmark  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=("sdxl", "flux"), default="sdxl")
    ap.add_argument("--strategy", action="append", help="strategies (default: every registered one)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's own)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N compositions (quick look)")
    ap.add_argument("--work", type=Path, default=ROOT / "outputs" / "composlora-mini")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from studio.batch_cli import RichReporter

    comps = compositions()[: args.limit] if args.limit else None
    work = args.work / args.family
    scores = run_benchmark(work, family=args.family, strategies=args.strategy, seeds=args.seeds, steps=args.steps,
                           comps=comps, reporter=RichReporter())
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else (platform.processor() or "CPU")
    table = markdown_table(scores)
    header = (f"tiny-{args.family}, {len(comps or compositions())} compositions x seeds {args.seeds}, "
              f"{device}, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores")
    print(header)
    print(table)
    args.results.mkdir(parents=True, exist_ok=True)
    stem = args.results / f"composlora-mini-{args.family}"
    payload = {"family": args.family, "seeds": args.seeds, "steps": args.steps, "device": device,
               "threads": torch.get_num_threads(), "compositions": len(comps or compositions()),
               "strategies": [s.row() for s in scores]}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    stem.with_suffix(".md").write_text(f"{header}\n\n{table}\n")


if __name__ == "__main__":
    main()
