"""Benchmark of the weight-space merges (every registered one: cat, svd, ties, dare, qr, lego, mcdropout) and K-LoRA
against merge, measured in one run.

    python benchmarks/bench_merges.py                         # tiny SDXL and tiny FLUX, 2 / 3 / 5 LoRAs, CPU
    python benchmarks/bench_merges.py --prep --width-divisor 8  # + one-off merge cost at SDXL's real layer count

1. Time per image relative to ``merge`` (same prompt, seed, steps and size), through ``Studio.compose`` with each
   strategy's default parameters (from the registry). A weight-space merge computes its merged adapter once
   (*first image*) and reuses it while the stack is unchanged (*next images*); K-LoRA fuses exactly 2 LoRAs.
2. With ``--prep``: the one-off preparation (the merge itself, K-LoRA's per-layer statistics) on an SDXL
   architecture with every LoRA-targetable layer of the real model (``benchmarks/archs.py``), in milliseconds
   and in units of one denoiser step of the same model (batch 2 for guidance, 32x32 latents, i.e. 256 px).

Times are the CPU time of the process (``time.process_time``, one torch thread by default), which other load on a
shared machine barely disturbs, unlike wall-clock time; measurements are interleaved over the strategies and
repeated, each cell is a median. LoRAs are written by PEFT through diffusers' ``save_lora_weights`` (attention,
feed-forward and text-encoder layers, rank 8 / 16).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import archs  # noqa: E402
from bench_foundation import denoiser_inputs, write_loras  # noqa: E402
from fusion import REGISTRY, RunContext, WeightMerge, make_strategy, merge_stack  # noqa: E402
from pipelines import Composer  # noqa: E402
from pipelines.adapters import parse_lora  # noqa: E402
from pipelines.families import FLUX, SDXL  # noqa: E402
from pipelines.tiny import build_tiny_flux, build_tiny_sdxl  # noqa: E402
from studio import Studio  # noqa: E402

STRATEGIES = [name for name, cls in REGISTRY.items() if issubclass(cls, WeightMerge)] + ["klora"]
COUNTS = (2, 3, 5)


def drop_derived(studio: Studio) -> None:
    for name in [n for n, a in studio.composer.adapters.items() if a.derived_from]:
        if name in studio.composer.adapters:
            studio.composer.remove(name)


def per_image_table(family_name: str, steps: int, size: int, repeats: int, folder: Path):
    family = SDXL if family_name == "sdxl" else FLUX
    build = build_tiny_sdxl if family is SDXL else build_tiny_flux
    files = write_loras(build, family, max(COUNTS), 8, folder / family_name)
    studio = Studio(f"tiny-{family_name}-random")  # the seeded model the LoRAs were written for
    kw = dict(steps=steps, width=size, height=size, seed=0, output_type="latent")

    def timed(loras, strategy):
        t0 = time.process_time()
        studio.compose("a corgi in a garden", loras, strategy, **kw)
        return time.process_time() - t0

    table = {}
    for n in COUNTS:
        loras = [f"{f}:{w}" for f, w in zip(files[:n], [0.9, 0.7, 0.6, 0.5, 0.4])]
        names = ["merge"] + [s for s in STRATEGIES if s != "klora" or n == 2]
        timed(loras, "merge")  # warm-up (parsing, first-call overheads)
        samples = {s: {"first": [], "next": []} for s in names}
        for _ in range(repeats):
            for s in names:
                drop_derived(studio)
                samples[s]["first"].append(timed(loras, s))
                samples[s]["next"].append(timed(loras, s))
        merge_time = statistics.median(samples["merge"]["first"] + samples["merge"]["next"])
        table[n] = {s: (statistics.median(v["first"]) / merge_time, statistics.median(v["next"]) / merge_time)
                    for s, v in samples.items()}
        table[n]["_merge_s"] = merge_time
        studio.unload()
    return table


def prep_table(width_divisor: int, rank: int, repeats: int, folder: Path):
    family = SDXL
    build = lambda: archs.sdxl(width_divisor)  # noqa: E731
    files = write_loras(build, family, max(COUNTS), rank, folder / "prep")
    pipe = build()
    composer = Composer(pipe, family)
    names = []
    for i, f in enumerate(files):
        composer.add(f"l{i}", parse_lora(f, pipe, family))
        names.append(f"l{i}")
    layers = len(composer.layers)
    inputs = denoiser_inputs(pipe, family, 2, torch.device("cpu"), torch.float32, latent=32)
    composer.state.set_active(names)
    composer.state.set_gains(denoiser=torch.ones(1, len(names)), text=torch.ones(1, len(names)))
    with torch.no_grad():
        pipe.unet(**inputs)
        t0 = time.process_time()
        for _ in range(repeats):
            pipe.unet(**inputs)
        step_s = (time.process_time() - t0) / repeats
    table = {}
    for n in COUNTS:
        weights = [0.9, 0.7, 0.6, 0.5, 0.4][:n]
        row = {}
        for s in STRATEGIES:
            if s == "klora" and n != 2:
                continue
            times = []
            for _ in range(repeats):
                composer.cache.clear()
                strategy = make_strategy(s)
                t0 = time.process_time()
                if s == "klora":
                    strategy.prepare(RunContext(names=names[:n], weights=torch.tensor(weights), num_steps=30,
                                                family="sdxl", composer=composer))
                else:
                    merge_stack(strategy, composer, names[:n], weights)
                times.append(time.process_time() - t0)
            row[s] = statistics.median(times)
        table[n] = row
    return table, layers, step_s


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default="sdxl,flux")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prep", action="store_true", help="also time the one-off merge on a real-layer-count SDXL")
    ap.add_argument("--width-divisor", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    cpu = platform.processor() or platform.machine()
    print(f"CPU ({cpu}), torch {torch.__version__}, {torch.get_num_threads()} thread(s), float32, process CPU time")
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families.split(","):
            table = per_image_table(family, args.steps, args.size, args.repeats, Path(tmp))
            print(f"\nTime per image relative to merge, tiny {family.upper()} ({args.size}x{args.size}, {args.steps} "
                  f"steps, LoRA rank 8), first image (merge computed) / next images (cached):\n")
            print("| strategy | " + " | ".join(f"{n} LoRAs" for n in COUNTS) + " |")
            print("|---|" + "---:|" * len(COUNTS))
            print("| merge (CPU seconds per image) | " + " | ".join(f"{table[n]['_merge_s']:.2f} s" for n in COUNTS)
                  + " |")
            for s in STRATEGIES:
                cells = [f"{table[n][s][0]:.2f}x / {table[n][s][1]:.2f}x" if s in table[n] else "-" for n in COUNTS]
                print(f"| {s} | " + " | ".join(cells) + " |")
        if args.prep:
            table, layers, step_s = prep_table(args.width_divisor, args.rank, args.repeats, Path(tmp))
            print(f"\nOne-off preparation, SDXL at 1/{args.width_divisor} width ({layers} LoRA'd layers, rank "
                  f"{args.rank}); one denoiser step of merge = {step_s * 1e3:.0f} ms:\n")
            print("| strategy | " + " | ".join(f"{n} LoRAs" for n in COUNTS) + " |")
            print("|---|" + "---:|" * len(COUNTS))
            for s in STRATEGIES:
                cells = [f"{table[n][s] * 1e3:.0f} ms ({table[n][s] / step_s:.1f} steps)" if s in table[n] else "-"
                         for n in COUNTS]
                print(f"| {s} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
