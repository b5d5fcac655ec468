"""FLUX control LoRA at FLUX.1-dev's full width: the studio (fused into the transformer, pipelines.control_lora) vs
diffusers (``FluxControlPipeline.load_lora_weights``: a PEFT adapter evaluated at every step).

    python benchmarks/bench_control_lora.py --blocks 2,4 --size 256 --steps 3 --json results/control-lora-cpu.json

The pipeline is bench_fullsize's FLUX.1-dev at full width (random bf16 weights; ``--blocks`` double,single blocks,
T5-XXL width with ``--t5-layers`` layers). The control LoRA is a BFL-Canny-like file at rank 128 (BFL's released
rank) on every linear layer of the transformer, ``x_embedder`` 128 wide, with ``norm_q``/``norm_k``/
``norm_added_q``/``norm_added_k`` scales, written by diffusers' ``FluxControlPipeline.save_lora_weights``; the user
LoRA is a rank-16 PEFT file on the attention and MLP layers (bench_fullsize's writer). Measured in one run:

* applying the control LoRA: the studio's read + check (``read_control_lora``) and fuse
  (``apply_control_lora``: ``W + s·B A`` per layer, 2·r·in·out flops each) vs diffusers' ``load_lora_weights``
  (wall time);
* merge images (control LoRA at 1.0 + the user LoRA at 0.8), rendered twice on each side: process CPU time of the
  second (the first includes attaching the user LoRA), studio vs diffusers (``load_lora_weights`` of both +
  ``set_adapters``: the control LoRA's rank-128 branch runs in every layer at every step), and how far the two
  images are apart (bf16: the fused weights round differently from the unfused branch);
* taking it off: ``Studio.unload()`` vs ``unload_lora_weights(reset_to_overwritten_params=True)``, and whether
  the transformer is bit for bit as before (studio: must be).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_fullsize import PROMPT, build_flux, log, machine, make_studio, write_loras  # noqa: E402
from pipelines.families import FLUX  # noqa: E402

NORMS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")


def write_control_lora(transformer, folder: Path, rank: int, seed: int = 7) -> Path:
    """A diffusers-layout control LoRA for ``transformer`` (every Linear; x_embedder twice as wide)."""
    from diffusers import FluxControlPipeline

    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear):
            width = 2 * module.in_features if name == "x_embedder" else module.in_features
            r = min(rank, module.out_features, width)
            layers[f"{name}.lora_A.weight"] = (torch.randn(r, width, generator=gen) / width ** 0.5).to(torch.bfloat16)
            layers[f"{name}.lora_B.weight"] = (torch.randn(module.out_features, r, generator=gen) * 1e-3).to(torch.bfloat16)
        elif name.rsplit(".", 1)[-1] in NORMS:
            layers[f"{name}.weight"] = (1 + 0.05 * torch.randn(module.weight.shape, generator=gen)).to(torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    FluxControlPipeline.save_lora_weights(str(folder), weight_name="control.safetensors", transformer_lora_layers=layers)
    return folder / "control.safetensors"


def control_pipeline(pipe):
    from diffusers import FluxControlPipeline

    keys = FluxControlPipeline._get_signature_keys(FluxControlPipeline)[0]
    built = FluxControlPipeline(**{k: v for k, v in pipe.components.items() if k in keys})
    built.set_progress_bar_config(disable=True)
    return built


def bench(args) -> dict:
    torch.set_num_threads(1)
    double, single = (int(x) for x in args.blocks.split(","))
    pipe = build_flux(torch.bfloat16, double, single, args.t5_layers)
    transformer = pipe.transformer
    work = Path(tempfile.mkdtemp(prefix="bench-control-lora-"))
    control = write_control_lora(transformer, work / "control", args.rank)
    [user] = write_loras(pipe, "flux", 1, 16, work / "user")
    control_image = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    from PIL import Image

    control_image = Image.fromarray((control_image[0].permute(1, 2, 0).numpy() * 255).astype("uint8"))
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    out = {"machine": machine(torch.device("cpu")), "blocks": [double, single], "size": args.size,
           "steps": args.steps, "rank": args.rank, "control_lora_mb": control.stat().st_size / 1e6}
    common = dict(steps=args.steps, seed=0, width=args.size, height=args.size, guidance=3.5, output_type="np")

    studio = make_studio(pipe, FLUX, "flux-fullwidth")
    t0 = time.perf_counter()
    file, scale = studio._control_lora_file(control)
    out["studio_read_s"] = time.perf_counter() - t0
    studio._set_control_lora(file, scale)
    out["studio_apply_s"] = time.perf_counter() - t0
    log(f"studio: read in {out['studio_read_s']:.2f} s, applied in {out['studio_apply_s']:.2f} s")
    for key in ("studio_first_cpu_s", "studio_cpu_s"):
        c0 = time.process_time()
        ours = studio.compose(PROMPT, [f"{user}:0.8"], "merge", control_lora=control, control_image=control_image,
                              **common).latents[0]
        out[key] = time.process_time() - c0
        log(f"studio: one image {out[key]:.1f} s CPU")
    t0 = time.perf_counter()
    studio.unload()
    out["studio_remove_s"] = time.perf_counter() - t0
    after = transformer.state_dict()
    out["studio_restored_bit_for_bit"] = after.keys() == before.keys() and all(
        torch.equal(after[k], before[k]) for k in before)

    plain = control_pipeline(pipe)
    t0 = time.perf_counter()
    plain.load_lora_weights(str(control), adapter_name="control")
    out["diffusers_apply_s"] = time.perf_counter() - t0
    log(f"diffusers: loaded in {out['diffusers_apply_s']:.2f} s")
    plain.load_lora_weights(str(user), adapter_name="user")
    plain.set_adapters(["control", "user"], [1.0, 0.8])
    for key in ("diffusers_first_cpu_s", "diffusers_cpu_s"):
        c0 = time.process_time()
        with torch.no_grad():
            theirs = plain(PROMPT, control_image=control_image, num_inference_steps=args.steps, guidance_scale=3.5,
                           height=args.size, width=args.size, generator=torch.Generator("cpu").manual_seed(0),
                           output_type="np").images[0]
        out[key] = time.process_time() - c0
        log(f"diffusers: one image {out[key]:.1f} s CPU")
    t0 = time.perf_counter()
    plain.unload_lora_weights(reset_to_overwritten_params=True)
    out["diffusers_remove_s"] = time.perf_counter() - t0
    out["max_abs_diff"] = float(abs(ours - theirs).max())
    out["mean_abs_diff"] = float(abs(ours - theirs).mean())
    out["cpu_ratio_studio_vs_diffusers"] = out["studio_cpu_s"] / out["diffusers_cpu_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", default="2,4", help="double,single transformer blocks (FLUX.1-dev: 19,38)")
    parser.add_argument("--t5-layers", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = bench(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
