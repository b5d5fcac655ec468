"""``studio quantize MODEL --out DIR``: an SVDQuant-style 4-bit denoiser whose low-rank branch hosts LoRAs.

    studio quantize black-forest-labs/FLUX.1-dev --out flux-int4/ --rank 32 --format int4
    studio render "a corgi" --model flux-int4/ --lora corgi.safetensors:0.8     # any command, any strategy

``--runtime`` (recorded in the folder; ``studio render --runtime`` overrides it) picks how renders compute the 4-bit
products: ``auto`` (the Triton W4A4 kernel on a CUDA GPU with compute capability 8.0+, else ``dequant``, W4A16),
``dequant``, ``triton`` or ``reference``; see :mod:`pipelines.quant.runtime`.

Calibration renders the prompts of ``--calib-prompts`` (one per line; default: the studio's eight) for
``--calib-steps`` steps and records each target layer's input; then every target layer is quantized
(smoothing with a per-layer α search, rank-r SVD branch, 4-bit residual) and the folder is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipelines.errors import StudioError

console = Console(stderr=True, soft_wrap=True)


def quantize(
    model: str = typer.Argument(..., help="The 16-bit model: tiny-sdxl, tiny-flux, a Hub id, a folder or a .safetensors file."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write (studio_quant.json + denoiser/)."),
    rank: int = typer.Option(32, help="Rank of the 16-bit low-rank branch (at most half a layer's smaller side)."),
    fmt: str = typer.Option("int4", "--format", help="int4 (groups of 64, float16 scales) or nvfp4 (E2M1, FP8 scale per 16)."),
    group_size: Optional[int] = typer.Option(None, help="INT4 group size (default 64; layers whose width does not split stay 16-bit)."),
    method: str = typer.Option("svdquant", help="svdquant, or rtn (plain round-to-nearest, the baseline)."),
    calib_prompts: Optional[Path] = typer.Option(None, help="Calibration prompts, one per line."),
    calib_steps: int = typer.Option(4, help="Denoising steps per calibration prompt."),
    calib_size: Optional[int] = typer.Option(None, help="Calibration image size in pixels (model default if omitted)."),
    alpha: Optional[float] = typer.Option(None, help="Fixed smoothing α in [0, 1] instead of the per-layer grid search."),
    svd_iters: int = typer.Option(0, help="Refinement iterations: re-do the SVD on (λW − Q(R))."),
    seed: int = typer.Option(0, help="Seed of the calibration renders and token sampling."),
    device: Optional[str] = typer.Option(None, help="cuda, cpu, ... (default: cuda if available)."),
    dtype: Optional[str] = typer.Option(None, help="Precision of the calibration runs (default bf16 on CUDA, fp32 on CPU)."),
    config: Optional[str] = typer.Option(None, help="Hub id or folder with the components a single-file checkpoint lacks."),
    runtime: str = typer.Option("auto", help="Runtime renders use by default: auto (triton on a CUDA GPU with compute "
                                "capability 8.0+, else dequant), dequant (W4A16, any device), triton (W4A4 kernel) "
                                "or reference (exact, slow); `studio render --runtime` overrides it."),
) -> None:
    """Quantize a model's denoiser to 4 bits (SVDQuant) into a folder that --model loads anywhere."""
    from pipelines.quant.calibrate import read_prompts
    from pipelines.quant.convert import Calibration, convert
    from pipelines.quant.quantizer import DEFAULT_ALPHAS, QuantConfig

    try:
        if alpha is not None and not 0.0 <= alpha <= 1.0:
            raise StudioError(f"--alpha must be in [0, 1], got {alpha}")
        if calib_steps < 1:
            raise StudioError("--calib-steps must be at least 1")
        try:
            qconfig = QuantConfig(fmt=fmt, rank=rank, group_size=group_size, method=method, svd_iters=svd_iters,
                                  alphas=None if alpha is not None else DEFAULT_ALPHAS,
                                  alpha=0.5 if alpha is None else alpha)
        except ValueError as e:
            raise StudioError(str(e)) from None
        calibration = Calibration(read_prompts(calib_prompts), steps=calib_steps, size=calib_size, seed=seed)
        progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=console)
        calib_task = progress.add_task("calibrating", total=len(calibration.prompts) * calib_steps)
        layer_task = progress.add_task("quantizing", total=None)

        def on_layer(i: int, n: int, path: str) -> None:
            progress.update(layer_task, total=n, completed=i)

        with progress:
            result, folder = convert(model, out, qconfig, calibration, device=device, dtype=dtype,
                                     model_config=config, runtime=runtime,
                                     on_step=lambda *a: progress.advance(calib_task),
                                     on_layer=on_layer)
    except StudioError as e:
        from rich.markup import escape

        console.print(f"[bold red]error:[/] {escape(str(e))}")
        raise typer.Exit(code=2)
    _print_summary(result, folder)


def _print_summary(result, folder: Path) -> None:
    from pipelines.quant.storage import WEIGHTS_FILE

    errors = [r for r in result.layers.values() if r.error is not None]
    table = Table(title=f"{len(result.layers)} layers quantized ({result.config.fmt}, rank {result.config.rank})")
    for column in ("", "layers", "mean rel. error", "RTN mean rel. error"):
        table.add_column(column)
    for mode in ("w4a4", "w4a16"):
        rows = [r for r in errors if r.mode == mode]
        if rows:
            table.add_row(mode, str(len(rows)), f"{sum(r.error for r in rows) / len(rows):.4f}",
                          f"{sum(r.rtn_error for r in rows) / len(rows):.4f}")
    Console(stderr=True).print(table)
    for path, why in list(result.skipped.items())[:10]:
        console.print(f"[yellow]kept 16-bit:[/] {path}: {why}")
    if len(result.skipped) > 10:
        console.print(f"[yellow]kept 16-bit:[/] and {len(result.skipped) - 10} more (see studio_quant.json)")
    size = (folder / WEIGHTS_FILE).stat().st_size
    console.print(f"wrote {folder} (denoiser {size / 2 ** 20:.1f} MiB)")
    console.print(result.runtime)
    typer.echo(str(folder))
