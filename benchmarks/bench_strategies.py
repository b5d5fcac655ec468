"""Time per image of every registered strategy relative to merge, for stacks of 2, 3 and 5 LoRAs.

    python benchmarks/bench_strategies.py                          # tiny SDXL and tiny FLUX on the CPU
    python benchmarks/bench_strategies.py --family flux --steps 20 --rounds 5 --json out.json
    python benchmarks/bench_strategies.py --arch narrow            # real SDXL/FLUX.1 block structure, 1/8 width

Strategies come from the registry (``fusion.REGISTRY``), each with its default parameters (or ``DEFAULTS``),
plus the variants in ``VARIANTS`` (e.g. ``cmlora`` without its cache, ``gated`` with learned gates); a strategy
added later shows up without touching this file. A strategy that cannot run on these LoRAs is listed with the
reason.

Every LoRA is written by PEFT through diffusers' ``save_lora_weights`` (UNet/transformer attention and
feed-forward, CLIP attention and MLP). Each round renders one image per strategy, in turn, with the same seed,
after one warm-up round (which fills CMLoRA's frequency-profile cache and the weight-space merges' cache; that
one-off ``prepare`` time is reported separately). ``gated[mode=learned]`` runs with freshly initialised gates
written where ``studio train-gates`` puts them: inference costs the same whether the gates are trained or not. The ratio is taken within a round
(strategy time / merge time of the same round) and the median over rounds is reported, for wall-clock time and
for this process's CPU time (one torch thread by default); on a shared machine the CPU-time ratio is the
steadier one. Times exclude model and LoRA loading.
"""

from __future__ import annotations

import argparse
import json
import os
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
from bench_foundation import FLUX_TARGETS, SDXL_TARGETS, write_loras  # noqa: E402
from fusion import REGISTRY  # noqa: E402
from pipelines.errors import StudioError  # noqa: E402
from pipelines.families import FLUX, SDXL  # noqa: E402
from pipelines.tiny import build_tiny_flux, build_tiny_sdxl  # noqa: E402

# parameters used instead of a strategy's defaults (gated: auto would switch to learned once gates exist)
DEFAULTS: dict[str, dict] = {"gated": {"mode": "schedule"}}
# extra parameter sets worth timing next to each strategy's defaults
VARIANTS: dict[str, list[dict]] = {
    "cmlora": [{"cache": False}],
    "gated": [{"mode": "learned"}],
}
PROMPT = "a zorb in a garden, inkwash"


def label(name: str, params: dict) -> str:
    return name + ("" if not params else "[" + ",".join(f"{k}={v}" for k, v in params.items()) + "]")


def variants() -> list[tuple[str, dict]]:
    out = [("merge", {})]
    for name in REGISTRY:
        if name != "merge":
            out.append((name, dict(DEFAULTS.get(name, {}))))
        out += [(name, p) for p in VARIANTS.get(name, [])]
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - w0, time.process_time() - c0


def load_studio(family_name: str, arch: str, workdir: Path):
    """The studio and a builder of its architecture: the built-in tiny model, or the real block structure at
    1/8 width (:mod:`archs`), saved as a diffusers folder and loaded from there like any local model."""
    from studio import Studio

    family = SDXL if family_name == "sdxl" else FLUX
    if arch == "tiny":
        build = build_tiny_sdxl if family is SDXL else build_tiny_flux
        return Studio(f"tiny-{family_name}-random", cache_dir=workdir / "cache"), family, build
    build = (lambda: archs.sdxl(8)) if family is SDXL else (lambda: archs.flux(8))
    folder = workdir / f"model-{family_name}"
    build().save_pretrained(str(folder))
    return Studio(str(folder), cache_dir=workdir / "cache"), family, build


def write_untrained_gates(studio, stack: list[str]) -> None:
    """Freshly initialised gates where ``studio train-gates`` would put them: they cost what trained ones cost."""
    from fusion.gates import GateSet, gates_path, stack_metadata

    names = studio.load(stack)
    loaded = studio.loaded()
    sources, hashes = [loaded[n].source for n in names], [loaded[n].sha256 for n in names]
    GateSet.for_stack(studio.composer, names).save(
        gates_path(sources, studio.model, hashes),
        stack_metadata(studio.model, studio.family.name, names, sources, hashes, steps=0))


def write_shiras(build, family, count: int, rank: int, folder: Path) -> list[Path]:
    """SHiRA adapters written by PEFT's SHiRA tuner (``ShiraConfig``, random mask per file) on the same denoiser
    targets as :func:`bench_foundation.write_loras` (linear layers only, as PEFT's SHiRA): ``r·(m+n)`` entries per
    layer, the parameter count of a rank-``rank`` LoRA; saved through diffusers' ``save_lora_weights``."""
    from peft import ShiraConfig, get_peft_model_state_dict, inject_adapter_in_model

    files = []
    for i in range(count):
        pipe = build()
        denoiser = getattr(pipe, family.denoiser)
        targets = SDXL_TARGETS if family is SDXL else FLUX_TARGETS
        linear = [t for t in targets if any(isinstance(m, torch.nn.Linear) and n.endswith(t)
                                            for n, m in denoiser.named_modules())]
        inject_adapter_in_model(ShiraConfig(r=rank, target_modules=linear, random_seed=200 + i), denoiser)
        gen = torch.Generator().manual_seed(200 + i)
        with torch.no_grad():
            for name, p in denoiser.named_parameters():
                if "shira_weight" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
        out = folder / f"shira{i}"
        type(pipe).save_lora_weights(str(out), weight_name="shira.safetensors", **{
            f"{family.denoiser}_lora_layers": get_peft_model_state_dict(denoiser, adapter_name="default")})
        files.append(out / "shira.safetensors")
    return files


# strategies also timed on a stack of SHiRA adapters (--shira), labelled "<name>[shira]"
SHIRA_STRATEGIES = ("merge", "cat", "switch", "composite")


def bench_family(family_name: str, counts: list[int], steps: int, rounds: int, workdir: Path, arch: str = "tiny",
                 size: int | None = None, only: set[str] | None = None, shira: bool = False) -> dict:
    studio, family, build = load_studio(family_name, arch, workdir)
    files = [str(f) for f in write_loras(build, family, max(counts), 4, workdir / family_name)]
    shiras = [str(f) for f in write_shiras(build, family, max(counts), 4, workdir / f"{family_name}-shira")
              ] if shira else []
    extra = {"width": size, "height": size}
    if family is FLUX:
        extra["pipeline_kwargs"] = {"max_sequence_length": 77}
    rows: dict[str, dict] = {}
    one_off: dict[str, dict] = {}
    for n in counts:
        runnable = []
        cases = [(name, params, label(name, params), files[:n]) for name, params in variants()
                 if not only or name in only]
        cases += [(name, {}, f"{name}[shira]", shiras[:n]) for name in SHIRA_STRATEGIES if shiras]
        for name, params, key, stack in cases:
            try:
                if name == "gated" and params.get("mode") == "learned":
                    write_untrained_gates(studio, stack)
                result, wall, cpu = timed(lambda: studio.compose(PROMPT, stack, name, strategy_params=params,
                                                                 steps=steps, seed=0, output_type="np", **extra))
                if result.timings["prepare_s"] > 0.05:  # profiling renders, weight-space merges (then cached)
                    one_off.setdefault(key, {})[f"N={n}"] = result.timings["prepare_s"]
                runnable.append((name, params, key, stack))
            except (StudioError, NotImplementedError, ValueError) as e:
                rows.setdefault(key, {})[n] = {"error": str(e).splitlines()[0][:120]}
        samples: dict[str, list[tuple[float, float]]] = {key: [] for _, _, key, _ in runnable}
        for _ in range(rounds):
            for name, params, key, stack in runnable:
                _, wall, cpu = timed(lambda: studio.compose(PROMPT, stack, name, strategy_params=params,
                                                            steps=steps, seed=0, output_type="np", **extra))
                samples[key].append((wall, cpu))
        base = samples["merge"]
        for key, times in samples.items():
            rows.setdefault(key, {})[n] = {
                "wall_s": statistics.median(t[0] for t in times),
                "cpu_s": statistics.median(t[1] for t in times),
                "wall_ratio": statistics.median(t[0] / b[0] for t, b in zip(times, base)),
                "cpu_ratio": statistics.median(t[1] / b[1] for t, b in zip(times, base)),
            }
        print(f"  {family_name}: N={n} done", file=sys.stderr)
    return {"rows": rows, "one_off": one_off}


def table(family_name: str, result: dict, counts: list[int], steps: int, arch: str) -> str:
    what = "tiny" if arch == "tiny" else "1/8 width"
    head = f"| strategy ({family_name.upper()} {what}, {steps} steps) | " + " | ".join(f"N={n}" for n in counts) + " |"
    lines = [head, "|---|" + "---:|" * len(counts)]
    for key, per_n in result["rows"].items():
        cells = []
        for n in counts:
            cell = per_n.get(n, {})
            if "error" in cell:
                cells.append("n/a")
            elif key == "merge":
                cells.append(f"1.00 ({cell['cpu_s'] * 1e3:.0f} ms)")
            else:
                cells.append(f"{cell['cpu_ratio']:.2f}")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    errors = {k: v for k, v in result["rows"].items() if any("error" in c for c in v.values())}
    for key, per_n in errors.items():
        reason = next(c["error"] for c in per_n.values() if "error" in c)
        lines.append(f"\n`{key}` n/a: {reason}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=["sdxl", "flux", "both"], default="both")
    ap.add_argument("--counts", default="2,3,5", help="stack sizes")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--arch", choices=["tiny", "narrow"], default="tiny",
                    help="tiny: the built-in tiny models; narrow: the real SDXL/FLUX.1 block structure at 1/8 width")
    ap.add_argument("--size", type=int, default=None, help="image size (default: 64 tiny, 256 narrow)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 keeps CPU times free of spinning)")
    ap.add_argument("--only", default="", help="comma-separated strategy names to time (default: all registered)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--shira", action="store_true", help="also time merge, cat, switch and composite on a stack of "
                    "PEFT-written SHiRA adapters (r=4: a rank-4 LoRA's parameter count), as '<name>[shira]'")
    args = ap.parse_args()
    only = {s.strip() for s in args.only.split(",") if s.strip()} | ({"merge"} if args.only else set())
    torch.set_num_threads(args.threads)
    size = args.size or (64 if args.arch == "tiny" else 256)
    counts = [int(c) for c in args.counts.split(",")]
    families = ["sdxl", "flux"] if args.family == "both" else [args.family]
    torch.set_grad_enabled(False)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family_name in families:
            results[family_name] = bench_family(family_name, counts, args.steps, args.rounds, Path(tmp), args.arch,
                                                size, only, shira=args.shira)
    cpu = f"{cpu_name()}, {os.cpu_count()} logical cores"
    print(f"\nCPU ({cpu}), {torch.get_num_threads()} threads, torch {torch.__version__}, float32, "
          f"{size}x{size} images; time per image relative to merge (median of {args.rounds} rounds, "
          "process CPU time)\n")
    for family_name in families:
        print(table(family_name, results[family_name], counts, args.steps, args.arch))
        for key, items in results[family_name]["one_off"].items():
            print(f"\none-off prepare (first run; reused while the stack is unchanged), {key}: "
                  + "; ".join(f"{k}: {v:.2f} s" for k, v in items.items()))
        print()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"arch": args.arch, "size": size, "steps": args.steps,
                                         "rounds": args.rounds, "cpu": cpu,
                                         "threads": torch.get_num_threads(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
