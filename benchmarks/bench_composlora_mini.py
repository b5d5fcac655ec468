"""ComposLoRA-mini: does a strategy actually compose concepts? Measured on the tiny trained world.

    python benchmarks/bench_composlora_mini.py                      # tiny-sdxl, every strategy, seeds 0 and 1
    python benchmarks/bench_composlora_mini.py --family flux --seeds 0 1 2
    python benchmarks/bench_composlora_mini.py --strategy merge --strategy composite --limit 4
    python benchmarks/bench_composlora_mini.py --strategy lego --strategy merge --add  # add rows to the results
    python benchmarks/bench_composlora_mini.py --strategy merge --squeeze-rank 4 --add  # on squeezed LoRAs
    python benchmarks/bench_composlora_mini.py --strategy merge --shira merge --shira composite --add  # SHiRAs

16 compositions (one subject LoRA + a style and/or a background LoRA; see :mod:`studio.world.composlora`) x
every registered strategy x seeds, rendered through the batch runner into ``--work`` (resumable: run it again
to finish an interrupted benchmark; ``report.html`` there shows every image), then judged. Per strategy:
composition success (the concept judge sees *every* requested concept), detection rate per category, CLIPScore
of the full prompt and of each LoRA's concept text (tiny world CLIP), and render time per image (wall clock,
also as a ratio to ``merge`` in the same run). Results go to ``benchmarks/results/composlora-mini-<family>.json``
and ``.md``; with ``--add`` the strategies run now replace their rows in those files (same seeds and
compositions) and the other rows are kept, each row's time ratio taken against ``merge`` *of its own run*
(include ``merge`` in the run for that; its row is then kept from the earlier run). With ``--squeeze-rank R``
and/or ``--squeeze-energy E`` the world's LoRAs are first squeezed (LoRA-Squeeze, :mod:`studio.squeeze`) into the
work folder and the strategies run on those, reported as ``<strategy>[squeeze r=R]`` / ``[squeeze e=E]``.
Each ``--shira STRATEGY`` runs that strategy on the world's SHiRA adapters (``assets/shira-loras``), reported as
``<strategy>[shira]`` (its time ratio against the ordinary LoRAs' ``merge`` of the same run: pass ``--strategy
merge`` too); the support overlap of every pair of the family's SHiRAs, as ``cat``'s strategy info reports it when
it fuses them, is written to the results as ``shira_overlap``.
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
    ap.add_argument("--add", action="store_true", help="add/replace these strategies' rows in the existing results")
    ap.add_argument("--squeeze-rank", type=int, default=None, help="run on the world's LoRAs squeezed to this rank")
    ap.add_argument("--squeeze-energy", type=float, default=None, help="... squeezed to keep this share of σ²")
    ap.add_argument("--shira", action="append", default=[], metavar="STRATEGY",
                    help="also run this strategy (e.g. composite:reduce=sum) on the world's SHiRA adapters")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from studio.batch_cli import RichReporter

    comps = compositions()[: args.limit] if args.limit else None
    work = args.work / args.family
    assets, tag = None, None
    if args.squeeze_rank is not None or args.squeeze_energy is not None:
        tag = " ".join(f"{k}={v}" for k, v in (("r", args.squeeze_rank), ("e", args.squeeze_energy)) if v is not None)
        work = args.work / f"{args.family}-squeeze-{tag.replace(' ', '-').replace('=', '')}"
        assets = squeezed_world(work / "assets", args.family, args.squeeze_rank, args.squeeze_energy)
    strategies = args.strategy if args.strategy or not args.shira else []
    scores = run_benchmark(work, family=args.family, strategies=strategies, seeds=args.seeds, steps=args.steps,
                           comps=comps, reporter=RichReporter(), assets=assets, shira_strategies=args.shira)
    if tag:
        for score in scores:
            score.label = f"{score.label}[squeeze {tag}]"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else (platform.processor() or "CPU")
    merge_seconds = next((s.seconds for s in scores if s.label == "merge"), None)
    rows = [{**s.row(), "time_vs_merge": s.seconds / merge_seconds if merge_seconds else None} for s in scores]
    stem = args.results / f"composlora-mini-{args.family}"
    if args.add:
        rows = added_rows(stem.with_suffix(".json"), rows, args.seeds, len(comps or compositions()))
    table = rows_table(rows) if args.add else markdown_table(scores)
    header = (f"tiny-{args.family}, {len(comps or compositions())} compositions x seeds {args.seeds}, "
              f"{device}, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores")
    print(header)
    print(table)
    args.results.mkdir(parents=True, exist_ok=True)
    payload = {"family": args.family, "seeds": args.seeds, "steps": args.steps, "device": device,
               "threads": torch.get_num_threads(), "compositions": len(comps or compositions()),
               "strategies": rows}
    old = json.loads(stem.with_suffix(".json").read_text()) if args.add and stem.with_suffix(".json").exists() else {}
    overlap = shira_overlap(args.family) if args.shira else old.get("shira_overlap")
    if overlap:
        payload["shira_overlap"] = overlap
        table += "\n\n" + overlap_line(overlap)
        print(overlap_line(overlap))
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    stem.with_suffix(".md").write_text(f"{header}\n\n{table}\n")


def shira_overlap(family: str) -> dict:
    """Support overlap of every pair of the family's SHiRA adapters, as ``cat`` reports it when it fuses all six
    (per pair: layers both adapt, shared weight entries, and their share of the smaller support)."""
    from pipelines.assets import assets_root
    from studio import Studio

    files = [str(p) for p in sorted((assets_root() / "shira-loras" / f"tiny-{family}").glob("*.safetensors"))]
    studio = Studio(f"tiny-{family}")
    result = studio.compose("a large red zorb", files, "cat", seed=0, steps=1)
    pairs = result.strategy_info["sparse_overlap"]
    shares = [p["share_of_smaller"] for p in pairs]
    return {"pairs": pairs, "mean_share": sum(shares) / len(shares), "max_share": max(shares),
            "min_share": min(shares)}


def overlap_line(overlap: dict) -> str:
    return (f"SHiRA support overlap (cat fusing all {len(overlap['pairs'])} pairs): shared entries / the smaller "
            f"support, mean {overlap['mean_share']:.2%}, min {overlap['min_share']:.2%}, "
            f"max {overlap['max_share']:.2%}")


def squeezed_world(root: Path, family: str, rank: int | None, energy: float | None) -> Path:
    """An assets folder whose ``loras/tiny-<family>`` holds the world's LoRAs squeezed at ``rank`` / ``energy``
    (everything else links to the shipped world); squeezed once, reused by a resumed run."""
    from pipelines.assets import assets_root
    from studio import Studio
    from studio.squeeze import squeeze

    shipped = assets_root()
    folder = root / "loras" / f"tiny-{family}"
    folder.mkdir(parents=True, exist_ok=True)
    for entry in shipped.iterdir():
        if entry.name != "loras" and not (root / entry.name).exists():
            (root / entry.name).symlink_to(entry.resolve())
    studio = None
    for source in sorted((shipped / "loras" / f"tiny-{family}").glob("*.safetensors")):
        out = folder / source.name
        if out.exists():
            continue
        studio = studio or Studio(f"tiny-{family}")
        report = squeeze(studio, [str(source)], out, rank=rank, energy=energy)
        studio.unload()
        print(f"squeezed {source.name}: {report.summary()}")
    return root


def added_rows(path: Path, new: list[dict], seeds: list[int], count: int) -> list[dict]:
    """The rows of the earlier results at ``path`` with ``new`` added (replacing rows of the same strategy, except
    ``merge``, which stays from the earlier run), ordered as the benchmark orders them."""
    if not path.exists():
        return new
    old = json.loads(path.read_text())
    if old.get("seeds") != seeds or old.get("compositions") != count:
        raise SystemExit(f"{path} was measured with seeds {old.get('seeds')} on {old.get('compositions')} "
                         f"compositions; --add needs the same")
    kept = {r["strategy"]: r for r in old["strategies"]}
    merge_seconds = kept.get("merge", {}).get("seconds_per_image")
    for row in kept.values():
        if "time_vs_merge" not in row and merge_seconds:  # rows written before the ratio was stored
            row["time_vs_merge"] = row["seconds_per_image"] / merge_seconds
    for row in new:
        if row["strategy"] != "merge" or "merge" not in kept:
            kept[row["strategy"]] = row
    return sorted(kept.values(), key=lambda r: (-r["success"], -r["clip_mean"]))


def rows_table(rows: list[dict]) -> str:
    """The results table from JSON rows, each with the time ratio of its own run."""
    lines = ["| strategy | images | success | subject | style | background | CLIPScore | concept CLIPScore "
             "| s/image | time vs merge |", "|" + "---|" * 10]
    for r in rows:
        ratio = "n/a" if r.get("time_vs_merge") is None else f"{r['time_vs_merge']:.2f}x"
        lines.append(f"| {r['strategy']} | {r['images']} | {r['success']:.0%} | {r.get('subject_detected', 0):.0%} | "
                     f"{r.get('style_detected', 0):.0%} | {r.get('background_detected', 0):.0%} | "
                     f"{r['clip_mean']:.1f} ± {r['clip_std']:.1f} | {r['concept_clip']:.1f} | "
                     f"{r['seconds_per_image']:.2f} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
