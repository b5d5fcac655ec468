"""Saving a weight-space merge of several LoRAs as one LoRA file (``studio merge``).

>>> from studio import Studio
>>> from studio.merging import save_merge
>>> report = save_merge(Studio("stabilityai/stable-diffusion-xl-base-1.0"),
...                     ["corgi.safetensors:0.9", "watercolor.safetensors:0.7"], "ties",
...                     {"density": 0.3, "rank": 32}, "corgi-watercolor.safetensors")

The file is a diffusers/PEFT LoRA (see :mod:`pipelines.adapters.export`): ``pipe.load_lora_weights(file)`` gives
the same model as rendering the stack with that strategy in the studio. Its header records the merge
(``studio.merge``: strategy, parameters, LoRAs with weights and SHA-256).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import typer

from pipelines.errors import StudioError


@dataclass
class MergeReport:
    path: Path
    strategy: str
    params: dict[str, Any]
    layers: int
    ranks: tuple[int, int]  # smallest and largest rank per layer
    size_bytes: int
    strategy_info: dict[str, Any] = field(default_factory=dict)
    dense_layers: list = field(default_factory=list)  # studio.squeeze.LayerSqueeze of each factored dense part
    sparse_entries: int = 0  # a SHiRA-only merge is written as a SHiRA file: its changed weights

    def dense_summary(self) -> str | None:
        """One line on the dense parts factored to fit a LoRA file (``None`` if there were none)."""
        if not self.dense_layers:
            return None
        ranks = [r.rank_out for r in self.dense_layers]
        errors = [r.relative_error for r in self.dense_layers]
        return (f"dense parts (LoHa/LoKr/full/DoRA deltas) of {len(ranks)} layers factored by SVD at rank "
                f"{min(ranks)}-{max(ranks)}: relative error of those parts max {100 * max(errors):.2f}%, "
                f"mean {100 * sum(errors) / len(errors):.2f}% (--dense-rank N to choose the rank)")


def parse_file_stack(loras: Sequence, empty_message: str) -> list:
    """The :class:`~studio.lora.Lora` specs of a stack that is to become one LoRA file (merge, squeeze): at least
    one, and no step windows (a file cannot hold them)."""
    from .lora import Lora

    specs = [Lora.parse(spec) for spec in loras]
    if not specs:
        raise StudioError(empty_message)
    windowed = [str(s.source) for s in specs if s.start != 0.0 or s.end != 1.0]
    if windowed:
        raise StudioError(f"step windows cannot be stored in a LoRA file (given for {', '.join(windowed)}); "
                          "render with them instead")
    return specs


def check_merge_request(loras: Sequence, strategy: str, params: Mapping[str, Any] | None,
                        dense_rank: int | None = None):
    """``(specs, strategy)`` for a merge to a file, or a :class:`StudioError` before any model is loaded."""
    from fusion import WeightMerge, make_strategy
    from fusion.weightspace import weight_merge_names

    if dense_rank is not None and dense_rank < 1:
        raise StudioError(f"--dense-rank must be at least 1 (or left out for an automatic rank), got {dense_rank}")
    specs = parse_file_stack(loras, "give at least one --lora to merge")
    strat = make_strategy(strategy, params)
    if strat.values.get("rank") == -1:
        raise StudioError("--param rank=-1 keeps the merged delta dense, which a LoRA file cannot hold; leave it out "
                          "(rank 0: the largest input rank) or give --param rank=N")
    if not isinstance(strat, WeightMerge):
        raise StudioError(f"strategy '{strat.name}' is not a weight-space merge; it cannot be saved as a LoRA "
                          f"(weight-space merges: {', '.join(weight_merge_names())})")
    return specs, strat


def save_merge(
    studio, loras: Sequence, strategy: str, params: Mapping[str, Any] | None, out: str | Path,
    dense_rank: int | None = None,
) -> MergeReport:
    """Merge ``loras`` with weight-space ``strategy`` on ``studio``'s model and write the result to ``out``.

    Parts of the merge that are not low-rank (LoHa/LoKr/full deltas too large to factor exactly, DoRA's
    rescaling) are factored by truncated SVD (:func:`studio.squeeze.factor_dense_parts`) at ``dense_rank``, or
    at the fewest ranks keeping 99.9% of their σ² when it is ``None``; the report says how much was lost. A merge
    of SHiRA adapters only (a sparse sum) is written as a SHiRA file instead, exactly.
    """
    from fusion import merge_stack
    from pipelines.adapters.export import save_lora
    from pipelines.adapters.kinds import shira

    from .squeeze import AUTO_DENSE_ENERGY, factor_dense_parts

    specs, strat = check_merge_request(loras, strategy, params, dense_rank)
    names = studio.load(specs)
    studio._set_block_weights(names, specs)
    merged = merge_stack(strat, studio.composer, names, [s.weight for s in specs])
    loaded = studio.loaded()
    provenance = {
        "strategy": strat.name, "params": dict(strat.values), "model": studio.model,
        "loras": [{"source": loaded[n].source, "weight": s.weight, "blocks": s.blocks if isinstance(s.blocks, str)
                   else (dict(s.blocks) if s.blocks else None), "sha256": loaded[n].sha256}
                  for n, s in zip(names, specs)],
    }
    metadata = {"studio.merge": json.dumps(provenance), "modelspec.title": Path(out).stem}
    if merged.deltas and all(shira.is_pure_sparse(d) for d in merged.deltas.values()):
        if Path(out).suffix != ".safetensors":
            raise StudioError(f"{out}: a LoRA file must be a .safetensors file")
        path = shira.save_shira(out, merged.deltas, metadata)
        return MergeReport(path=Path(path), strategy=strat.name, params=dict(strat.values),
                           layers=len(merged.deltas), ranks=(0, 0), size_bytes=Path(path).stat().st_size,
                           strategy_info=dict(strat.info),
                           sparse_entries=sum(d.sparse_values.numel() for d in merged.deltas.values()))
    deltas, dense_layers = factor_dense_parts(merged.deltas, rank=dense_rank,
                                              energy=None if dense_rank else AUTO_DENSE_ENERGY)
    if dense_layers:
        provenance["dense_parts"] = {"rank": dense_rank or f"auto ({AUTO_DENSE_ENERGY:g} of energy)",
                                     "relative_error": {r.key: round(r.relative_error, 6) for r in dense_layers}}
        metadata["studio.merge"] = json.dumps(provenance)
    path = save_lora(out, deltas, studio.pipe, studio.family, metadata=metadata)
    ranks = [d.rank for d in deltas.values()]
    return MergeReport(path=Path(path), strategy=strat.name, params=dict(strat.values), layers=len(deltas),
                       ranks=(min(ranks), max(ranks)), size_bytes=Path(path).stat().st_size,
                       strategy_info=dict(strat.info), dense_layers=dense_layers)


def format_strategy_info(info: Mapping[str, Any]) -> list[str]:
    """Human-readable lines for what a strategy measured (interference of the qr merge, K-LoRA's gamma, CMLoRA's
    frequency order, the gates ``gated`` used)."""
    lines = []
    qr = info.get("qr")
    if qr:
        for row in qr["interference"]:
            a, b = row["pair"]
            lines.append(f"interference {a} / {b} over {row['layers']} layers: mean |cos| "
                         f"{row['mean_abs_cos_before']:.4f} -> {row['mean_abs_cos_after']:.4f}, max |cos| "
                         f"{row['max_abs_cos_before']:.4f} -> {row['max_abs_cos_after']:.4f}")
        kept = ", ".join(f"{n} {100 * v:.1f}%" for n, v in qr["retained_energy"].items())
        if kept:
            lines.append(f"share of each LoRA's update kept: {kept}")
    klora = info.get("klora")
    if klora:
        share = klora["subject_share_per_step"]
        lines.append(f"K-LoRA: gamma {klora['gamma']:.4f} over {klora['layers']} layers; subject LoRA applied on "
                     f"{100 * share[0]:.0f}% of them at the first step, {100 * share[-1]:.0f}% at the last")
    cmlora = info.get("cmlora")
    if cmlora:
        scores = cmlora["scores"]
        order = ", ".join(n if scores is None else f"{n} ({scores[n]:.3f})" for n in cmlora["order"])
        lines.append(f"CMLoRA dominant order ({'stack order' if scores is None else 'frequency score'}): {order}")
    for row in info.get("sparse_overlap", []):
        a, b = row["pair"]
        lines.append(f"sparse (SHiRA) supports {a} / {b} over {row['layers']} layers: {row['shared']} shared entries "
                     f"({100 * row['share_of_smaller']:.1f}% of the smaller support)")
    gated = info.get("gated")
    if gated:
        lines.append(f"gated: {gated['used']}")
    return lines


def merge_command(
    lora: list[str] = typer.Option(..., "--lora", "-l", help="PATH[:WEIGHT][:blocks=SPEC]; repeatable."),
    strategy: str = typer.Option("cat", "--strategy", "-s", help="A weight-space merge: cat, svd, ties, dare, qr, lego, mcdropout."),
    param: list[str] = typer.Option([], "--param", "-p", help="Strategy parameter name=value; repeatable."),
    out: Path = typer.Option(..., "--out", "-o", help="The merged LoRA (.safetensors)."),
    model: str = typer.Option("tiny-sdxl", "--model", "-m", help="The base model the LoRAs are for."),
    config: Optional[str] = typer.Option(None, help="Hub id or folder with the components a checkpoint lacks."),
    lora_dir: Optional[Path] = typer.Option(None, help="LoRA library; relative LoRA names resolve inside it."),
    device: Optional[str] = typer.Option(None, help="cuda, cpu, ... (the merge runs where the model is)."),
    dtype: Optional[str] = typer.Option(None, help="bf16, fp16 or fp32."),
    dense_rank: Optional[int] = typer.Option(None, help="Rank for the SVD of dense parts (LoHa/LoKr/full/DoRA) "
                                             "(default: the fewest ranks keeping 99.9% of their energy)."),
) -> None:
    """Merge LoRAs into one LoRA file (weight-space strategies) that diffusers and the studio load."""
    from studio import Studio
    from studio.cli import _fail, _parse_params, console

    try:
        params = _parse_params(param)
        check_merge_request(lora, strategy, params, dense_rank)  # fail fast, before the model loads
        studio = Studio(model, device=device, dtype=dtype, config=config, lora_dir=lora_dir)
        report = save_merge(studio, lora, strategy, params, out, dense_rank=dense_rank)
    except StudioError as e:
        _fail(e)
    for line in format_strategy_info(report.strategy_info):
        console.print(line)
    if report.dense_summary():
        console.print(report.dense_summary())
    typer.echo(str(report.path))
    rank = f"{report.ranks[0]}" if report.ranks[0] == report.ranks[1] else f"{report.ranks[0]}-{report.ranks[1]}"
    shape = (f"sparse (SHiRA file), {report.sparse_entries} changed weights" if report.sparse_entries
             else f"rank {rank}")
    console.print(f"{report.strategy} merge of {len(lora)} LoRA(s): {report.layers} layers, {shape}, "
                  f"{report.size_bytes / 1e6:.1f} MB")
