"""Foundation benchmark: the composed adapter layer against the plain diffusers/PEFT way, in one run.

    python benchmarks/bench_foundation.py                      # SDXL-narrow on the CPU (real module counts)
    python benchmarks/bench_foundation.py --family flux
    python benchmarks/bench_foundation.py --width-divisor 1 --device cuda --dtype bf16   # full size, on a GPU

Measures, as ratios (diffusers time / studio time, so > 1 means the studio is faster):

1. loading 5 LoRA files: ``Studio.load`` vs ``load_lora_weights`` x 5;
2. switching the active stack (3 of the 5 loaded LoRAs, new weights): ``MixState`` vs ``set_adapters``, alone and
   followed by one denoiser step;
3. one composite step over N LoRAs: one batched forward vs N sequential passes with ``set_adapters`` (the
   released Multi-LoRA Composition code's way).

Every LoRA is written by PEFT through diffusers' ``save_lora_weights`` and targets what typical SDXL/FLUX
LoRAs target (attention, feed-forward, text-encoder attention and MLP).
"""

from __future__ import annotations

import argparse
import json
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
from pipelines import Composer  # noqa: E402
from pipelines.adapters import parse_lora  # noqa: E402
from pipelines.families import FLUX, SDXL  # noqa: E402

SDXL_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
FLUX_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out"]
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, repeat=5, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def write_loras(build, family, count, rank, folder: Path) -> list[Path]:
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    files = []
    for i in range(count):
        pipe = build()
        denoiser = getattr(pipe, family.denoiser)
        targets = SDXL_TARGETS if family is SDXL else FLUX_TARGETS
        denoiser.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), adapter_name="default")
        pipe.text_encoder.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=CLIP_TARGETS),
                                      adapter_name="default")
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for module in (denoiser, pipe.text_encoder):
                for name, p in module.named_parameters():
                    if "lora_" in name:
                        p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
        kwargs = {f"{family.denoiser}_lora_layers": get_peft_model_state_dict(denoiser, adapter_name="default"),
                  "text_encoder_lora_layers": get_peft_model_state_dict(pipe.text_encoder, adapter_name="default")}
        out = folder / f"lora{i}"
        type(pipe).save_lora_weights(str(out), weight_name="lora.safetensors", **kwargs)
        files.append(out / "lora.safetensors")
    return files


def denoiser_inputs(pipe, family, batch, device, dtype, latent=32):
    gen = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    if family is SDXL:
        unet = pipe.unet
        ctx = unet.config.cross_attention_dim
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        return dict(sample=r(batch, 4, latent, latent), timestep=torch.full((batch,), 500.0, device=device),
                    encoder_hidden_states=r(batch, 77, ctx),
                    added_cond_kwargs={"text_embeds": r(batch, pooled), "time_ids": r(batch, 6)})
    tr = pipe.transformer
    tokens = (latent // 2) ** 2
    return dict(hidden_states=r(batch, tokens, tr.config.in_channels),
                encoder_hidden_states=r(batch, 64, tr.config.joint_attention_dim),
                pooled_projections=r(batch, tr.config.pooled_projection_dim),
                timestep=torch.full((batch,), 0.5, device=device, dtype=dtype),
                guidance=torch.full((batch,), 3.5, device=device, dtype=dtype),
                img_ids=torch.zeros(tokens, 3, device=device), txt_ids=torch.zeros(64, 3, device=device))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=["sdxl", "flux"], default="sdxl")
    ap.add_argument("--width-divisor", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--composite-loras", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    family = SDXL if args.family == "sdxl" else FLUX
    build = (lambda: archs.sdxl(args.width_divisor)) if family is SDXL else (lambda: archs.flux(args.width_divisor))
    torch.set_grad_enabled(False)

    with tempfile.TemporaryDirectory() as tmp:
        files = write_loras(build, family, 5, args.rank, Path(tmp))
        ours = build().to(device, dtype)
        theirs = build().to(device, dtype)
        n_modules = len(parse_lora(files[0], ours, family).deltas)
        composer = Composer(ours, family)

        # 1. loading five files
        def load_ours():
            composer.clear()
            for i, f in enumerate(files):
                composer.add(f"l{i}", parse_lora(f, ours, family))

        def load_theirs():
            theirs.unload_lora_weights()
            for i, f in enumerate(files):
                theirs.load_lora_weights(str(f), adapter_name=f"l{i}")

        t_load_ours = timeit(load_ours, device, repeat=3)
        t_load_theirs = timeit(load_theirs, device, repeat=3)

        # 2. switching the active stack
        subsets = [["l0", "l2", "l4"], ["l1", "l3", "l0"]]
        weights = [[0.8, 0.5, 0.3], [0.6, 0.9, 0.2]]
        state = composer.state
        flip = {"i": 0}

        def switch_ours():
            i = flip["i"] = 1 - flip["i"]
            state.set_active(subsets[i])
            row = state.gains_row(dict(zip(subsets[i], weights[i])))[None]
            state.set_gains(denoiser=row, text=row)

        def switch_theirs():
            i = flip["i"] = 1 - flip["i"]
            theirs.set_adapters(subsets[i], weights[i])

        den_ours, den_theirs = getattr(ours, family.denoiser), getattr(theirs, family.denoiser)
        inputs = denoiser_inputs(ours, family, 2, device, dtype)
        t_switch_ours = timeit(switch_ours, device, repeat=20)
        t_switch_theirs = timeit(switch_theirs, device, repeat=20)
        t_switch_step_ours = timeit(lambda: (switch_ours(), den_ours(**inputs)), device, repeat=6)
        t_switch_step_theirs = timeit(lambda: (switch_theirs(), den_theirs(**inputs)), device, repeat=6)

        # 3. composite step: N lanes in one forward vs N sequential passes
        n = args.composite_loras
        names = [f"l{i}" for i in range(n)]
        state.set_active(names)
        lanes = torch.zeros(2 * n, len(state.names))  # replica i (x2 for guidance) carries LoRA i only
        lanes[:, :n] = torch.eye(n).repeat_interleave(2, dim=0)
        state.set_gains(denoiser=lanes)
        batched_inputs = denoiser_inputs(ours, family, 2 * n, device, dtype)

        def composite_ours():
            den_ours(**batched_inputs)

        def composite_theirs():
            for name in names:
                theirs.set_adapters([name], [1.0])
                den_theirs(**inputs)

        t_comp_ours = timeit(composite_ours, device, repeat=4)
        t_comp_theirs = timeit(composite_theirs, device, repeat=4)

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    rows = [
        ("load 5 LoRA files", t_load_theirs, t_load_ours),
        ("switch active stack (3 of 5, new weights)", t_switch_theirs, t_switch_ours),
        ("switch + one denoiser step", t_switch_step_theirs, t_switch_step_ours),
        (f"composite step, {n} LoRAs (batched vs {n} sequential passes)", t_comp_theirs, t_comp_ours),
    ]
    arch = f"{family.name.upper()} {'full size' if args.width_divisor == 1 else f'1/{args.width_divisor} width'}"
    print(f"\n{arch}, {n_modules} LoRA'd layers per file, rank {args.rank}, {args.dtype}, "
          f"{device.type} ({device_name}), torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| measurement | diffusers/PEFT | studio | speed-up |")
    print("|---|---:|---:|---:|")
    for label, theirs_t, ours_t in rows:
        print(f"| {label} | {theirs_t * 1e3:.1f} ms | {ours_t * 1e3:.1f} ms | {theirs_t / ours_t:.1f}x |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"arch": arch, "device": device_name, "rank": args.rank, "dtype": args.dtype,
                                         "layers_per_lora": n_modules,
                                         "rows": [{"label": l, "diffusers_s": a, "studio_s": b, "ratio": a / b}
                                                  for l, a, b in rows]}, indent=2))


if __name__ == "__main__":
    main()
