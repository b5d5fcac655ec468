"""Runtimes of the 4-bit layers (issue 17): speed vs a 16-bit ``F.linear``, memory, and error vs the 16-bit model.

    python benchmarks/bench_quant_kernels.py                       # everything; CPU: narrowed step, fp32 + bf16
    python benchmarks/bench_quant_kernels.py --only layers --device cuda   # on a GPU: bf16, dequant, triton, reference

Sections (ratios are measured in one run, variants interleaved repeat by repeat, so machine load hits all alike):

1. ``layers``: one linear at FLUX.1 shapes, M = 4096 + 512 tokens (a 1024² image and 512 text tokens),
   K×N = 3072×3072 (attention q/k/v/out), 3072×12288 (MLP up), 12288×3072 (MLP down), 15360×3072 (single-block
   ``proj_out``): the 16-bit ``F.linear`` (bf16 on a GPU; on a CPU float32 and bf16, each its own baseline), and the
   INT4 rank-32 ``QuantLinear`` under ``dequant``, ``triton`` (CUDA only) and ``reference``. Peak memory of each
   call above what was allocated before it (CUDA: the allocator's peak; CPU: resident set size sampled every ms).
2. ``step``: one FLUX.1 transformer forward with random weights, every target layer quantized (INT4, rank 32;
   weights rounded to nearest, which costs the same as SVDQuant's), at full size on a GPU (19 + 38 blocks, 3072
   wide, 1024²: 4096 + 512 tokens); on a CPU narrowed (``--step-blocks``, ``--step-width-divisor``,
   ``--step-tokens``; the defaults are printed). Memory at rest (the model's tensors) and peak.
3. ``psnr``: the trained tiny models (``tiny-sdxl``, ``tiny-flux``) quantized with SVDQuant and rendered under
   each runtime: PSNR (dB) vs the 16-bit model's images (2 prompts × 2 seeds, 8 steps; the test
   ``test_quant_runtimes.py`` asserts the ``dequant`` numbers).
4. ``errors``: relative output error ``‖y − xWᵀ‖ / ‖xWᵀ‖`` of single layers whose activations carry outlier
   channels (as diffusion transformers' do), under each runtime.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.quant import formats  # noqa: E402
from pipelines.quant.dequant import dequantize_weight  # noqa: E402
from pipelines.quant.linear import QuantLinear  # noqa: E402
from pipelines.quant.runtime import resolve, triton_unavailable  # noqa: E402

FLUX_SHAPES = [(3072, 3072), (3072, 12288), (12288, 3072), (15360, 3072)]
MIB = 2 ** 20


def table(headers, rows):
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")


# ------------------------------------------------------------------------------------------------ measuring
def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakMemory:
    """Peak bytes allocated during the block above what was allocated when it began (CUDA allocator, or the
    process's resident set sampled every millisecond on a CPU)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.start = _rss()
            self._max = self.start
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._max = max(self._max, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, _rss()) - self.start


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def clock(device: torch.device):
    """Wall time on a GPU; on a CPU with one torch thread, this thread's CPU time, which other processes on a
    shared machine disturb far less than the wall clock (they still share caches and memory bandwidth)."""
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return time.thread_time, "CPU time of the computing thread"
    return time.perf_counter, "wall time"


def interleaved_times(calls: dict, device: torch.device, repeat: int, slow: set = frozenset()) -> dict:
    """Median seconds per call of each named function, timed in turn within every repeat (one warm-up first);
    the ``slow`` ones run only in the first repeat. Also the peak extra memory of each (first timed call)."""
    now, _ = clock(device)
    times = {name: [] for name in calls}
    peaks = {}
    with torch.no_grad():
        for name, fn in calls.items():
            if name not in slow:
                fn()  # warm-up (kernel compilation, allocator)
        sync(device)
        for r in range(repeat):
            for name, fn in calls.items():
                if r and name in slow:
                    continue
                with PeakMemory(device) as mem:
                    t0 = now()
                    fn()
                    sync(device)
                    times[name].append(now() - t0)
                peaks.setdefault(name, mem.peak)
    return {name: statistics.median(v) for name, v in times.items()}, peaks


# ------------------------------------------------------------------------------------------------- layers
def random_quant_layer(n_in: int, n_out: int, *, device, dtype, fmt="int4", rank=32, seed=0) -> QuantLinear:
    """A W4A4 ``QuantLinear`` with random, plausible contents (round-to-nearest of a random weight, a random
    branch, λ near 1): the runtimes cost the same whatever the values."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)  # built where it runs (full FLUX.1: ~500 layers)
    layer = QuantLinear(n_in, n_out, fmt=fmt, rank=rank, smooth=True, dtype=dtype, device=device)
    weight = torch.randn(n_out, n_in, generator=gen, device=device) / n_in ** 0.5
    with torch.no_grad():
        if fmt == "int4":
            codes, scale = formats.quantize_int4(weight, layer.group_size)
            layer.wscales.copy_(formats.to_bits(scale, torch.float16))
        else:
            codes, block, global_scale = formats.quantize_nvfp4(weight, layer.group_size)
            layer.wscales.copy_(formats.to_bits(block, torch.float8_e4m3fn))
            layer.wscale_global.copy_(formats.to_bits(global_scale.reshape(1), torch.float32))
        layer.qweight.copy_(formats.pack_int4(codes))
        layer.smooth.copy_(torch.exp(torch.randn(n_in, generator=gen, device=device) * 0.1))
        layer.lora_down.copy_(torch.randn(rank, n_in, generator=gen, device=device) / n_in ** 0.5)
        layer.lora_up.copy_(torch.randn(n_out, rank, generator=gen, device=device) * 0.02)
        layer.bias.copy_(torch.randn(n_out, generator=gen, device=device) * 0.01)
    return layer


def runtimes_here(device: torch.device) -> list[str]:
    return ["dequant"] + (["triton"] if triton_unavailable(device) is None else []) + ["reference"]


def bench_layers(args, device):
    dtypes = [torch.bfloat16] if device.type == "cuda" else [torch.float32, torch.bfloat16]
    tokens = args.tokens
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"\n## Per layer: {tokens} tokens, FLUX.1 shapes, INT4 rank 32, {name}, {clock(device)[1]}\n")
    rows, out = [], {}
    for dtype in dtypes:
        for n_in, n_out in FLUX_SHAPES:
            gen = torch.Generator(device="cpu").manual_seed(n_in + n_out)
            x = torch.randn(tokens, n_in, generator=gen).to(device, dtype)
            weight = (torch.randn(n_out, n_in, generator=gen) / n_in ** 0.5).to(device, dtype)
            bias = torch.zeros(n_out, device=device, dtype=dtype)
            layer = random_quant_layer(n_in, n_out, device=device, dtype=dtype)
            runtimes = runtimes_here(device)
            if device.type == "cpu" and dtype == torch.bfloat16:
                runtimes = ["dequant"]  # the reference path computes in float32 whatever the activations are

            def under(runtime):
                def call():
                    layer.runtime = runtime
                    return layer(x)
                return call

            calls = {"16-bit": lambda: F.linear(x, weight, bias), **{r: under(r) for r in runtimes},
                     "weight dequantization": lambda: dequantize_weight(layer, dtype)}
            times, peaks = interleaved_times(calls, device, args.repeat, slow={"reference"})
            base = times["16-bit"]
            key = f"{str(dtype).removeprefix('torch.')} {n_in}x{n_out}"
            out[key] = {"seconds": times, "peak_bytes": peaks}
            if "triton" in runtimes:  # the compiled kernel against the exact path, before trusting its speed
                with torch.no_grad():
                    ref = under("reference")().float()
                    diff = (under("triton")().float() - ref).abs().max().item() / ref.abs().max().item()
                out[key]["triton_vs_reference"] = diff
                print(f"  {key}: triton vs reference, max |difference| / max |reference| = {diff:.2e} (bf16 output "
                      "rounding is 3.9e-3 of a value)")
            rest16 = weight.numel() * weight.element_size()
            rest_q = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
            rows.append([key, f"{base * 1e3:.1f}"]
                        + [f"{times[r] / base:.2f}x" if r in times else "-" for r in ("dequant", "triton", "reference")]
                        + [f"{times['weight dequantization'] / base:.3f}x",
                           f"{rest16 / MIB:.0f} / {rest_q / MIB:.1f}",
                           " / ".join(f"{peaks[k] / MIB:.0f}" for k in calls if k in ("16-bit", *runtimes))])
            print(f"  {key}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in times.items()), flush=True)
    print()
    table(["dtype, K x N", "16-bit ms", "dequant", "triton", "reference", "of which dequantizing the weight",
           "at rest MiB (16-bit / 4-bit)",
           "peak extra MiB (" + ", ".join(["16-bit", *runtimes_here(device)]) + ")"], rows)
    return out


# --------------------------------------------------------------------------------------------------- step
def flux_transformer(blocks: tuple[int, int], width_divisor: int, device, dtype):
    from diffusers import FluxTransformer2DModel

    d = width_divisor
    head = 128 // d
    rope = (16, 56, 56) if d == 1 else (head - 2 * (2 * (head // 8)), 2 * (head // 8), 2 * (head // 8))
    torch.manual_seed(0)
    with torch.device("meta"):
        model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=blocks[0], num_single_layers=blocks[1],
                                       attention_head_dim=head, num_attention_heads=24, joint_attention_dim=4096 // d,
                                       pooled_projection_dim=768 // d, guidance_embeds=True, axes_dims_rope=rope)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.to(dtype).eval()


def quantize_randomly(model, device, dtype):
    from pipelines.quant.targets import plan_targets

    targets, _ = plan_targets(model, "flux", group_size=64, rank=32)
    for i, t in enumerate(targets):
        parent_path, _, child = t.path.rpartition(".")
        parent = model.get_submodule(parent_path)
        layer = random_quant_layer(t.in_features, t.out_features, device=device, dtype=dtype, rank=t.rank or 32, seed=i)
        if t.mode == "w4a16":  # adaLN: weight-only, no smoothing, no branch
            w4a16 = QuantLinear(t.in_features, t.out_features, rank=0, smooth=False, mode="w4a16", dtype=dtype,
                                device=device)
            w4a16.qweight, w4a16.wscales, w4a16.bias = layer.qweight, layer.wscales, layer.bias
            layer = w4a16
        setattr(parent, child, layer)
    return len(targets)


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def bench_step(args, device):
    full = device.type == "cuda" and not args.step_narrow
    blocks = (19, 38) if full else tuple(args.step_blocks)
    divisor = 1 if full else args.step_width_divisor
    image_tokens, text_tokens = (4096, 512) if full else tuple(args.step_tokens)
    dtype = torch.bfloat16 if device.type == "cuda" else args.cpu_dtype
    what = "full FLUX.1" if full else f"FLUX.1 narrowed: {blocks[0]}+{blocks[1]} blocks, 1/{divisor} width"
    print(f"\n## One transformer step: {what}, {image_tokens}+{text_tokens} tokens, {dtype}, random weights, "
          f"{clock(device)[1]}\n")
    gen = torch.Generator(device="cpu").manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, image_tokens, 64, generator=gen).to(device, dtype),
        encoder_hidden_states=torch.randn(1, text_tokens, 4096 // divisor, generator=gen).to(device, dtype),
        pooled_projections=torch.randn(1, 768 // divisor, generator=gen).to(device, dtype),
        timestep=torch.tensor([0.5], device=device, dtype=dtype),
        img_ids=torch.zeros(image_tokens, 3, device=device, dtype=dtype),
        txt_ids=torch.zeros(text_tokens, 3, device=device, dtype=dtype),
        guidance=torch.tensor([3.5], device=device, dtype=dtype),
        return_dict=False,
    )
    model16 = flux_transformer(blocks, divisor, device, dtype)  # both stay loaded (full size: 22 + 6.5 GB) so that
    rest16 = model_bytes(model16)  # their runs interleave
    model_q = flux_transformer(blocks, divisor, device, dtype)
    n = quantize_randomly(model_q, device, dtype)
    rest_q = model_bytes(model_q)
    layers = [m for m in model_q.modules() if isinstance(m, QuantLinear)]

    def under(runtime):
        def call():
            for m in layers:
                m.runtime = runtime
            return model_q(**inputs)
        return call

    calls = {"16-bit": lambda: model16(**inputs), **{r: under(r) for r in runtimes_here(device)}}
    times, peaks = interleaved_times(calls, device, args.repeat, slow={"reference"})
    base = times["16-bit"]
    calls.pop("16-bit")
    counts = {r: sum(resolve(r, m, device) == r for m in layers) for r in calls}
    rows = [[name, f"{times[name]:.3f}", f"{times[name] / base:.2f}x",
             f"{(rest16 if name == '16-bit' else rest_q) / MIB:.0f}", f"{peaks[name] / MIB:.0f}",
             "-" if name == "16-bit" else f"{counts[name]} of {n}"] for name in ["16-bit", *calls]]
    table(["runtime", "seconds", "vs 16-bit", "model at rest MiB", "peak extra MiB", "layers it computes"], rows)
    print("\n(the layers a runtime does not compute run dequant: the W4A16 adaLN linears, and every layer without a "
          "kernel)")
    return {"blocks": blocks, "width_divisor": divisor, "tokens": [image_tokens, text_tokens], "dtype": str(dtype),
            "seconds": times, "peak_bytes": peaks, "rest_bytes": {"16-bit": rest16, "4-bit": rest_q}}


# --------------------------------------------------------------------------------------------------- psnr
PSNR_PROMPTS = ("a corgi astronaut on the moon", "a lighthouse at dusk, oil painting")
PSNR_CONFIGS = [("sdxl", "int4", None), ("flux", "int4", 32), ("flux", "nvfp4", None)]


def psnr(a, b):
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def bench_psnr(args, device):
    from pipelines.quant.calibrate import read_prompts
    from pipelines.quant.convert import Calibration, convert
    from pipelines.quant.quantizer import QuantConfig
    from studio import Studio

    print("\n## Image PSNR vs the 16-bit trained tiny models (dB; 2 prompts x 2 seeds, 8 steps)\n")
    root = Path(tempfile.mkdtemp(prefix="bench-quant-kernels-"))
    rows, out = [], {}
    runtimes = runtimes_here(device)
    for family, fmt, group in PSNR_CONFIGS:
        config = QuantConfig(fmt=fmt, group_size=group, alphas=(0.25, 0.5, 0.75))
        _, folder = convert(f"tiny-{family}", root / f"{family}-{fmt}", config,
                            Calibration(read_prompts(None)[:1], steps=2, samples_per_layer=128), device=str(device))
        ref = Studio(f"tiny-{family}", device=str(device))
        renders = [(p, s) for p in PSNR_PROMPTS for s in (0, 1)]
        targets = [ref.compose(p, [], steps=8, seed=s, output_type="np").latents[0] for p, s in renders]
        label = f"tiny-{family} SVDQuant {fmt.upper()}" + (f" (groups of {group})" if group else "")
        values = {}
        for runtime in runtimes:
            try:
                studio = Studio(str(folder), device=str(device), runtime=runtime)
            except Exception as e:  # e.g. triton asked for a format without a kernel
                print(f"  {label} {runtime}: {e}")
                continue
            got = [studio.compose(p, [], steps=8, seed=s, output_type="np").latents[0] for p, s in renders]
            values[runtime] = statistics.mean(psnr(a, b) for a, b in zip(got, targets))
        out[label] = values
        rows.append([label] + [f"{values[r]:.1f}" if r in values else "-" for r in ("dequant", "triton", "reference")])
    table(["model", "dequant (W4A16)", "triton (W4A4)", "reference (W4A4)"], rows)
    return out


# ------------------------------------------------------------------------------------------------- errors
def bench_errors(args, device):
    from pipelines.quant.calibrate import LayerStats
    from pipelines.quant.quantizer import QuantConfig, quantize_linear
    from pipelines.quant.targets import Target

    print("\n## Layer output error vs 16-bit, activations with outlier channels (held-out tokens)\n")
    rows, out = [], {}
    for i, (n_in, n_out) in enumerate([(1024, 1024), (1024, 4096), (4096, 1024)]):
        gen = torch.Generator().manual_seed(i)
        linear = torch.nn.Linear(n_in, n_out)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(n_out, n_in, generator=gen) / n_in ** 0.5)
        x = torch.randn(512, n_in, generator=gen) * torch.exp(torch.randn(n_in, generator=gen) * 0.5)
        x[:, torch.randperm(n_in, generator=gen)[: n_in // 128]] *= 40
        stats = LayerStats(amax=x.abs().amax(0), sample=x[:256])
        for fmt in ("int4", "nvfp4"):
            layer, _ = quantize_linear(linear, Target("l", n_in, n_out, True, "w4a4", 32), stats,
                                       QuantConfig(fmt=fmt, alphas=(0.0, 0.25, 0.5, 0.75, 1.0)))
            layer = layer.to(device)
            held = x[256:].to(device)
            exact = F.linear(held, linear.weight.to(device), linear.bias.to(device))
            errs = {}
            for runtime in runtimes_here(device):
                if resolve(runtime if runtime != "triton" else "auto", layer, device) != runtime:
                    continue
                layer.runtime = runtime
                with torch.no_grad():
                    errs[runtime] = ((layer(held) - exact).norm() / exact.norm()).item()
            key = f"{n_in}->{n_out} {fmt}"
            out[key] = errs
            rows.append([key] + [f"{errs[r]:.4f}" if r in errs else "-" for r in ("dequant", "triton", "reference")])
    table(["layer, format", "dequant", "triton", "reference"], rows)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="errors,psnr,layers,step")
    ap.add_argument("--device", default=None)
    ap.add_argument("--tokens", type=int, default=4096 + 512, help="tokens per layer call (FLUX.1 at 1024²)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--step-narrow", action="store_true", help="narrow the step benchmark on a GPU too")
    ap.add_argument("--step-blocks", type=int, nargs=2, default=(2, 4), help="CPU: double and single blocks")
    ap.add_argument("--step-width-divisor", type=int, default=4, help="CPU: FLUX.1 width divided by this")
    ap.add_argument("--step-tokens", type=int, nargs=2, default=(1024, 128), help="CPU: image and text tokens")
    ap.add_argument("--cpu-dtype", type=lambda s: getattr(torch, s), default=torch.float32)
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sections = {"layers": bench_layers, "step": bench_step, "psnr": bench_psnr, "errors": bench_errors}
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "threads": torch.get_num_threads()}
    for name in args.only.split(","):
        t0 = time.perf_counter()
        results[name] = sections[name](args, device)
        print(f"\n({name}: {time.perf_counter() - t0:.0f} s)", flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
