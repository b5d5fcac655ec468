"""Batch benchmark: what ``studio batch`` costs on top of rendering, measured in one run.

    python benchmarks/bench_batch.py                       # tiny-sdxl on the CPU, 12 images
    python benchmarks/bench_batch.py --model stabilityai/stable-diffusion-xl-base-1.0 --device cuda --steps 30

Compares, with the same items and the same already-built pipeline cost included on both sides:

1. a plain loop (``Studio`` once, then ``compose`` + ``Result.save`` per image) against ``run_batch`` without
   scoring or report: the cost of planning, atomic PNG writes, fsync'ed manifest lines (ratio batch / plain);
2. CLIPScore per image with the ViT-B-32 architecture (the default scorer's size; random weights, since
   nothing is downloaded here) against the render time per image;
3. a resume over a finished folder (reads the manifest, renders nothing) and the report (CSV, HTML, grid PNGs).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from studio import Studio  # noqa: E402
from studio.batch import BatchOptions, run_batch  # noqa: E402
from studio.grid import Axes, PromptSpec, StrategyChoice, build_stack, expand  # noqa: E402
from studio.grid import load_grid  # noqa: E402
from studio.manifest import MANIFEST, append, read_lines  # noqa: E402
from studio.report import write_outputs  # noqa: E402
from studio.scoring import ClipScorer  # noqa: E402

LORAS = ROOT / "assets" / "loras" / "tiny-sdxl"


def vit_b32_random(folder: Path) -> Path:
    """open_clip's ViT-B-32 config with seeded random weights, as a local model folder."""
    import open_clip
    from safetensors.torch import save_file

    config = open_clip.get_model_config("ViT-B-32")
    torch.manual_seed(0)
    model = open_clip.CLIP(**config)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {}}))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-sdxl")
    parser.add_argument("--lora", action="append", default=None, help="LoRA files (default: the tiny-sdxl examples)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3, help="alternating repeats; the fastest of each counts")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()
    loras = args.lora or [f"{LORAS / 'random-subject.safetensors'}:0.9:name=subject",
                          f"{LORAS / 'random-style.safetensors'}:0.7:name=style"]
    prompts = [PromptSpec(text=f"a zorb, scene {i}, inkwash painting") for i in range(args.prompts)]
    stack = build_stack("stack", loras, base_dir=None, lora_dir=None, origin="--lora")
    stack.concepts.update({"subject": "a zorb", "style": "an inkwash painting"})
    axes = Axes(strategies=[StrategyChoice.parse("merge"), StrategyChoice.parse("composite")],
                seeds=list(range(args.seeds)), steps=[args.steps])
    items = expand(args.model, prompts, [stack], axes, origin="bench")
    work = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    try:
        clip_dir = vit_b32_random(work / "vit-b-32-random")
        # warm-up: first forward passes, allocator, file cache
        Studio(args.model, device=args.device).compose(items[0].prompt, items[0].loras, "merge", steps=1)

        def plain_loop(folder: Path) -> float:
            t0 = time.perf_counter()
            studio = Studio(args.model, device=args.device)
            for item in items:
                result = studio.compose(item.prompt, item.loras, item.strategy.name, seed=item.seed,
                                        steps=item.steps, strategy_params=dict(item.strategy.params))
                result.save(folder, stem=item.id)
            return time.perf_counter() - t0

        def batch_run(folder: Path) -> float:
            t0 = time.perf_counter()
            run_batch(items, folder, BatchOptions(score=False, report=False, device=args.device))
            return time.perf_counter() - t0

        plains, batches = [], []
        for k in range(args.repeat):  # alternate, keep the fastest of each (shared machines are noisy)
            plains.append(plain_loop(work / f"plain{k}"))
            batches.append(batch_run(work / f"batch{k}"))
        plain, batch = min(plains), min(batches)
        best = work / f"batch{batches.index(batch)}"
        shutil.copytree(best, work / "batch")
        render_per_image = sum(r["timings"]["render_s"] for r in read_lines(work / "batch" / MANIFEST)) / len(items)
        result_image = Image.open(work / "batch" / items[0].file).convert("RGB")

        scorer = ClipScorer(clip_dir, device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        images = [result_image] * len(items)
        texts = [[item.prompt, *item.concepts.values()] for item in items]
        scorer.score_many(images[:2], texts[:2])
        scorer._text_cache.clear()
        t0 = time.perf_counter()
        for image, text in zip(images, texts):            # as the batch does: one image at a time
            scorer.score_many([image], [text])
        score_one = (time.perf_counter() - t0) / len(items)
        scorer._text_cache.clear()
        t0 = time.perf_counter()
        scorer.score_many(images, texts)                   # as `studio score` does: batched
        score_batched = (time.perf_counter() - t0) / len(items)

        t0 = time.perf_counter()
        run_batch(items, work / "batch", BatchOptions(score=False, report=False, device=args.device))
        resume = time.perf_counter() - t0
        record = read_lines(work / "batch" / MANIFEST)[0]
        lines = []
        for _ in range(200):                               # what the batch adds per image: one fsync'ed line
            t0 = time.perf_counter()
            append(work / "bench-manifest.jsonl", record)
            lines.append(time.perf_counter() - t0)
        manifest_line = statistics.median(lines)
        t0 = time.perf_counter()
        planned = load_grid(ROOT / "assets" / "grids" / "weights-sweep.toml")[0]
        plan = (time.perf_counter() - t0) / len(planned)
        t0 = time.perf_counter()
        write_outputs(work / "batch", read_lines(work / "batch" / MANIFEST))
        report = time.perf_counter() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = [
        ("plain loop: Studio + compose + save", f"{plain:.2f} s", ""),
        ("studio batch (no score, no report)", f"{batch:.2f} s", f"{batch / plain:.3f}x plain"),
        ("render per image", f"{1000 * render_per_image:.0f} ms", ""),
        ("manifest line + fsync per image (median of 200)", f"{1000 * manifest_line:.2f} ms",
         f"{100 * manifest_line / render_per_image:.2f} % of render"),
        ("planning per item (parse grid, resolve LoRAs, ids)", f"{1000 * plan:.2f} ms", ""),
        ("CLIPScore per image, ViT-B-32, one at a time", f"{1000 * score_one:.1f} ms",
         f"{100 * score_one / render_per_image:.1f} % of render"),
        ("CLIPScore per image, ViT-B-32, batched", f"{1000 * score_batched:.1f} ms",
         f"{score_one / score_batched:.1f}x faster than one at a time"),
        (f"resume check, {len(items)} done images", f"{1000 * resume:.0f} ms", "renders nothing"),
        (f"report: CSV + HTML + grid PNGs, {len(items)} images", f"{1000 * report:.0f} ms", ""),
    ]
    print(f"{args.model}, {len(items)} images x {args.steps} steps, {device}, {torch.get_num_threads()} threads")
    width = max(len(r[0]) for r in rows)
    for label, value, ratio in rows:
        print(f"{label:<{width}}  {value:>10}  {ratio}")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "model": args.model, "device": device, "images": len(items), "steps": args.steps,
            "machine": platform.processor() or platform.machine(), "repeats": args.repeat,
            "plain_s_all": plains, "batch_s_all": batches, "plain_s": plain, "batch_s": batch,
            "batch_over_plain": batch / plain, "render_per_image_s": render_per_image,
            "manifest_line_s": manifest_line, "plan_per_item_s": plan,
            "clip_vit_b32_one_s": score_one, "clip_vit_b32_batched_s": score_batched, "resume_s": resume,
            "report_s": report}, indent=2))


if __name__ == "__main__":
    main()
