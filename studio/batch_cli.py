"""``studio batch`` and ``studio score`` (registered on the main app in :mod:`studio.cli`).

    studio batch assets/grids/strategies-by-seed.toml --out out/grid
    studio batch prompts.txt --lora subject.safetensors:0.9:name=subject --lora style.safetensors:0.7 \\
        --concept subject="a corgi" --strategy merge --strategy composite --seed 0 --seed 1 --out out/list
    accelerate launch --multi_gpu --num_processes 4 -m studio.cli batch grid.toml --out out/grid
    studio score out/grid --clip-model ViT-L-14 --clip-pretrained laion2b_s32b_b82k
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from pipelines.errors import StudioError

from .scoring import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED, default_clip_model

CLIP_MODEL_HELP = (f"open_clip model name, hf-hub:ID, a local model folder or a .json config (default: tiny-clip for "
                   f"the tiny world models, else {DEFAULT_CLIP_MODEL}).")
CLIP_PRETRAINED_HELP = (f"open_clip pretrained tag or weights file (default: {DEFAULT_CLIP_PRETRAINED} for "
                        f"{DEFAULT_CLIP_MODEL}; none for a model folder).")

console = Console(stderr=True, soft_wrap=True)


def _fail(error: Exception) -> None:
    from rich.markup import escape  # messages quote grid text ("[axes]"): never markup

    console.print(f"[bold red]error:[/] {escape(str(error))}")
    raise typer.Exit(code=2)


def _pairs(items: list[str], option: str) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise StudioError(f"{option} '{item}' must look like NAME=TEXT")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip().strip('"')
    return out


class RichReporter:
    """One progress bar (items, fractional by denoising step) with ETA and the current item; main process only."""

    def __init__(self):
        self.progress: Progress | None = None
        self.lines = None  # LineProgress when stderr is not a terminal (rich draws no bar there)
        self.current = ""
        self.task = None
        self.finished = 0
        self.suffix = ""

    def start(self, items) -> None:
        from accelerate import PartialState

        state = PartialState()
        if not state.is_main_process or not items:
            return
        self.suffix = f" (process 0 of {state.num_processes})" if state.num_processes > 1 else ""
        if not console.is_terminal:
            from .log_progress import LineProgress

            self.lines = LineProgress(console.print, f"images{self.suffix}", len(items))
            console.print(f"batch: {len(items)} images to render (loading the model)")
            return
        self.progress = Progress(TextColumn("{task.fields[current]}", style="bold"), BarColumn(),
                                 TextColumn("{task.fields[count]}"), TimeElapsedColumn(), TextColumn("eta"),
                                 TimeRemainingColumn(), console=console)
        self.task = self.progress.add_task("batch", total=len(items), current="loading model",
                                           count=f"0/{len(items)}{self.suffix}")
        self.progress.start()

    def item(self, item) -> None:
        self.current = item.label
        if self.progress:
            self.progress.update(self.task, current=item.label)

    def step(self, step: int, num_steps: int) -> None:
        if self.progress:
            self.progress.advance(self.task, 1 / max(num_steps, 1))

    def done(self, record) -> None:
        if self.lines is not None:
            self.finished += 1
            status = "ok" if record.get("status") == "ok" else f"FAILED: {record.get('error')}"
            self.lines.update(self.finished, f"{self.current}: {status}", force=True)
        if self.progress:
            self.finished += 1
            total = self.progress.tasks[0].total
            self.progress.update(self.task, completed=self.finished,
                                 count=f"{self.finished}/{int(total)}{self.suffix}")
            if record.get("status") != "ok":
                from rich.markup import escape

                self.progress.console.print("[yellow]failed:[/] " + escape(
                    f"{record['item']['group']} | {record['item']['row']} | {record['item']['column']}: "
                    f"{record.get('error')}"))

    def close(self) -> None:
        if self.progress:
            self.progress.stop()


def _load_items(file: Path, *, model, lora, concept, strategy, seed, steps, guidance, negative, width, height,
                scheduler, lora_dir, allow_path=(), limits=None, modes=None):
    from .settings import DEFAULT_LIMITS

    from .grid import GridError, load_grid
    from .prompt_list import load_prompt_list

    if file.suffix.lower() == ".toml":
        given = [name for name, value in (("--model", model), ("--lora", lora), ("--concept", concept),
                                          ("--strategy", strategy), ("--seed", seed), ("--steps", steps),
                                          ("--guidance", guidance), ("--negative", negative), ("--width", width),
                                          ("--height", height), ("--scheduler", scheduler), ("--lora-dir", lora_dir),
                                          *((f"--{k.replace('_', '-')}", v) for k, v in (modes or {}).items()))
                 if value is not None and value != [] and value != ""]
        if given:
            raise GridError(str(file), f"{', '.join(given)} apply to prompt lists; a grid sets them in the file")
        items, _ = load_grid(file, allow=allow_path, limits=limits or DEFAULT_LIMITS)
        return items
    return load_prompt_list(file, model=model or "tiny-sdxl", loras=lora, concepts=_pairs(concept, "--concept"),
                            strategies=strategy or ["merge"], seeds=seed or [0], steps=steps, guidance=guidance,
                            negative=negative or "", width=width, height=height, scheduler=scheduler,
                            lora_dir=lora_dir, limits=limits or DEFAULT_LIMITS, allow_path=allow_path,
                            **{k: (str(v) if isinstance(v, Path) else v) for k, v in (modes or {}).items()})


def batch(
    file: Path = typer.Argument(..., help="A TOML grid, or a prompt list (.txt, .csv, .jsonl)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (images, manifest.jsonl, scores.csv, report.html)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Prompt lists: the model (default tiny-sdxl)."),
    lora: list[str] = typer.Option([], "--lora", "-l", help="Prompt lists: PATH[:W][:name=N]...; repeatable (one stack)."),
    concept: list[str] = typer.Option([], "--concept", help="Prompt lists: LORA_NAME=TEXT, scored on its own; repeatable."),
    strategy: list[str] = typer.Option([], "--strategy", "-s", help="Prompt lists: NAME[:param=v...]; repeatable (an axis)."),
    seed: list[int] = typer.Option([], "--seed", help="Prompt lists: seed; repeatable (an axis). Default 0."),
    steps: list[int] = typer.Option([], "--steps", help="Prompt lists: steps; repeatable (an axis)."),
    guidance: list[float] = typer.Option([], "--guidance", help="Prompt lists: guidance scale; repeatable (an axis)."),
    negative: Optional[str] = typer.Option(None, "--negative", "-n", help="Prompt lists: default negative prompt."),
    width: Optional[int] = typer.Option(None),
    height: Optional[int] = typer.Option(None),
    scheduler: Optional[str] = typer.Option(None, help="Prompt lists: a diffusers scheduler class."),
    lora_dir: Optional[Path] = typer.Option(None, help="Prompt lists: LoRA library for relative names."),
    resume: Optional[bool] = typer.Option(None, "--resume/--no-resume",
                                          help="Render only what is missing (the default when OUT has a manifest)."),
    score: bool = typer.Option(True, "--score/--no-score", help="CLIPScore every image (can run later: studio score)."),
    clip_model: Optional[str] = typer.Option(None, help=CLIP_MODEL_HELP),
    clip_pretrained: Optional[str] = typer.Option(None, help=CLIP_PRETRAINED_HELP),
    report: bool = typer.Option(True, "--report/--no-report", help="Write scores.csv, report.html and grid PNGs at the end."),
    inline_images: bool = typer.Option(False, help="Embed the images in report.html (one file to share)."),
    dry_run: bool = typer.Option(False, help="Check the input and print the plan; render nothing."),
    device: Optional[str] = typer.Option(None, help="cuda, cuda:1, cpu (default: each process's accelerator)."),
    dtype: Optional[str] = typer.Option(None, help="bf16, fp16 or fp32."),
    offload: bool = typer.Option(False, help="Model CPU offload (accelerator only)."),
    config: Optional[str] = typer.Option(None, help="Hub id or folder with the components a single-file checkpoint lacks."),
    allow_path: list[Path] = typer.Option([], "--allow-path", help="A folder the grid's LoRA, input image and "
                                          "ControlNet paths (a prompt list's input images) may also point into "
                                          "(besides the file's folder and the shipped LoRAs); repeatable."),
    image: Optional[Path] = typer.Option(None, "--image", help="Prompt lists: input image of every row (img2img; "
                                         "a row's own 'image' column/key replaces it)."),
    mask: Optional[Path] = typer.Option(None, "--mask", help="Prompt lists: inpainting mask of every row."),
    control_image: Optional[Path] = typer.Option(None, "--control-image", help="Prompt lists: ControlNet control "
                                                 "image of every row."),
    controlnet: Optional[str] = typer.Option(None, "--controlnet", help="Prompt lists: ControlNet folder or Hub id."),
    strength: Optional[float] = typer.Option(None, "--strength", help="Prompt lists: img2img/inpainting strength."),
    controlnet_scale: Optional[float] = typer.Option(None, "--controlnet-scale", help="Prompt lists: ControlNet "
                                                     "conditioning scale."),
    control_lora: Optional[str] = typer.Option(None, "--control-lora", help="Prompt lists: a FLUX control LoRA "
                                               "PATH[:WEIGHT] with --control-image (a grid: control_lora = ...)."),
    max_steps: Optional[int] = typer.Option(None, help="Refuse more denoising steps than this (default 1000)."),
    max_size: Optional[int] = typer.Option(None, help="Refuse a width or height above this, or more pixels than its "
                                           "square (default 4096 and 2048x2048)."),
) -> None:
    """Render a grid or a prompt list: resumable, CLIPScored, with an HTML report; runs under accelerate launch."""
    from .batch import BatchOptions, run_batch
    from .manifest import done_ids

    from .settings import Limits

    try:
        limits = Limits.from_options(max_steps, max_size)
        items = _load_items(file, model=model, lora=lora, concept=concept, strategy=strategy, seed=seed, steps=steps,
                            guidance=guidance, negative=negative, width=width, height=height, scheduler=scheduler,
                            lora_dir=lora_dir, allow_path=allow_path, limits=limits,
                            modes={"image": image, "mask": mask, "control_image": control_image,
                                   "controlnet": controlnet, "strength": strength,
                                   "controlnet_scale": controlnet_scale, "control_lora": control_lora})
        pretrained = clip_pretrained or None
        if dry_run:
            done = done_ids(out) if out.exists() else set()
            for item in items:
                mark = "done" if item.id in done else "todo"
                typer.echo(f"{mark}  {item.id}  {item.file}")
            console.print(f"{len(items)} image(s), {sum(i.id in done for i in items)} already in {out}")
            return
        options = BatchOptions(score=score, clip_model=clip_model, clip_pretrained=pretrained, device=device,
                               dtype=dtype, offload=offload, config=config, resume=resume, report=report,
                               inline_images=inline_images, limits=limits)
        summary = run_batch(items, out, options, RichReporter())
    except StudioError as e:
        _fail(e)
    if summary.process_index != 0:
        return
    if summary.means:
        table = Table(title="CLIPScore per strategy")
        for column in ("strategy", "images", "mean ± std"):
            table.add_column(column)
        for name, (mean, std, n) in summary.means.items():
            table.add_row(name, str(n), f"{mean:.2f} ± {std:.2f}" if n else "—")
        console.print(table)
    console.print(f"{summary.rendered} rendered, {summary.done_before} already done, {summary.failed} failed, "
                  f"{summary.missing} missing of {summary.planned} in {summary.seconds:.1f} s"
                  f" ({summary.num_processes} process{'es' if summary.num_processes > 1 else ''})")
    if summary.report:
        console.print(f"report: {summary.report}")
    if summary.failed:
        raise typer.Exit(code=1)


def score(
    folder: Path = typer.Argument(..., help="A studio batch folder (manifest.jsonl) or any folder of studio PNGs."),
    clip_model: Optional[str] = typer.Option(None, help=CLIP_MODEL_HELP),
    clip_pretrained: Optional[str] = typer.Option(None, help=CLIP_PRETRAINED_HELP),
    concept: list[str] = typer.Option([], "--concept", help="LORA_NAME=TEXT to score as a concept; repeatable."),
    batch_size: int = typer.Option(32, help="Images per CLIP forward pass."),
    device: Optional[str] = typer.Option(None, help="cuda, cpu (default: cuda if available)."),
    inline_images: bool = typer.Option(False, help="Embed the images in report.html."),
) -> None:
    """(Re)score a folder with CLIPScore and rebuild scores.csv, the grid PNGs and report.html."""
    import torch

    from .report import strategy_means, write_outputs
    from .rescore import score_folder
    from .scoring import ClipScorer

    try:
        pretrained = clip_pretrained or None
        if clip_model is None:
            from .manifest import load_records

            models = [r.get("recipe", {}).get("model") for r in load_records(folder).values()]
            clip_model = default_clip_model(m for m in models if m)
        scorer = ClipScorer(clip_model, pretrained, batch_size=batch_size,
                            device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
        records, warnings = score_folder(folder, scorer, concepts=_pairs(concept, "--concept"), batch_size=batch_size)
        report = write_outputs(folder, records, inline_images=inline_images)
    except StudioError as e:
        _fail(e)
    from rich.markup import escape

    for warning in warnings:
        console.print(f"[yellow]warning:[/] {escape(str(warning))}")
    for name, (mean, std, n) in strategy_means(records).items():
        console.print(f"{name}: {mean:.2f} ± {std:.2f} (n={n})")
    console.print(f"{sum(1 for r in records if r.get('scores'))} image(s) scored with {scorer.name}; report: {report}")


def register(app: typer.Typer) -> None:
    app.command("batch")(batch)
    app.command("score")(score)
