"""4-bit SVDQuant benchmark: layer error (SVDQuant vs round-to-nearest, INT4 vs NVFP4), image PSNR vs 16 bits on the
tiny pipelines, memory at full FLUX.1 / SDXL size, memory measured on a mid-size model, reference-path timing.

    python benchmarks/bench_quant.py                        # everything that runs on a CPU
    python benchmarks/bench_quant.py --only memory          # memory, layers, psnr, measured, timing
    python benchmarks/bench_quant.py --only timing --device cuda   # the reference path on a GPU

Sections:

1. ``layers``: relative output error ``||Q(x) - x Wᵀ|| / ||x Wᵀ||`` on held-out tokens, per layer, for
   (a) synthetic 1024-wide layers whose activations carry outlier channels (as diffusion transformers' do) and
   (b) layers of FLUX.1 at 1/8 width (every block kept, random weights) with activations recorded from real
   pipeline renders. The first half of the recorded tokens choose α, the second half measure the error.
2. ``psnr``: the same prompt and seed on the 16-bit tiny model and on its quantized folder (loaded through
   ``Studio(DIR)``), images in [0, 1]; with and without two LoRAs (merge).
3. ``memory``: bytes of the FLUX.1-dev transformer and the SDXL UNet, 16-bit vs quantized, by arithmetic from
   the published configs, checked against the diffusers classes built on the ``meta`` device.
4. ``measured``: FLUX.1 at 1/8 width quantized for real: bytes in memory and on disk vs its 16-bit file.
5. ``timing``: the reference path vs a 16-bit ``nn.Linear`` at FLUX.1 layer shapes (meaningful on a GPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import archs  # noqa: E402
from pipelines.quant.calibrate import LayerStats, read_prompts  # noqa: E402
from pipelines.quant.convert import Calibration, convert, quantize_pipeline  # noqa: E402
from pipelines.quant.memory import (FLUX1_DEV, SDXL_BASE, flux_arithmetic, meta_bytes, meta_denoiser,  # noqa: E402
                                    model_bytes, sdxl_arithmetic, summarize)
from pipelines.quant.quantizer import QuantConfig, quantize_linear, relative_error  # noqa: E402
from pipelines.quant.targets import Target, plan_targets  # noqa: E402

GIB = 2 ** 30
CONFIGS = {  # name -> (format, method)
    "SVDQuant INT4": ("int4", "svdquant"), "RTN INT4": ("int4", "rtn"),
    "SVDQuant NVFP4": ("nvfp4", "svdquant"), "RTN NVFP4": ("nvfp4", "rtn"),
}


def table(headers, rows):
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")


# --------------------------------------------------------------------------------------------------- layers
def outlier_layer(n_in, n_out, tokens, seed):
    gen = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(n_in, n_out)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n_out, n_in, generator=gen) / n_in ** 0.5)
        cols = torch.randperm(n_in, generator=gen)[: n_in // 256]
        linear.weight[:, cols] *= 6  # a few weight outlier columns
    x = torch.randn(tokens, n_in, generator=gen)
    x *= torch.exp(torch.randn(n_in, generator=gen) * 0.5)  # channel scales vary
    hot = torch.randperm(n_in, generator=gen)[: max(2, n_in // 128)]
    x[:, hot] *= 40  # activation outlier channels
    return linear, x


def layer_errors(linear, x, path, mode, alphas):
    half = x.shape[0] // 2
    stats = LayerStats(amax=x.abs().amax(0), sample=x[:half])
    out = {}
    n_out, n_in = linear.weight.shape
    for name, (fmt, method) in CONFIGS.items():
        config = QuantConfig(fmt=fmt, method=method, alphas=alphas)
        if n_in % config.group_size:
            continue
        rank = 32 if (method == "svdquant" and mode == "w4a4") else 0
        layer, report = quantize_linear(linear, Target(path, n_in, n_out, linear.bias is not None, mode, rank),
                                        stats, config)
        out[name] = relative_error(layer, linear.weight, x[half:])
    return out


def bench_layers(args):
    print("\n## Per-layer relative output error (held-out tokens)\n")
    rows = []
    for i, (n_in, n_out) in enumerate([(1024, 1024), (1024, 4096), (4096, 1024)]):
        linear, x = outlier_layer(n_in, n_out, 512, seed=i)
        errs = layer_errors(linear, x, "synthetic", "w4a4", args.alphas)
        rows.append([f"synthetic {n_in}->{n_out}, outlier channels"] + [f"{errs[c]:.4f}" for c in CONFIGS])
    table(["layer"] + list(CONFIGS), rows)

    print(f"\nFLUX.1 at 1/{args.width_divisor} width, activations from {args.calib_prompts} prompt(s) x "
          f"{args.calib_steps} step(s) at {args.size} px; blocks {args.blocks}:\n")
    from pipelines import Composer
    from pipelines.families import FLUX
    from pipelines.quant.calibrate import calibrate

    pipe = archs.flux(args.width_divisor)
    pipe.set_progress_bar_config(disable=True)
    denoiser = pipe.transformer
    targets, skipped = plan_targets(denoiser, "flux", group_size=64, rank=32)
    keep = [t for t in targets if any(t.path.startswith(b + ".") for b in args.blocks)]
    modules = {t.path: denoiser.get_submodule(t.path) for t in keep}
    stats = calibrate(Composer(pipe, FLUX), modules, read_prompts(None)[: args.calib_prompts],
                      steps=args.calib_steps, width=args.size, height=args.size, guidance=3.5,
                      samples_per_layer=512)
    per_kind: dict[str, dict[str, list[float]]] = {}
    results = {}
    for t in keep:
        x = stats[t.path].sample
        errs = layer_errors(modules[t.path], x, t.path, t.mode, args.alphas)
        results[t.path] = errs
        kind = ("double." if t.path.startswith("transformer_blocks") else "single.") + t.path.split(".", 2)[2]
        for c, e in errs.items():
            per_kind.setdefault(kind, {}).setdefault(c, []).append(e)
    rows = [[kind, t_mode(kind)] + [f"{statistics.mean(v[c]):.4f}" for c in CONFIGS] for kind, v in per_kind.items()]
    table(["layer (mean over blocks)", "mode"] + list(CONFIGS), rows)
    means = {c: statistics.mean(e[c] for e in results.values()) for c in CONFIGS}
    w4a4 = [p for p, t in zip(results, keep) if t.mode == "w4a4"]
    wins = sum(results[p]["SVDQuant INT4"] < results[p]["RTN INT4"] for p in w4a4)
    print(f"\nmean over {len(results)} layers: " + ", ".join(f"{c} {m:.4f}" for c, m in means.items()))
    print(f"SVDQuant INT4 below RTN INT4 on {wins} of {len(w4a4)} W4A4 layers")
    return {"synthetic": rows, "flux_eighth": results}


def t_mode(kind):
    return "w4a16" if kind.endswith(("norm1.linear", "norm1_context.linear", "norm.linear")) else "w4a4"


# ---------------------------------------------------------------------------------------------------- psnr
def psnr(a, b):
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def bench_psnr(args):
    from studio import Studio

    print("\n## Image PSNR vs the 16-bit tiny model (dB, higher is closer)\n")
    root = Path(tempfile.mkdtemp(prefix="bench-quant-"))
    loras = {"sdxl": ["assets/loras/tiny-sdxl/random-subject.safetensors:0.9",
                      "assets/loras/tiny-sdxl/random-style.safetensors:0.7"],
             "flux": ["assets/loras/tiny-flux/random-subject.safetensors:0.9",
                      "assets/loras/tiny-flux/random-style.safetensors:0.7"]}
    prompts = ["a corgi astronaut on the moon", "a lighthouse at dusk, oil painting"]
    calib = Calibration(read_prompts(None)[: args.calib_prompts], steps=args.calib_steps)
    results = {}
    rows = []
    for family in ("sdxl", "flux"):
        ref = Studio(f"tiny-{family}")

        def render(studio, stack):
            return [studio.compose(p, stack, "merge", steps=args.steps, seed=s, output_type="np").latents[0]
                    for p in prompts for s in (0, 1)]

        ref_plain, ref_lora = render(ref, []), render(ref, loras[family])
        rounded = Studio(f"tiny-{family}")  # context: the denoiser's weights merely rounded to bfloat16
        denoiser = getattr(rounded.pipe, rounded.family.denoiser)
        denoiser.to(torch.bfloat16).to(torch.float32)
        plain = statistics.mean(psnr(a, b) for a, b in zip(render(rounded, []), ref_plain))
        lora = statistics.mean(psnr(a, b) for a, b in zip(render(rounded, loras[family]), ref_lora))
        rows.append([f"tiny-{family}", "bf16 weights, no 4-bit (for scale)", "-", f"{plain:.1f}", f"{lora:.1f}"])
        results[f"{family} bf16"] = {"psnr": plain, "psnr_lora": lora}
        for name, (fmt, method) in CONFIGS.items():
            groups = [None] if not (family == "flux" and fmt == "int4") else [None, 32]
            for group in groups:
                config = QuantConfig(fmt=fmt, method=method, group_size=group, alphas=args.alphas)
                label = f"{name}" + (f" (groups of {group})" if group else "")
                result, folder = convert(f"tiny-{family}", root / f"{family}-{fmt}-{method}-{group}", config,
                                         calib if method == "svdquant" else None)
                studio = Studio(str(folder))
                plain = statistics.mean(psnr(a, b) for a, b in zip(render(studio, []), ref_plain))
                lora = statistics.mean(psnr(a, b) for a, b in zip(render(studio, loras[family]), ref_lora))
                n_q, n_skip = len(result.layers), len(result.skipped)
                results[f"{family} {label}"] = {"psnr": plain, "psnr_lora": lora, "quantized": n_q, "kept16": n_skip}
                rows.append([f"tiny-{family}", label, f"{n_q} / {n_q + n_skip}", f"{plain:.1f}", f"{lora:.1f}"])
    table(["model", "quantization", "layers quantized", "PSNR", "PSNR with 2 LoRAs (merge)"], rows)
    return results


# -------------------------------------------------------------------------------------------------- memory
def bench_memory(args):
    print("\n## Memory at full size (arithmetic from the published configs, checked on the meta device)\n")
    out = {}
    for family, arithmetic, config, title in (("flux", flux_arithmetic, FLUX1_DEV, "FLUX.1-dev transformer"),
                                              ("sdxl", sdxl_arithmetic, SDXL_BASE, "SDXL base UNet")):
        model = meta_denoiser(config)
        for fmt, group in (("int4", 64), ("nvfp4", 16)):
            report = arithmetic(config, fmt=fmt, group=group)
            b16, bq, _ = meta_bytes(model, family, fmt=fmt, group=group)
            assert (b16, bq) == (report.total16, report.total_q), f"{family} {fmt}: arithmetic != meta build"
            out[f"{family} {fmt}"] = {"bytes16": b16, "bytes_q": bq, "ratio": b16 / bq}
            if fmt == "int4":
                print(f"\n{title}, INT4 (layer by layer; counts are per model):\n")
                rows = [[r["layer"], r["shape"], r["count"], r["mode"], f"{r['mib16']:.0f}", f"{r['mib_q']:.0f}",
                         f"{r['ratio']:.2f}x"] for r in summarize(report)]
                table(["layer", "in->out", "count", "mode", "16-bit MiB", "4-bit MiB", "ratio"], rows)
        print()
    rows = [[k, f"{v['bytes16'] / GIB:.2f}", f"{v['bytes_q'] / GIB:.2f}", f"{v['ratio']:.2f}x"] for k, v in out.items()]
    print("Totals (meta build == arithmetic, asserted):\n")
    table(["denoiser / format", "16-bit GiB", "quantized GiB", "smaller by"], rows)
    return out


def bench_measured(args):
    from safetensors.torch import save_file

    from pipelines.families import FLUX

    print(f"\n## Measured: FLUX.1 at 1/{args.width_divisor} width, quantized for real (INT4, rank 32)\n")
    pipe = archs.flux(args.width_divisor)
    pipe.set_progress_bar_config(disable=True)
    root = Path(tempfile.mkdtemp(prefix="bench-quant-measured-"))
    dense_file = root / "transformer-bf16.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in pipe.transformer.state_dict().items()}, str(dense_file))
    config = QuantConfig(fmt="int4", alphas=None)  # α fixed at 0.5: memory does not depend on it
    calib = Calibration(read_prompts(None)[:1], steps=1, size=args.size, samples_per_layer=0)
    t0 = time.perf_counter()
    result = quantize_pipeline(pipe, FLUX, config, calib, default_size=args.size)
    seconds = time.perf_counter() - t0
    from pipelines.quant.storage import WEIGHTS_FILE, save_quantized

    folder = save_quantized(root / "q", pipe.transformer, family="flux", denoiser_name="transformer", base="bench",
                            quant=config.to_json(), layers={}, skipped=result.skipped)
    stored, original = model_bytes(pipe.transformer)
    report = flux_arithmetic(dict(pipe.transformer.config), fmt="int4", group=64)
    disk_q, disk_16 = (folder / WEIGHTS_FILE).stat().st_size, dense_file.stat().st_size
    rows = [["tensors in memory", f"{original / 2 ** 20:.1f}", f"{stored / 2 ** 20:.1f}", f"{original / stored:.2f}x"],
            ["safetensors on disk", f"{disk_16 / 2 ** 20:.1f}", f"{disk_q / 2 ** 20:.1f}", f"{disk_16 / disk_q:.2f}x"],
            ["arithmetic for this config", f"{report.total16 / 2 ** 20:.1f}", f"{report.total_q / 2 ** 20:.1f}",
             f"{report.ratio:.2f}x"]]
    table(["", "16-bit MiB", "quantized MiB", "smaller by"], rows)
    print(f"\n{len(result.layers)} layers quantized in {seconds:.0f} s on {args.device or 'cpu'}; kept 16-bit: "
          f"{len(result.skipped)}; in-memory bytes == arithmetic: {(stored, original) == (report.total_q, report.total16)}")
    print("(at 1/8 width the rank-32 branch is 8x larger relative to each layer than at full size, so the ratio is "
          "below the full-size one)")
    return {"stored": stored, "original": original, "disk_q": disk_q, "disk_16": disk_16, "seconds": seconds}


# -------------------------------------------------------------------------------------------------- timing
def bench_timing(args):
    from pipelines.quant.quantizer import build_layer

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokens = 4096 if device.type == "cuda" else 256
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\n## Reference path vs 16-bit nn.Linear, {name}, {tokens} tokens, {dtype}\n")
    rows, out = [], {}
    for n_in, n_out in [(3072, 3072), (3072, 12288), (12288, 3072)]:
        linear = torch.nn.Linear(n_in, n_out).to(device, dtype)
        x = torch.randn(tokens, n_in, device=device, dtype=dtype)
        for fmt, group in (("int4", 64), ("nvfp4", 16)):
            layer = build_layer(linear.weight.detach().float(), linear.bias.detach(), fmt=fmt, group_size=group,
                                rank=32, smooth=torch.ones(n_in, device=device, dtype=torch.bfloat16)).to(device)
            layer = layer.to(dtype)
            t16, tq = time_call(lambda: linear(x), device), time_call(lambda: layer(x), device)
            rows.append([f"{n_in}->{n_out}", fmt, f"{t16 * 1e3:.2f}", f"{tq * 1e3:.2f}", f"{tq / t16:.1f}x"])
            out[f"{n_in}->{n_out} {fmt}"] = {"ms16": t16 * 1e3, "ms_q": tq * 1e3}
    table(["layer", "format", "16-bit ms", "reference 4-bit ms", "slower by"], rows)
    return out


def time_call(fn, device, repeat=5):
    with torch.no_grad():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="layers,psnr,memory,measured,timing")
    ap.add_argument("--width-divisor", type=int, default=8)
    ap.add_argument("--size", type=int, default=256, help="calibration image size for the 1/8-width model")
    ap.add_argument("--calib-prompts", type=int, default=2)
    ap.add_argument("--calib-steps", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8, help="denoising steps of the PSNR renders")
    ap.add_argument("--alphas", type=lambda s: tuple(float(a) for a in s.split(",")), default=(0.0, 0.25, 0.5, 0.75, 1.0))
    ap.add_argument("--blocks", type=lambda s: s.split(","),
                    default=["transformer_blocks.0", "transformer_blocks.18", "single_transformer_blocks.0",
                             "single_transformer_blocks.37"])
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy machine)")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sections = {"layers": bench_layers, "psnr": bench_psnr, "memory": bench_memory, "measured": bench_measured,
                "timing": bench_timing}
    results = {}
    for name in args.only.split(","):
        t0 = time.perf_counter()
        results[name] = sections[name](args)
        print(f"\n({name}: {time.perf_counter() - t0:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
