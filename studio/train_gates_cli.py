"""The ``studio train-gates`` command line (options and output); the training is :mod:`studio.train_gates`.

Kept apart so that ``studio``'s command table loads without torch: the training module is imported when the
command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipelines.errors import StudioError


def _pairs(items: list[str], option: str) -> dict[int, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isdigit():
            raise StudioError(f"{option} '{item}' must look like INDEX=VALUE (INDEX: the LoRA's position, from 0)")
        out[int(key)] = value
    return out


def train_gates_command(
    lora: list[str] = typer.Option(..., "--lora", "-l", help="PATH[:WEIGHT]; at least two."),
    model: str = typer.Option("tiny-sdxl", "--model", "-m"),
    images: list[str] = typer.Option([], "--images", help="INDEX=FOLDER of images of LoRA INDEX."),
    caption: list[str] = typer.Option([], "--caption", help="INDEX=TEXT, the caption of LoRA INDEX."),
    steps: int = typer.Option(400, help="Optimisation steps."),
    lr: float = typer.Option(1e-4, help="AdamW learning rate (cosine decay)."),
    margin: float = typer.Option(0.5, help="Hinge margin under the other LoRA's prompt."),
    caption_dropout: float = typer.Option(0.3, help="Probability of training on the empty prompt."),
    renders: int = typer.Option(4, help="Images rendered per LoRA when no --images folder is given."),
    render_steps: Optional[int] = typer.Option(None, help="Denoising steps of those renders."),
    size: Optional[int] = typer.Option(None, help="Training image size (model default if omitted)."),
    seed: int = typer.Option(0),
    out: Optional[Path] = typer.Option(None, help="Where to save (default: beside the stack)."),
    device: Optional[str] = typer.Option(None),
    dtype: Optional[str] = typer.Option(None),
    lora_dir: Optional[Path] = typer.Option(None),
) -> None:
    """Train AutoLoRA fusion gates for a stack (model frozen); `--strategy gated` then uses them."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .api import Studio
    from .cli import _fail, console
    from .train_gates import GateTraining, train_gates

    try:
        studio = Studio(model, device=device, dtype=dtype, lora_dir=lora_dir)
        config = GateTraining(steps=steps, lr=lr, margin=margin, caption_dropout=caption_dropout, seed=seed,
                              renders=renders, render_steps=render_steps, size=size)
        bar = Progress(TextColumn("[bold]training gates"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), console=console)
        task = bar.add_task("gates", total=steps, loss=float("nan"))
        with bar:
            trained = train_gates(studio, lora, captions=_pairs(caption, "--caption"),
                                  image_dirs=_pairs(images, "--images"), config=config, out=out,
                                  progress=lambda i, n, loss: bar.update(task, completed=i, loss=loss))
    except StudioError as e:
        _fail(e)
    for k, line in enumerate(trained.data):
        console.print(f"LoRA {k}: {line}")
    console.print(f"loss {trained.losses[0]:.4f} -> {trained.losses[-1]:.4f} over {len(trained.losses)} steps")
    typer.echo(str(trained.path))
