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
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from pipelines.errors import StudioError
from studio.merging import format_strategy_info, merge_command
from studio.squeeze import squeeze_command

app = typer.Typer(add_completion=False, no_args_is_help=True, help="LoRA Composition Studio: stack LoRAs on SDXL and FLUX.1.")
console = Console(stderr=True, soft_wrap=True)


def _fail(error: Exception) -> None:
    console.print(f"[bold red]error:[/] {escape(str(error))}")  # outside text ("[axes]", file names): never markup
    raise typer.Exit(code=2)


def _show_defaults(studio, **given) -> None:
    """Say which of the model's defaults (studio.settings.render_defaults) fill the settings left out."""
    defaults = studio.render_defaults()
    used = [f"{name} {getattr(defaults, name):g}" for name in ("steps", "guidance", "width", "height")
            if given.get(name) is None]
    if used:
        console.print(escape(f"defaults: {', '.join(used)} ({defaults.source})"))


def _parse_params(items: list[str]) -> dict[str, str]:
    params = {}
    for item in items:
        if "=" not in item:
            raise StudioError(f"--param '{item}' must look like name=value")
        key, value = item.split("=", 1)
        params[key.strip()] = value.strip()
    return params


def step_progress(total_images: int, steps: int) -> tuple[Progress, callable]:
    """A rich progress bar over all denoising steps of all images, and the step callback that drives it; when
    stderr is not a terminal (a log), plain lines instead (:class:`studio.log_progress.LineProgress`)."""
    if not console.is_terminal:
        import contextlib

        from studio.log_progress import LineProgress

        lines = LineProgress(console.print, "denoising steps", total_images * steps, every_s=5.0)

        def log_callback(step: int, num_steps: int, _kwargs: dict) -> None:
            lines.update(lines.done + 1)

        return contextlib.nullcontext(), log_callback
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
    lora: list[str] = typer.Option([], "--lora", "-l", help=(
        "PATH[:WEIGHT][:start=F][:end=F][:blocks=SPEC][:region=R][:prompt=TEXT]; repeatable. region/prompt: for "
        "--strategy regional (R: a preset such as left or middle-third, fractions x0,y0,x1,y1 or a mask image).")),
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
    max_lanes: str = typer.Option("auto", "--max-lanes", help="Lanes per denoiser call for lane strategies "
                                  "(composite, cmlora): a number, auto (from free GPU memory; CPU: all) or all. "
                                  "Lower it when a render runs out of memory; the image stays the same."),
    compile_denoiser: bool = typer.Option(False, "--compile", help="torch.compile the denoiser with its LoRA "
                                          "layers (inductor); weight, LoRA and strategy changes do not recompile."),
    runtime: Optional[str] = typer.Option(None, help="4-bit models: auto (triton on a CUDA GPU with compute capability "
                                          "8.0+, else dequant), dequant (W4A16), triton (W4A4 kernel), reference "
                                          "(exact, slow). Default: the quantized folder's, else auto."),
    allow_path: list[Path] = typer.Option([], "--allow-path", help="With --recipe: a folder the recipe's LoRA paths "
                                          "may also point into (besides the recipe's folder and --lora-dir); "
                                          "repeatable."),
    max_steps: Optional[int] = typer.Option(None, help="Refuse more denoising steps than this (default 1000)."),
    max_size: Optional[int] = typer.Option(None, help="Refuse a width or height above this, or more pixels than its "
                                           "square (default 4096 and 2048x2048)."),
    image: Optional[Path] = typer.Option(None, "--image", help="Input image: img2img (with --mask: inpainting). "
                                         "Without --width/--height the size is the image's. With --recipe: the "
                                         "recipe's input image, if it moved (same content required)."),
    mask: Optional[Path] = typer.Option(None, "--mask", help="Inpainting mask: single-channel (grayscale) image, "
                                        "white = repaint, black = keep."),
    strength: Optional[float] = typer.Option(None, "--strength", help="img2img / inpainting: the part of the "
                                             "--steps schedule to run, in (0, 1] (default: the diffusers "
                                             "pipeline's: SDXL img2img 0.3, inpainting 0.9999; FLUX 0.6)."),
    control_images: list[Path] = typer.Option([], "--control-image", help="ControlNet conditioning image "
                                              "(edges, depth, pose, ... as the ControlNet expects). Repeat it with "
                                              "--controlnet for multi-ControlNet (the n-th image for the n-th)."),
    controlnets: list[str] = typer.Option([], "--controlnet", help="ControlNet for --control-image: a local "
                                          "diffusers folder or Hub id made for this base model; repeatable."),
    controlnet_scales: list[float] = typer.Option([], "--controlnet-scale", help="ControlNet conditioning scale, 0 "
                                                  "to 10 (default 1); once for all, or once per ControlNet."),
    control_lora: Optional[str] = typer.Option(None, "--control-lora", help="FLUX control LoRA PATH[:WEIGHT] (BFL "
                                               "Canny/Depth, BFL or diffusers layout) with --control-image: runs "
                                               "FluxControlPipeline; the --lora stack composes on top. With "
                                               "--recipe: the recipe's control LoRA, if it moved (same file)."),
) -> None:
    """Render images with a stack of LoRAs (img2img with --image, inpainting with --image and --mask)."""
    # one value each: the single-ControlNet mode; several: multi-ControlNet (lists, one per control image)
    control_image, controlnet, controlnet_scale = (
        None if not values else values[0] if len(values) == 1 else list(values)
        for values in (control_images, controlnets, controlnet_scales))
    from pipelines.quant.runtime import describe, recipe_runtime
    from studio import Recipe, Studio

    from studio.path_policy import PathPolicy
    from studio.settings import Limits, check_settings, check_strategy

    try:
        limits = Limits.from_options(max_steps, max_size)
        if recipe is not None:
            rec = Recipe.load(recipe)
            # every setting checked, and every LoRA path allowed, before the model loads
            rec.check(limits)
            check_strategy(rec.strategy, rec.strategy_params)
            policy = PathPolicy(folder=recipe.resolve().parent, libraries=[lora_dir] if lora_dir else [],
                                allowed=list(allow_path))
            rec = rec.with_sources(policy, f"the recipe {recipe.name}")
            lora_dir = None  # the sources are resolved files now
            if runtime is None:
                runtime, note = recipe_runtime(rec.runtime, device)
                if note:
                    console.print(f"[yellow]note:[/] {escape(note)}")
            studio = Studio(rec.model, device=device, dtype=dtype, offload=offload, config=config, lora_dir=lora_dir,
                            runtime=runtime, max_lanes=max_lanes, compile=compile_denoiser, limits=limits)
            if studio.runtime_counts:
                console.print(describe(studio.runtime_counts, studio.runtime))
            if strength is not None or controlnet_scale is not None:
                raise StudioError("--strength / --controlnet-scale: the recipe records its own; reproduce it as it is")
            _show_defaults(studio, steps=rec.steps, guidance=rec.guidance, width=rec.width, height=rec.height)
            from pipelines.modes import steps_run

            progress, callback = step_progress(1, steps_run(studio.family, rec.steps or studio.render_defaults().steps,
                                                            rec.strength))
            with progress:
                result = studio.reproduce(rec, callback=callback, image=image, mask_image=mask,
                                          control_image=control_image, controlnet=controlnet, input_policy=policy,
                                          control_lora=control_lora)
        else:
            if not prompt:
                raise StudioError("give a PROMPT or --recipe")
            params = _parse_params(param)
            check_settings(prompt=prompt, negative_prompt=negative, steps=steps, guidance=guidance, width=width,
                           height=height, seed=seed, count=count, scheduler=scheduler, strategy=strategy,
                           strategy_params=params, limits=limits)
            check_settings(strength=strength, limits=limits)
            for flag, path in (("--image", image), ("--mask", mask), *(("--control-image", p) for p in control_images)):
                if path is not None and not path.is_file():
                    raise StudioError(f"{flag} {path}: file not found")
            studio = Studio(model, device=device, dtype=dtype, offload=offload, config=config, lora_dir=lora_dir,
                            runtime=runtime, max_lanes=max_lanes, compile=compile_denoiser, limits=limits)
            if studio.runtime_counts:
                console.print(describe(studio.runtime_counts, studio.runtime))
            _show_defaults(studio, steps=steps, guidance=guidance, width=width, height=height)
            n_steps = steps or studio.render_defaults().steps  # the total equals the steps compose runs
            if image is not None:  # img2img / inpainting run the last `strength` part of the schedule
                from pipelines.mode_inputs import requested_mode
                from pipelines.modes import default_strength, steps_run

                mode = requested_mode(image, mask, None if control_lora else control_image)
                mode = f"control-lora-{mode}" if control_lora else mode
                n_steps = steps_run(studio.family, n_steps, strength if strength is not None
                                    else default_strength(studio.family, mode, studio.pipe))
            progress, callback = step_progress(count, n_steps)
            with progress:
                result = studio.compose(
                    prompt, lora, strategy, strategy_params=params, negative_prompt=negative,
                    seed=seed, steps=steps, guidance=guidance, width=width, height=height, count=count,
                    scheduler=scheduler, callback=callback, image=image, mask_image=mask, strength=strength,
                    control_image=control_image, controlnet=controlnet, controlnet_conditioning_scale=controlnet_scale,
                    control_lora=control_lora,
                )
        paths = result.save(out)
    except StudioError as e:
        _fail(e)
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
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
        from rich.markup import escape  # file names and metadata are text from outside, never markup

        table = Table(title=escape(f"LoRAs in {folder}"))
        for column in ("file", "name", "base", "format", "rank", "trigger words", "MB"):
            table.add_column(column)
        for info in infos:
            rel = str(Path(info.path).resolve().relative_to(folder.resolve()))
            table.add_row(*(escape(cell) for cell in (rel, info.name, info.base_name, info.format)),
                          str(info.rank or "?"), escape(", ".join(info.triggers[:4])), f"{info.size_bytes / 1e6:.1f}")
        Console().print(table)
    from rich.markup import escape

    for error in errors:  # one line per bad file; the good ones are listed above
        console.print(f"[yellow]skipped:[/] {escape(str(error))}")


@app.command()
def strategies(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List the registered fusion strategies, their parameters and defaults."""
    from studio.strategy_listing import strategy_rows  # from the registry, cached: no torch for a listing

    rows = strategy_rows()
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
    controlnet: list[Path] = typer.Option([], "--controlnet", help="A diffusers ControlNet folder for this model, "
                                          "offered in the input panel with a control image; repeatable."),
    control_lora: list[Path] = typer.Option([], "--control-lora", help="A FLUX control LoRA file (BFL Canny/Depth), "
                                            "offered next to the ControlNets; repeatable."),
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
                                   preview_every=preview_every, controlnets=list(controlnet),
                                   control_loras=list(control_lora))
    except StudioError as e:
        _fail(e)
    launch(demo, callbacks, host=host, port=port)


from studio.batch_cli import register as _register_batch  # noqa: E402

_register_batch(app)

from studio.quantize import quantize as _quantize  # noqa: E402  (its own module; heavy imports are lazy)

app.command(name="quantize")(_quantize)

app.command(name="merge")(merge_command)
app.command(name="squeeze")(squeeze_command)

from studio.train_gates_cli import train_gates_command  # noqa: E402  (training imports are lazy)

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
