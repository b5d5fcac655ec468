"""``studio world ...``: build and measure the tiny offline world."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .concepts import HELD_OUT
from .layout import BUILD_ASSETS, DEFAULT_STAGES, STAGES, WORKDIR

world_app = typer.Typer(no_args_is_help=True, help="Build and measure the tiny offline world (models, LoRAs, judges).")


@world_app.command("build")
def build(
    stage: list[str] = typer.Option([], "--stage",
                                    help=f"Stages to run (default: all but pairs-flux): {', '.join(STAGES)}."),
    workdir: Path = typer.Option(WORKDIR, help="Checkpoints and rendered data (resumable)."),
    assets: Path = typer.Option(BUILD_ASSETS, help="Where trained weights are written."),
    scale: float = typer.Option(1.0, help="Multiply every step count (e.g. 0.02 for a smoke run)."),
    device: str = typer.Option("cpu", help="Where to train: cpu, cuda, cuda:1 ..."),
    concept: list[str] = typer.Option([], "--concept", help="Only these held-out concepts in the LoRA, "
                                      "QR-LoRA and SHiRA stages (e.g. style-dotted); default all."),
) -> None:
    """Train everything from nothing (seeded; a stopped build resumes where it stopped)."""
    unknown = [s for s in stage if s not in STAGES]
    if unknown:
        raise typer.BadParameter(f"unknown stage(s) {unknown}; stages: {', '.join(STAGES)}")
    known = [c.name for c in HELD_OUT]
    if set(concept) - set(known):
        raise typer.BadParameter(f"unknown concept(s) {sorted(set(concept) - set(known))}; concepts: {', '.join(known)}")
    from .build import BuildConfig, run
    from .trainer import set_device

    set_device(device)
    run(stage or DEFAULT_STAGES, BuildConfig(workdir=workdir, assets=assets, scale=scale), tuple(concept))


@world_app.command("evaluate")
def evaluate(
    assets: Path = typer.Option(BUILD_ASSETS),
    out: Optional[Path] = typer.Option(None, help="Write the JSON report here (default assets/world/metrics.json)."),
    n_base: int = typer.Option(48, help="Prompts per family for the base-model check."),
    n_lora: int = typer.Option(20, help="Seeds per LoRA for the LoRA-alone check."),
    n_judge: int = typer.Option(1000, help="Fresh renderer images for the judge and tiny-CLIP accuracy."),
    family: list[str] = typer.Option([], "--family", help="sdxl and/or flux (default: those whose model is built)."),
    adapters: list[str] = typer.Option([], "--adapters", help="Only these adapter sets alone (loras, qr_loras, "
                                       "shira_loras), written into the existing report; no base or judge check."),
) -> None:
    """Judge accuracy of the base models and of each LoRA, QR-LoRA and SHiRA alone (renders through the studio), and
    of the judge and the tiny CLIP on fresh renderer images."""
    from .evaluate import ADAPTER_SETS, evaluate_judges, evaluate_world, update_report, write_report

    families = family or [f for f in ("sdxl", "flux") if (assets / "models" / f"tiny-{f}" / "model_index.json").exists()]
    if adapters:
        unknown = sorted(set(adapters) - set(ADAPTER_SETS))
        if unknown:
            raise typer.BadParameter(f"unknown adapter set(s) {unknown}; sets: {', '.join(ADAPTER_SETS)}")
        partial = evaluate_world(assets, families=tuple(families), n_lora=n_lora, adapter_sets=tuple(adapters))
        update_report(out or assets / "world" / "metrics.json", partial)
        typer.echo(json.dumps(partial, indent=2))
        return
    report = evaluate_world(assets, families=tuple(families), n_base=n_base, n_lora=n_lora)
    report["judges"] = evaluate_judges(assets, n=n_judge)
    report["settings"] = {"base_prompts": n_base, "lora_prompts_per_concept": n_lora, "judge_renders": n_judge,
                          "judge_seed": 99, "steps": "each model's default (25)", "families": families}
    write_report(report, out or assets / "world" / "metrics.json")
    typer.echo(json.dumps(report, indent=2))


def demo(
    out: Path = typer.Option(Path("outputs/demo"), "--out", "-o", help="Folder for images, manifest and report.html."),
    family: str = typer.Option("sdxl", help="sdxl or flux (tiny world models)."),
    strategy: list[str] = typer.Option([], "--strategy", "-s", help="Strategies (default: every registered one)."),
    seed: list[int] = typer.Option([], "--seed", help="Seeds (default: 0 and 1)."),
    no_score: bool = typer.Option(False, "--no-score", help="Skip CLIPScore."),
) -> None:
    """Compose the tiny world's LoRAs under every strategy, offline, and write the HTML report."""
    from rich.console import Console
    from rich.table import Table

    from pipelines.errors import StudioError
    from studio.batch_cli import RichReporter

    from .demo import run_demo

    if family not in ("sdxl", "flux"):
        raise typer.BadParameter("family must be sdxl or flux")
    try:
        summary = run_demo(out, family=family, seeds=tuple(seed) or (0, 1), strategies=strategy or None,
                           score=not no_score, reporter=RichReporter())
    except StudioError as e:
        from rich.markup import escape

        Console(stderr=True).print(f"[bold red]error:[/] {escape(str(e))}")
        raise typer.Exit(code=2) from None
    table = Table(title=f"tiny-{family}: every LoRA concept shown (concept judge), CLIPScore (tiny CLIP)")
    for column in ("strategy", "all concepts shown", "CLIPScore mean", "std", "images"):
        table.add_column(column)
    judged = getattr(summary, "judged", {}) or {}
    for name in sorted(summary.means, key=lambda k: (-(judged.get(k, (0, 1))[0] / max(judged.get(k, (0, 1))[1], 1)),
                                                     -summary.means[k][0])):
        mean, std, n = summary.means[name]
        hits, total = judged.get(name, (0, 0))
        table.add_row(name, f"{hits}/{total}" if total else "-", f"{mean:.2f}", f"{std:.2f}", str(n))
    Console().print(table)
    typer.echo(f"report: {summary.report}")
