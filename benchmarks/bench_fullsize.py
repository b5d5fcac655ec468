"""Full-size check and benchmark: the real SDXL and FLUX.1 architectures, five real-rank LoRAs, every strategy.

    # CPU check (random weights, bf16, 256², few steps; FLUX.1 at full width with 2 double + 4 single blocks)
    python benchmarks/bench_fullsize.py --family sdxl --size 256 --steps 4 --counts 5
    python benchmarks/bench_fullsize.py --family flux --size 256 --steps 4 --counts 5 --flux-blocks 2,4
    # GPU (ready, not run here): full-size SDXL and FLUX.1-dev at 1024², bf16, all measurements
    python benchmarks/bench_fullsize.py --device cuda --size 1024 --steps 20 --counts 2,3,5 \\
        --flux-blocks 19,38 --t5-layers 24 --compile --json results/fullsize-gpu.json

The pipelines are built from the published configs (SDXL base 1.0: UNet, CLIP ViT-L and OpenCLIP bigG text
encoders, VAE; FLUX.1-dev: transformer, CLIP-L, T5-XXL, VAE) with seeded random weights, directly in the chosen
dtype (no float32 copy). FLUX can be cut to fewer blocks (``--flux-blocks``) and T5 to fewer layers
(``--t5-layers``) at full width, so every layer keeps its real shape. Random weights make noise images; what is
measured is what does not depend on the weights: that every strategy runs, time and memory.

LoRAs: five files, written by PEFT (``save_lora_weights``) on the real modules at a real rank (SDXL 32, FLUX 16)
on the denoiser's attention and feed-forward layers and the first text encoder; for SDXL, files 2 and 4 are
converted to kohya keys with ``diffusers.utils.convert_state_dict_to_kohya`` (the layouts found on Civitai).

Measured, in one run (ratios within the run, because absolute times on a shared machine are noise):

* loading the five LoRAs: the studio (``Studio.load``) vs diffusers (``load_lora_weights`` per file), and
  the peak memory of each (``--skip-diffusers-load`` to leave the diffusers side out);
* per N in ``--counts``: every registered strategy's process CPU time per image vs merge (wall times too, in
  the JSON; on a shared machine CPU time with one torch thread is the steadier measure) and its peak memory
  (CUDA: ``max_memory_allocated``; CPU: the process's peak resident set, reset before each render);
* composite batched (all lanes in one call) vs N sequential passes (``max_lanes=1``: the same image);
* ``--compile``: merge and composite eager vs ``Studio(compile=True)`` (first render = compile time, then one
  timed render), on a separate studio;
* ``--quant`` (last: it quantizes the denoiser in place): 4-bit (the default ``QuantConfig``, INT4 W4A16 +
  rank-32 branch, no calibration) vs 16-bit, merge and composite.

Each strategy renders one image, plus ``--rounds`` more (median); the time per image leaves out loading and the
strategy's one-off ``prepare`` (CMLoRA's profiles, weight-space merges), which is reported separately.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
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

from fusion import REGISTRY  # noqa: E402
from pipelines.errors import StudioError  # noqa: E402
from pipelines.families import FLUX, SDXL  # noqa: E402
from pipelines.tiny import _eval, clip_tokenizer  # noqa: E402

PROMPT = "a corgi in a garden, watercolor"
DEFAULTS: dict[str, dict] = {"gated": {"mode": "schedule"}}  # learned gates need a training run first
SDXL_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
FLUX_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out"]
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
RANK = {"sdxl": 32, "flux": 16}


# ------------------------------------------------------------------------------------------------ models
@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def _clip(hidden: int, layers: int, heads: int, act: str, projection: int | None = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=4 * hidden,
                          num_hidden_layers=layers, num_attention_heads=heads, projection_dim=projection or hidden,
                          hidden_act=act, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                          pad_token_id=49407)


def build_sdxl(dtype: torch.dtype, seed: int = 0):
    """SDXL base 1.0's published configs (unet/, text_encoder/, text_encoder_2/, vae/ config.json)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    with default_dtype(dtype):
        unet = UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
            use_linear_projection=True, norm_num_groups=32)
        te1 = CLIPTextModel(_clip(768, 12, 12, "quick_gelu"))
        te2 = CLIPTextModelWithProjection(_clip(1280, 32, 20, "gelu", projection=1280))
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            latent_channels=4, norm_num_groups=32, sample_size=1024, scaling_factor=0.13025)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=clip_tokenizer(),
                                     tokenizer_2=clip_tokenizer(pad_token="!"), unet=unet, scheduler=scheduler)
    return _eval(pipe)


def build_flux(dtype: torch.dtype, double: int = 19, single: int = 38, t5_layers: int = 24, seed: int = 0):
    """FLUX.1-dev's published configs at full width; ``double``/``single`` blocks and T5 layers may be fewer.

    The T5 slot holds a T5-XXL-width encoder driven by the CLIP tokenizer (no sentencepiece model offline)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    with default_dtype(dtype):
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=double, num_single_layers=single, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56))
        te = CLIPTextModel(_clip(768, 12, 12, "quick_gelu"))
        t5 = T5EncoderModel(T5Config(vocab_size=49408, d_model=4096, d_kv=64, d_ff=10240, num_layers=t5_layers,
                                     num_heads=64, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                                     pad_token_id=49407, eos_token_id=49407, decoder_start_token_id=0))
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            latent_channels=16, norm_num_groups=32, sample_size=1024, use_quant_conv=False,
                            use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=te, tokenizer=clip_tokenizer(),
                        text_encoder_2=t5, tokenizer_2=clip_tokenizer(), transformer=transformer)
    return _eval(pipe)


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------------------ LoRAs
def write_loras(pipe, family_name: str, count: int, rank: int, folder: Path) -> list[Path]:
    """``count`` LoRA files on ``pipe``'s real modules (PEFT adapters added, saved, then deleted)."""
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    family = SDXL if family_name == "sdxl" else FLUX
    denoiser = getattr(pipe, family.denoiser)
    targets = SDXL_TARGETS if family is SDXL else FLUX_TARGETS
    denoiser.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), adapter_name="bench")
    pipe.text_encoder.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=CLIP_TARGETS),
                                  adapter_name="bench")
    files = []
    try:
        for i in range(count):
            gen = torch.Generator().manual_seed(100 + i)
            with torch.no_grad():
                for module in (denoiser, pipe.text_encoder):
                    for name, p in module.named_parameters():
                        if "lora_" in name:
                            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * 0.01)
            layers = {f"{family.denoiser}_lora_layers": get_peft_model_state_dict(denoiser, adapter_name="bench"),
                      "text_encoder_lora_layers": get_peft_model_state_dict(pipe.text_encoder, adapter_name="bench")}
            out = folder / f"lora{i}"
            type(pipe).save_lora_weights(str(out), weight_name="lora.safetensors", **layers)
            path = out / "lora.safetensors"
            if family is SDXL and i % 2 == 1:  # the kohya/A1111 layout, through diffusers' own converter
                kohya = convert_state_dict_to_kohya(load_file(str(path)))
                path = out / "lora_kohya.safetensors"
                save_file({k: v.contiguous() for k, v in kohya.items()}, str(path))
            files.append(path)
    finally:
        pipe.unload_lora_weights()  # takes the PEFT layers out again: the studio gets the plain modules
    left = [n for n, _ in pipe.named_modules() if "lora" in n.lower()] if hasattr(pipe, "named_modules") else []
    left += [n for c in (denoiser, pipe.text_encoder) for n, _ in c.named_modules() if "lora_" in n]
    if left:
        raise RuntimeError(f"PEFT layers left after unloading: {left[:3]}")
    return files


# ------------------------------------------------------------------------------------------------ memory
class PeakMemory:
    """Peak memory of a block: CUDA ``max_memory_allocated``, else the process's peak resident set (VmHWM,
    reset through ``/proc/self/clear_refs``)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_gb = float("nan")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            gc.collect()
            RUN_PEAK_GB[0] = max(RUN_PEAK_GB[0], rss_peak_gb())
            with contextlib.suppress(OSError):
                Path("/proc/self/clear_refs").write_text("5")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_gb = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            self.peak_gb = rss_peak_gb()
        RUN_PEAK_GB[0] = max(RUN_PEAK_GB[0], self.peak_gb)


RUN_PEAK_GB = [0.0]  # the largest peak any measured block saw (the resident-set peak is reset per block)


def rss_peak_gb() -> float:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------ runs
@contextlib.contextmanager
def prebuilt(pipe, family):
    """``Studio(...)`` on a pipeline built here (instead of loading one from a name or folder)."""
    import studio.api as api

    saved = api.load_pipeline
    api.load_pipeline = lambda *a, **k: (pipe, family)
    try:
        yield
    finally:
        api.load_pipeline = saved


def make_studio(pipe, family, name: str, **options):
    from studio import Studio

    with prebuilt(pipe, family):
        return Studio(name, **options)


def render(studio, stack, strategy, params, args, **extra):
    """One image; returns the result, its wall time per image (without loading and the strategy's one-off
    prepare, ``Result.timings["per_image_s"]``), the process CPU time of the whole call (with one torch thread
    the steadier measure on a shared machine; it includes a prepare that is not cached yet) and the peak
    memory of the call."""
    device = studio.device
    sync(device)
    with PeakMemory(device) as mem:
        c0 = time.process_time()
        result = studio.compose(PROMPT, stack, strategy, strategy_params=params, steps=args.steps, seed=0,
                                width=args.size, height=args.size, output_type="np", **extra)
        sync(device)
        cpu = time.process_time() - c0
    return result, result.timings["per_image_s"], cpu, mem.peak_gb


def time_loading(pipe, family, files, device) -> dict:
    out = {}
    for label, fn in (("studio", None), ("diffusers", "diffusers")):
        if fn == "diffusers" and not ARGS.diffusers_load:
            continue
        gc.collect()
        if fn != "diffusers":
            studio = make_studio(pipe, family, f"fullsize-{family.name}", max_lanes=ARGS.max_lanes)
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            if fn == "diffusers":
                for i, f in enumerate(files):
                    pipe.load_lora_weights(str(f), adapter_name=f"l{i}")
                pipe.set_adapters([f"l{i}" for i in range(len(files))], [0.8] * len(files))
            else:
                studio.load([str(f) for f in files])
            sync(device)
            seconds = time.perf_counter() - t0
        out[label] = {"s": seconds, "peak_gb": mem.peak_gb}
        if fn == "diffusers":
            pipe.unload_lora_weights()
        else:
            studio.unload()
    return out


def drop_derived(studio) -> None:
    """Detach what a weight-space merge derived from the stack and drop the strategies' caches, so memory does
    not grow strategy after strategy (a full-size merged adapter is as large as the LoRAs it came from)."""
    for name, attached in list(studio.composer.adapters.items()):
        if attached.derived_from and name in studio.composer.adapters:
            studio.composer.remove(name)
    studio.composer.cache.clear()
    gc.collect()


def strategies(only: set[str]) -> list[tuple[str, dict]]:
    names = ["merge"] + [n for n in REGISTRY if n != "merge"]
    return [(n, dict(DEFAULTS.get(n, {}))) for n in names if not only or n in only or n == "merge"]


def bench(args) -> dict:
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    family = SDXL if args.family == "sdxl" else FLUX
    t0 = time.perf_counter()
    if family is SDXL:
        pipe = build_sdxl(dtype)
    else:
        double, single = (int(x) for x in args.flux_blocks.split(","))
        pipe = build_flux(dtype, double, single, args.t5_layers)
    built_s = time.perf_counter() - t0
    params = {name: count_params(getattr(pipe, name)) for name in (family.denoiser, *family.text_encoders, "vae")}
    log(f"built {args.family} in {built_s:.0f} s: " + ", ".join(f"{k} {v / 1e9:.2f} B" for k, v in params.items()))
    workdir = Path(tempfile.mkdtemp(prefix="bench-fullsize-"))
    t0 = time.perf_counter()
    files = write_loras(pipe, args.family, max(args.counts), RANK[args.family], workdir)
    log(f"wrote {len(files)} LoRAs (rank {RANK[args.family]}) in {time.perf_counter() - t0:.0f} s: "
        + ", ".join(f"{f.name} {f.stat().st_size / 2**20:.0f} MiB" for f in files))
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    result: dict = {"params": params, "build_s": built_s, "lora_rank": RANK[args.family],
                    "lora_files": [f"{f.parent.name}/{f.name}" for f in files],
                    "lora_mib": [f.stat().st_size / 2**20 for f in files]}
    result["loading"] = time_loading(pipe, family, files, device)
    log(f"loading: {result['loading']}")
    studio = make_studio(pipe, family, f"fullsize-{args.family}", max_lanes=args.max_lanes)
    extra = {"pipeline_kwargs": {"max_sequence_length": 77}} if family is FLUX else {}
    rows: dict[str, dict] = {}
    for n in args.counts:
        stack = [f"{f}:0.8" for f in files[:n]]
        per: dict[str, list] = {}
        for name, params_ in strategies(args.only):
            try:
                first, wall, cpu, peak = render(studio, stack, name, params_, args, **extra)
                per[name] = [(wall, cpu, peak, first.timings["prepare_s"])]
                for _ in range(args.rounds):
                    _, wall, cpu, peak = render(studio, stack, name, params_, args, **extra)
                    per[name].append((wall, cpu, peak, 0.0))
                log(f"N={n} {name}: wall {[round(s[0], 1) for s in per[name]]} s, CPU "
                    f"{[round(s[1], 1) for s in per[name]]} s, peak {peak:.2f} GB")
            except (StudioError, NotImplementedError, ValueError) as e:
                rows.setdefault(name, {})[n] = {"error": str(e).splitlines()[0][:160]}
                log(f"N={n} {name}: n/a ({e})")
            drop_derived(studio)
        def timed(samples):  # after the first render (its CPU time includes an uncached prepare), if any
            return samples[1:] or samples

        merge_wall = statistics.median(s[0] for s in timed(per["merge"]))
        merge_cpu = statistics.median(s[1] for s in timed(per["merge"]))
        for name, samples in per.items():
            wall = statistics.median(s[0] for s in timed(samples))
            cpu = statistics.median(s[1] for s in timed(samples))
            rows.setdefault(name, {})[n] = {"s": wall, "cpu_s": cpu, "ratio": cpu / merge_cpu,
                                            "wall_ratio": wall / merge_wall, "peak_gb": max(s[2] for s in samples),
                                            "prepare_s": samples[0][3]}
        if "composite" in per:  # N sequential passes: one lane per denoiser call, the same image
            _, wall, cpu, peak = render(studio, stack, "composite", {}, args, max_lanes=1, **extra)
            rows.setdefault("composite[max_lanes=1]", {})[n] = {"s": wall, "cpu_s": cpu, "ratio": cpu / merge_cpu,
                                                               "wall_ratio": wall / merge_wall, "peak_gb": peak}
            log(f"N={n} composite sequential: wall {wall:.1f} s, CPU {cpu:.1f} s, peak {peak:.2f} GB")
    result["rows"] = rows
    if args.compile:
        result["compile"] = bench_compile(pipe, family, files, args, extra)
    if args.quant:
        result["quant"] = bench_quant(pipe, family, files, args, extra, rows)
    return result


def bench_compile(pipe, family, files, args, extra) -> dict:
    """Eager vs compiled (inductor), merge and composite at the largest N: first render (compiles) and one more."""
    out = {}
    stack = [f"{f}:0.8" for f in files[: max(args.counts)]]
    eager = make_studio(pipe, family, f"fullsize-{args.family}", max_lanes=args.max_lanes)
    for name in ("merge", "composite"):
        render(eager, stack, name, {}, args, **extra)  # warm-up (packing, first-touch allocations)
        _, wall, _, _ = render(eager, stack, name, {}, args, **extra)
        out[f"{name}/eager"] = wall
    eager.unload()
    compiled = make_studio(pipe, family, f"fullsize-{args.family}", max_lanes=args.max_lanes, compile=True)
    for name in ("merge", "composite"):
        _, first, _, _ = render(compiled, stack, name, {}, args, **extra)
        _, wall, _, _ = render(compiled, stack, name, {}, args, **extra)
        out[f"{name}/compiled_first"] = first
        out[f"{name}/compiled"] = wall
        log(f"compile {name}: eager {out[f'{name}/eager']:.1f} s, compiled first {first:.1f} s, then {wall:.1f} s")
    compiled.unload()
    compiled.compiled.remove()
    return out


def bench_quant(pipe, family, files, args, extra, rows) -> dict:
    """4-bit vs 16-bit, merge and composite at the largest N: the denoiser is quantized *in place* (the default
    ``QuantConfig``, no calibration: random weights have nothing to calibrate), so this runs last."""
    from pipelines.quant.convert import quantize_pipeline
    from pipelines.quant.quantizer import QuantConfig

    n = max(args.counts)
    stack = [f"{f}:0.8" for f in files[:n]]
    t0 = time.perf_counter()
    quantize_pipeline(pipe, family, QuantConfig(), None)
    out = {"quantize_s": time.perf_counter() - t0}
    studio = make_studio(pipe, family, f"fullsize-{args.family}", max_lanes=args.max_lanes)
    out["runtime"] = str(studio.runtime)
    for name in ("merge", "composite"):
        render(studio, stack, name, {}, args, **extra)  # warm-up
        _, wall, _, peak = render(studio, stack, name, {}, args, **extra)
        sixteen = rows.get(name, {}).get(n, {})
        out[name] = {"s": wall, "peak_gb": peak, "vs_16bit": wall / sixteen["s"] if "s" in sixteen else None,
                     "peak_16bit_gb": sixteen.get("peak_gb")}
        log(f"4-bit {name}: {wall:.1f} s (16-bit {sixteen.get('s', float('nan')):.1f} s), peak {peak:.2f} GB")
    return out


# ------------------------------------------------------------------------------------------------ report
def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch thread(s)"


def table(args, result: dict) -> str:
    lines = [f"| strategy ({args.family.upper()}, {args.size}², {args.steps} steps, {args.dtype}) | "
             + " | ".join(f"N={n}: CPU time vs merge | peak GB" for n in args.counts) + " |",
             "|---|" + "---:|---:|" * len(args.counts)]
    order = ["merge"] + [n for n in REGISTRY if n != "merge"]
    names = sorted(result["rows"], key=lambda k: (order.index(k.split("[")[0]) if k.split("[")[0] in order
                                                  else len(order), k))
    for name in names:
        per_n = result["rows"][name]
        cells = []
        for n in args.counts:
            cell = per_n.get(n, {})
            if "error" in cell:
                cells += ["n/a", ""]
            elif not cell:
                cells += ["", ""]
            else:
                time_cell = f"1.00 ({cell['cpu_s']:.1f} s)" if name == "merge" else f"{cell['ratio']:.2f}"
                cells += [time_cell, f"{cell['peak_gb']:.1f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    load = result["loading"]
    lines.append("")
    lines.append("loading 5 LoRAs: " + "; ".join(f"{k} {v['s']:.1f} s (peak {v['peak_gb']:.1f} GB)"
                                                for k, v in load.items()))
    for name, per_n in result["rows"].items():
        for n, cell in per_n.items():
            if cell.get("prepare_s", 0.0) > 0.5:
                lines.append(f"`{name}` N={n}: one-off prepare {cell['prepare_s']:.1f} s (first run of a stack)")
            if "error" in cell:
                lines.append(f"`{name}` N={n} n/a: {cell['error']}")
    return "\n".join(lines)


def main() -> None:
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=["sdxl", "flux"], default="sdxl")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--counts", default="5", help="stack sizes, e.g. 2,3,5")
    ap.add_argument("--rounds", type=int, default=0,
                    help="more renders per strategy after the first (0: the first render's time per image, which "
                         "leaves out the strategy's one-off prepare)")
    ap.add_argument("--only", default="", help="comma-separated strategies (merge is always timed)")
    ap.add_argument("--flux-blocks", default="19,38", help="FLUX double,single blocks (FLUX.1: 19,38)")
    ap.add_argument("--t5-layers", type=int, default=24, help="T5 encoder layers (T5-XXL: 24)")
    ap.add_argument("--max-lanes", default="auto")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compile", action="store_true", help="also time eager vs torch.compile (inductor)")
    ap.add_argument("--quant", action="store_true", help="also time 4-bit vs 16-bit")
    ap.add_argument("--skip-diffusers-load", dest="diffusers_load", action="store_false",
                    help="do not time diffusers' load_lora_weights")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    ARGS = args
    args.counts = [int(c) for c in args.counts.split(",")]
    args.only = {s.strip() for s in args.only.split(",") if s.strip()}
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    result = bench(args)
    device = torch.device(args.device)
    head = (f"{args.family.upper()} full-size architecture (random weights), {machine(device)}, torch "
            f"{torch.__version__}; one run; process CPU time per image relative to merge (median of "
            f"{max(1, args.rounds)} render(s){' after a first one' if args.rounds else ''})")
    if args.family == "flux":
        head += f"; FLUX blocks {args.flux_blocks} (double,single), T5 layers {args.t5_layers}"
    print("\n" + head + "\n")
    print(table(args, result))
    if "compile" in result:
        print("\ncompile: " + ", ".join(f"{k} {v:.1f} s" for k, v in result["compile"].items()))
    if "quant" in result:
        print(f"\n4-bit: {result['quant']}")
    if device.type == "cpu":
        print(f"\nprocess peak resident memory: {max(RUN_PEAK_GB[0], rss_peak_gb()):.1f} GB (whole run)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: (sorted(v) if isinstance(v, set) else v)
                                                  for k, v in vars(args).items() if k != "json"},
                                         "machine": machine(device), "result": result}, indent=2, default=str))


ARGS: argparse.Namespace | None = None

if __name__ == "__main__":
    main()
