"""LoRA-Squeeze: re-factor a LoRA (or a merged stack) to a lower rank by SVD of its exact delta, per layer.

After "LoRA-Squeeze: Simple and Effective Post-Tuning Compression of LoRA Modules": a LoRA trained at a generous
rank is compressed afterwards, per layer, to the best rank-r approximation of its exact update

    ΔW = U Σ Vᵀ,   B' = U_r Σ_r,   A' = V_rᵀ,   kept energy = Σ_{i≤r} σ_i² / Σ_i σ_i²

(Eckart–Young: no rank-r factorization is closer in Frobenius norm; the relative error is √(1 − kept energy)).
The rank is either fixed (``rank``) or, per layer, the smallest that keeps a share ``energy`` of σ² (``energy``);
with both, the smaller of the two. A layer whose delta has rank ≤ r comes out exactly (squeezing at full rank
returns the input). ΔW is each layer's exact delta: LoRA scale and DoRA folded in, LoHa/LoKr/full/SHiRA deltas
rebuilt densely, a stack summed with its weights and block weights (``cat``); low-rank layers are decomposed
from their factors (QR of B and Aᵀ, SVD of the small core) without forming ΔW.

The same factoring lets ``studio merge`` write merges that hold dense parts (:func:`factor_dense_parts`): the
low-rank part stays exact and only the dense remainder is approximated, at a chosen rank or automatically.

    studio squeeze loras/subject.safetensors --rank 4 --out subject-r4.safetensors
    studio squeeze loras/subject.safetensors:0.9 loras/style.safetensors:0.7 --energy 0.95 --out stack.safetensors
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import typer

from pipelines.errors import StudioError

AUTO_DENSE_ENERGY = 0.999  # automatic rank for dense merge parts: ≥ 99.9% of σ² (relative error ≤ 3.2%)


@dataclass
class LayerSqueeze:
    """What squeezing did to one layer."""

    key: str
    rank_in: int | None  # the input's rank (None: it was dense)
    rank_out: int
    kept_energy: float  # Σ_{i≤r} σ_i² / Σ σ_i² (1.0 for an exact layer)

    @property
    def relative_error(self) -> float:
        """‖ΔW − ΔW'‖_F / ‖ΔW‖_F."""
        return max(0.0, 1.0 - self.kept_energy) ** 0.5


@dataclass
class SqueezeReport:
    path: Path | None
    layers: list[LayerSqueeze] = field(default_factory=list)
    size_bytes: int = 0

    def summary(self) -> str:
        if not self.layers:
            return "no layers"
        zero = sum(layer.rank_out == 0 for layer in self.layers)
        kept = [layer.kept_energy for layer in self.layers]
        ranks = [layer.rank_out for layer in self.layers if layer.rank_out] or [0]
        dropped = f", {zero} all-zero layers dropped" if zero else ""
        return (f"{len(self.layers) - zero} layers{dropped}, rank {min(ranks)}-{max(ranks)} "
                f"(mean {statistics.fmean(ranks):.1f}); "
                f"kept energy min {100 * min(kept):.2f}%, median {100 * statistics.median(kept):.2f}%, "
                f"relative error max {100 * max(layer.relative_error for layer in self.layers):.2f}%")


def choose_rank(singular_values, rank: int | None, energy: float | None) -> int:
    """The kept rank: at most ``rank``, and the fewest values keeping ``energy`` of Σσ² (at least 1)."""
    import torch

    s2 = singular_values.double() ** 2
    total = float(s2.sum())
    k = int(singular_values.numel())
    if rank is not None:
        k = min(k, rank)
    if energy is not None and total > 0:
        cumulative = torch.cumsum(s2, 0) / total
        k = min(k, int((cumulative < energy - 1e-12).sum()) + 1)
    return max(1, k)


def svd_factors(up, down, dense, rank: int | None, energy: float | None):
    """``(up', down', kept_energy)``: the truncated SVD of ``up @ down + dense`` (either part may be ``None``).

    Matrices are 2-D (conv ``down`` flattened); computed in float64. ``None`` factors if the delta is zero.
    """
    import torch

    if dense is None:
        qb, rb = torch.linalg.qr(up.double())
        qa, ra = torch.linalg.qr(down.double().T)
        u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
        u, vh = qb @ u, vh @ qa.T
    else:
        matrix = dense.double() if up is None else dense.double() + up.double() @ down.double()
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    total = float((s.double() ** 2).sum())
    if total == 0.0:
        return None, None, 1.0
    k = choose_rank(s, rank, energy)
    kept = float((s[:k].double() ** 2).sum()) / total
    return (u[:, :k] * s[:k]).float(), vh[:k].float(), kept


def dense_part(delta, rows: int):
    """A delta's parts that are not low-rank, as one 2-D float32 matrix with the scale applied: its dense part
    plus its sparse (SHiRA) part; ``None`` if it has neither."""
    dense = None if delta.dense is None else delta.dense.float().reshape(rows, -1) * delta.scale
    if getattr(delta, "sparse_values", None) is not None:
        sparse = delta.sparse_weight() * delta.scale
        dense = sparse if dense is None else dense + sparse
    return dense


def squeeze_delta(key: str, delta, base_shape: Sequence[int], rank: int | None, energy: float | None):
    """``(LayerDelta | None, LayerSqueeze)``: one layer's exact delta re-factored at ``rank`` / ``energy``."""
    from pipelines.adapters.delta import LayerDelta

    if delta.magnitude is not None:
        raise StudioError(f"layer {key}: resolve the DoRA magnitude against the base weight first (merge_stack does)")
    up = down = None
    if delta.down is not None:
        up = delta.up.float().reshape(delta.up.shape[0], -1) * delta.scale
        down = delta.down.float().flatten(1)
    dense = dense_part(delta, base_shape[0])
    low_rank_only = up is not None and dense is None
    if up is None and dense is None:
        new_up = new_down = None
        kept = 1.0
    else:
        new_up, new_down, kept = svd_factors(up, down, dense, rank, energy)
    bias = None if delta.bias is None else delta.bias.float() * delta.scale
    report = LayerSqueeze(key, delta.rank if low_rank_only else None, 0 if new_up is None else new_up.shape[1], kept)
    if new_up is None:
        return (None if bias is None else LayerDelta(bias=bias, kind="squeeze")), report
    return LayerDelta(down=new_down, up=new_up, bias=bias, kind="squeeze"), report


def factor_dense_parts(deltas: Mapping[str, Any], rank: int | None = None,
                       energy: float | None = AUTO_DENSE_ENERGY) -> tuple[dict, list[LayerSqueeze]]:
    """Merged deltas that a LoRA file can hold: each layer's dense part (LoHa/LoKr/full/DoRA/SHiRA parts of a
    merge, or a dense merge) is factored by truncated SVD at ``rank`` (``None``: the fewest ranks keeping
    ``energy`` of its σ²) and concatenated to the layer's exact low-rank part. Returns the new deltas and one
    :class:`LayerSqueeze` per factored layer (its energy and error are those of the dense part)."""
    import torch

    from pipelines.adapters.delta import LayerDelta

    out, reports = {}, []
    for key, delta in deltas.items():
        dense = dense_part(delta, delta.out_features)
        if dense is None and delta.magnitude is None:
            out[key] = delta
            continue
        if delta.magnitude is not None:
            raise StudioError(f"layer {key}: a DoRA magnitude cannot be factored without the base weight")
        up, down, kept = svd_factors(None, None, dense, rank, energy)
        if up is not None:  # an all-zero dense part is dropped exactly
            reports.append(LayerSqueeze(key, None, up.shape[1], kept))
        ups, downs = [], []
        if delta.down is not None:
            ups.append(delta.up.float().reshape(delta.up.shape[0], -1) * delta.scale)
            downs.append(delta.down.float().flatten(1))
        if up is not None:
            ups.append(up)
            downs.append(down)
        bias = None if delta.bias is None else delta.bias.float() * delta.scale
        if ups:
            out[key] = LayerDelta(down=torch.cat(downs), up=torch.cat(ups, dim=1), bias=bias, kind=delta.kind)
        elif bias is not None:
            out[key] = LayerDelta(bias=bias, kind=delta.kind)
    return out, reports


def check_squeeze_request(loras: Sequence, rank: int | None, energy: float | None, save_dtype: str = "fp32"):
    """The parsed LoRA specs, or a :class:`StudioError` before any model is loaded."""
    from .merging import parse_file_stack

    if save_dtype not in SAVE_DTYPES:
        raise StudioError(f"--save-dtype must be one of {', '.join(SAVE_DTYPES)}, got {save_dtype!r}")
    if rank is None and energy is None:
        raise StudioError("give --rank R and/or --energy E (e.g. --rank 8, or --energy 0.95)")
    if rank is not None and rank < 1:
        raise StudioError(f"--rank must be at least 1, got {rank}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise StudioError(f"--energy must be in (0, 1], got {energy}")
    return parse_file_stack(loras, "give at least one LoRA to squeeze")


SAVE_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def squeeze(studio, loras: Sequence, out: str | Path | None, *, rank: int | None = None,
            energy: float | None = None, save_dtype: str = "fp32") -> SqueezeReport:
    """Squeeze ``loras`` (one LoRA, or a stack summed at its weights) on ``studio``'s model; write ``out``
    (a diffusers/PEFT LoRA file, tensors in ``save_dtype``) unless it is ``None``. Returns the per-layer report."""
    from fusion import make_strategy, merge_stack
    from pipelines.adapters.export import save_lora

    import torch

    specs = check_squeeze_request(loras, rank, energy, save_dtype)
    names = studio.load(specs)
    studio._set_block_weights(names, specs)
    exact = merge_stack(make_strategy("cat"), studio.composer, names, [s.weight for s in specs])
    deltas, layers = {}, []
    for key, delta in exact.deltas.items():
        layer = studio.composer.layers[key]
        squeezed, report = squeeze_delta(key, delta, tuple(layer.weight.shape), rank, energy)
        layers.append(report)
        if squeezed is not None:
            deltas[key] = squeezed
    report = SqueezeReport(path=None, layers=layers)
    if out is not None:
        loaded = studio.loaded()
        provenance = {"rank": rank, "energy": energy, "model": studio.model,
                      "loras": [{"source": loaded[n].source, "weight": s.weight, "sha256": loaded[n].sha256}
                                for n, s in zip(names, specs)],
                      "kept_energy": {r.key: round(r.kept_energy, 6) for r in layers}}
        path = save_lora(out, deltas, studio.pipe, studio.family, dtype=getattr(torch, SAVE_DTYPES[save_dtype]),
                         metadata={"studio.squeeze": json.dumps(provenance), "modelspec.title": Path(out).stem})
        report.path, report.size_bytes = Path(path), Path(path).stat().st_size
    return report


def squeeze_command(
    lora: list[str] = typer.Argument(..., help="LoRA file(s), PATH[:WEIGHT][:blocks=SPEC]; several are summed."),
    rank: Optional[int] = typer.Option(None, "--rank", "-r", help="Rank to keep per layer."),
    energy: Optional[float] = typer.Option(None, "--energy", "-e",
                                           help="Keep the fewest ranks holding this share of σ² per layer (0-1]."),
    out: Path = typer.Option(..., "--out", "-o", help="The squeezed LoRA (.safetensors)."),
    per_layer: bool = typer.Option(False, "--per-layer", help="Print every layer's rank and kept energy."),
    save_dtype: str = typer.Option("fp32", "--save-dtype", help="fp32 (exact), fp16 or bf16 (half the file)."),
    model: str = typer.Option("tiny-sdxl", "--model", "-m", help="The base model the LoRAs are for."),
    config: Optional[str] = typer.Option(None, help="Hub id or folder with the components a checkpoint lacks."),
    lora_dir: Optional[Path] = typer.Option(None, help="LoRA library; relative LoRA names resolve inside it."),
    device: Optional[str] = typer.Option(None, help="cuda, cpu, ... (the SVDs run on the CPU)."),
    dtype: Optional[str] = typer.Option(None, help="bf16, fp16 or fp32."),
) -> None:
    """Re-factor a LoRA (or the sum of several) to a lower rank by SVD of its exact delta (LoRA-Squeeze)."""
    from studio import Studio
    from studio.cli import _fail, console

    try:
        check_squeeze_request(lora, rank, energy, save_dtype)  # fail fast, before the model loads
        studio = Studio(model, device=device, dtype=dtype, config=config, lora_dir=lora_dir)
        report = squeeze(studio, lora, out, rank=rank, energy=energy, save_dtype=save_dtype)
    except StudioError as e:
        _fail(e)
    if per_layer:
        for layer in report.layers:
            rank_in = "dense" if layer.rank_in is None else f"rank {layer.rank_in}"
            console.print(f"{layer.key}: {rank_in} -> {layer.rank_out}, kept energy {100 * layer.kept_energy:.2f}%")
    typer.echo(str(report.path))
    console.print(f"squeezed {len(lora)} LoRA(s): {report.summary()}, {report.size_bytes / 1e6:.2f} MB")
