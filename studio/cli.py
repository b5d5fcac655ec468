"""The ``studio`` command line.

    studio render "a corgi, watercolor" --lora corgi.safetensors:0.9 --lora watercolor.safetensors:0.7 \\
        --strategy composite --model tiny-sdxl --seed 7 --out out/
    studio render --recipe out/composite-seed7.png          # reproduce an image (or a .toml recipe)
    studio library ~/loras                                   # what is in a LoRA folder
    studio strategies                                        # registered strategies and their parameters
    studio train-gates --lora a.safetensors --lora b.safetensors   # learned gates for `--strategy gated`
    studio batch grid.toml --out out/grid                    # grids / prompt lists, CLIPScore, HTML report
    studio score out/grid                                    # (re)score a folder
    studio quantize tiny-flux --out flux-int4/ --format int4  # 4-bit SVDQuant denoiser; then --model flux-int4/
    studio merge --lora a.safetensors:0.8 --lora b.safetensors --strategy ties --out merged.safetensors
    studio squeeze a.safetensors --rank 4 --out a-r4.safetensors  # LoRA-Squeeze: lower rank by SVD, per layer
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from pipelines.errors import StudioError
from studio.merging import format_strategy_info, merge_command
from studio.squeeze import squeeze_command

app = typer.Typer(add_completion=False, no_args_is_help=True, help="LoRA Composition Studio: stack LoRAs on SDXL and FLUX.1.")
console = Console(stderr=True, soft_wrap=True)


def _fail(error: Exception) -> None:
    console.print(f"[bold red]error:[/] {error}")
    raise typer.Exit(code=2)


def _parse_params(items: list[str]) -> dict[str, str]:
    params = {}
    for item in items:
        if "=" not in item:
            raise StudioError(f"--param '{item}' must look like name=value")
        key, value = item.split("=", 1)
        params[key.strip()] = value.strip()
    return params


def step_progress(total_images: int, steps: int) -> tuple[Progress, callable]:
    """A rich progress bar over all denoising steps of all images, and the step callback that drives it."""
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), console=console, transient=False,
    )
    task = progress.add_task("denoising", total=total_images * steps)

    def callback(step: int, num_steps: int, _kwargs: dict) -> None:
        progress.advance(task)

    return progress, callback


@app.command()
def render(
    prompt: Optional[str] = typer.Argument(None, help="What to draw (omit with --recipe)."),
    lora: list[str] = typer.Option([], "--lora", "-l", help="PATH[:WEIGHT][:start=F][:end=F][:blocks=SPEC]; repeatable."),
    strategy: str = typer.Option("merge", "--strategy", "-s", help="Fusion strategy (see `studio strategies`)."),
    param: list[str] = typer.Option([], "--param", "-p", help="Strategy parameter name=value; repeatable."),
    model: str = typer.Option("tiny-sdxl", "--model", "-m", help="tiny-sdxl, tiny-flux, a Hub id, a folder or a .safetensors file."),
    config: Optional[str] = typer.Option(None, help="Hub id or folder with the components a single-file checkpoint lacks."),
    negative: str = typer.Option("", "--negative", "-n", help="Negative prompt."),
    steps: Optional[int] = typer.Option(None, help="Denoising steps (model default if omitted)."),
    guidance: Optional[float] = typer.Option(None, help="Guidance scale (model default if omitted)."),
    seed: int = typer.Option(0, help="Seed of torch.Generator(device); image k of --count uses seed+k."),
    width: Optional[int] = typer.Option(None),
    height: Optional[int] = typer.Option(None),
    count: int = typer.Option(1, help="How many images (seeds seed, seed+1, ...)."),
    scheduler: Optional[str] = typer.Option(None, help="A diffusers scheduler class compatible with the model."),
    out: Path = typer.Option(Path("outputs"), "--out", "-o", help="Folder for the PNGs (recipes embedded)."),
    recipe: Optional[Path] = typer.Option(None, help="Reproduce a PNG made by the studio (or a .toml recipe)."),
    lora_dir: Optional[Path] = typer.Option(None, help="LoRA library; relative LoRA names resolve inside it."),
    device: Optional[str] = typer.Option(None, help="cuda, cuda:1, cpu (default: cuda if available)."),
    dtype: Optional[str] = typer.Option(None, help="bf16, fp16 or fp32 (default: bf16/fp16 on CUDA, fp32 on CPU)."),
    offload: bool = typer.Option(False, help="Model CPU offload (accelerator only)."),
) -> None:
    """Render images with a stack of LoRAs."""
    from studio import Recipe, Studio

    try:
        if recipe is not None:
            rec = Recipe.load(recipe)
            studio = Studio(rec.model, device=device, dtype=dtype, offload=offload, config=config, lora_dir=lora_dir)
            progress, callback = step_progress(1, rec.steps)
            with progress:
                result = studio.reproduce(rec, callback=callback)
        else:
            if not prompt:
                raise StudioError("give a PROMPT or --recipe")
            studio = Studio(model, device=device, dtype=dtype, offload=offload, config=config, lora_dir=lora_dir)
            n_steps = steps or studio.family.default_steps
            progress, callback = step_progress(count, n_steps)
            with progress:
                result = studio.compose(
                    prompt, lora, strategy, strategy_params=_parse_params(param), negative_prompt=negative,
                    seed=seed, steps=steps, guidance=guidance, width=width, height=height, count=count,
                    scheduler=scheduler, callback=callback,
                )
        paths = result.save(out)
    except StudioError as e:
        _fail(e)
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
    for line in format_strategy_info(result.strategy_info):
        console.print(line)
    for path in paths:
        typer.echo(str(path))
    console.print(f"{len(paths)} image(s) in {result.timings['total_s']:.1f} s "
                  f"({result.timings['per_image_s']:.2f} s per image)")


@app.command()
def library(
    folder: Path = typer.Argument(..., help="A folder of .safetensors LoRAs (searched recursively)."),
    base: Optional[str] = typer.Option(None, help="Only LoRAs for this base (sdxl, flux, sd1, ...)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List the LoRAs of a folder with their metadata."""
    from studio.library import info_dict, scan

    try:
        infos, errors = scan(folder)
    except StudioError as e:
        _fail(e)
    if base:
        infos = [i for i in infos if i.base == base]
    if as_json:
        typer.echo(json.dumps([info_dict(i, folder) for i in infos], indent=2))
    else:
        table = Table(title=f"LoRAs in {folder}")
        for column in ("file", "name", "base", "format", "rank", "trigger words", "MB"):
            table.add_column(column)
        for info in infos:
            rel = str(Path(info.path).resolve().relative_to(folder.resolve()))
            table.add_row(rel, info.name, info.base_name, info.format, str(info.rank or "?"),
                          ", ".join(info.triggers[:4]), f"{info.size_bytes / 1e6:.1f}")
        Console().print(table)
    for error in errors:
        console.print(f"[yellow]skipped:[/] {error}")


@app.command()
def strategies(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List the registered fusion strategies, their parameters and defaults."""
    from studio.strategies import REGISTRY

    rows = [{"name": cls.name, "summary": cls.summary, "citation": cls.citation,
             "params": [{"name": p.name, "default": p.default, "type": p.type.__name__, "help": p.help,
                         "min": p.min, "max": p.max, "choices": list(p.choices) if p.choices else None}
                        for p in cls.params]}
            for cls in REGISTRY.values()]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="Fusion strategies")
    for column in ("name", "what it does", "parameters (default)", "source"):
        table.add_column(column)
    for row in rows:
        params = "\n".join(f"{p['name']}={p['default']}  {p['help']}" for p in row["params"]) or "-"
        table.add_row(row["name"], row["summary"], params, row["citation"])
    Console().print(table)


@app.command()
def ui(
    lora_dir: list[Path] = typer.Option(..., "--lora-dir", "-d", help="LoRA folder (searched recursively); repeatable."),
    model: str = typer.Option("tiny-sdxl", "--model", "-m", help="tiny-sdxl, tiny-flux, a Hub id, a folder or a .safetensors file."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; the app has no login, so keep it local unless you know why."),
    port: Optional[int] = typer.Option(None, help="Port (default: Gradio's, 7860 or the next free one)."),
    out: Path = typer.Option(Path("outputs/ui"), "--out", "-o", help="Folder for the PNGs and recipe TOMLs."),
    config: Optional[str] = typer.Option(None, help="Hub id or folder with the components a single-file checkpoint lacks."),
    device: Optional[str] = typer.Option(None, help="cuda, cuda:1, cpu (default: cuda if available)."),
    dtype: Optional[str] = typer.Option(None, help="bf16, fp16 or fp32."),
    offload: bool = typer.Option(False, help="Model CPU offload (accelerator only)."),
    max_upload_mb: float = typer.Option(1024, help="Largest LoRA upload accepted, in MB."),
    preview_every: Optional[int] = typer.Option(None, help="Decode a live preview every N steps (0: off; default: ~6 per image)."),
    clip_model: Optional[str] = typer.Option(None, help="CLIPScore model for Compare (open_clip name, folder or file)."),
    clip_pretrained: Optional[str] = typer.Option(None, help="open_clip pretrained tag or weights file."),
    no_score: bool = typer.Option(False, "--no-score", help="Do not compute CLIPScores in Compare."),
) -> None:
    """Open the web app: browse a LoRA folder, stack LoRAs, compare strategies side by side."""
    from studio.scoring import LazyClipScorer, default_clip_model
    from ui.app import launch, make_app

    scorer = None if no_score else LazyClipScorer(clip_model or default_clip_model([model]), clip_pretrained, device=device)

    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]warning:[/] serving on {host}: anyone who can reach it can use the GPU and upload files")
    try:
        demo, callbacks = make_app(model, list(lora_dir), out_dir=out, scorer=scorer, device=device, dtype=dtype,
                                   offload=offload, config=config, max_upload_mb=max_upload_mb,
                                   preview_every=preview_every)
    except StudioError as e:
        _fail(e)
    launch(demo, callbacks, host=host, port=port)


from studio.batch_cli import register as _register_batch  # noqa: E402

_register_batch(app)

from studio.quantize import quantize as _quantize  # noqa: E402  (its own module; heavy imports are lazy)

app.command(name="quantize")(_quantize)

app.command(name="merge")(merge_command)
app.command(name="squeeze")(squeeze_command)

from studio.train_gates import train_gates_command  # noqa: E402

app.command(name="train-gates")(train_gates_command)


def _register_subcommands() -> None:
    from studio.world.cli import demo, world_app

    app.add_typer(world_app, name="world")
    app.command(name="demo")(demo)


_register_subcommands()


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
