"""SHiRA (Bhardwaj et al. 2024, "Sparse High Rank Adapters"): a sparse ``ΔW`` that changes a small fraction
(1-2%) of a layer's weights directly. ``ΔW[i, j] = scale · v_k`` for the k-th index pair ``(i, j)`` of its support
and 0 elsewhere; it has high rank, so it is not a LoRA, and it is applied as a sparse product (never a dense copy
of the layer weight): ``y_s += g_s · (ΔW x_s)``, with the sample's gain ``g_s`` as for every adapter.

**File formats read.**

* PEFT's SHiRA tuner (``ShiraConfig``, PEFT ≥ 0.21): per linear layer ``<module>.shira_weight`` (the nnz values)
  and ``<module>.shira_indices`` (int, 2 × nnz: output rows, then input columns), as ``get_peft_model_state_dict``
  returns them. Keys may carry PEFT's ``base_model.model.`` prefix (``save_pretrained``) and/or a diffusers
  component prefix (``unet.``, ``transformer.``, ``text_encoder.``, ``text_encoder_2.``, as diffusers prefixes
  adapter state dicts); keys without a component belong to the denoiser. PEFT's scale is 1 (its default; it is
  not saved).
* A plain sparse-delta layout: ``<component>.<module>.sparse_delta.indices`` (int, 2 × nnz) and
  ``<component>.<module>.sparse_delta.values`` (nnz), ``ΔW = Σ values`` at those positions.

Validation (per layer, against the target layer): linear layers only (PEFT's tuner supports nothing else),
indices are integers of shape 2 × nnz inside the layer's ``out × in``, values are finite, one per index pair.
Repeated index pairs are summed, which is what PEFT's ``torch.sparse_coo_tensor`` delta does when it is added
to the weight; the studio coalesces them once when the file is read.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..delta import LayerDelta

PEFT_SUFFIXES = ("shira_weight", "shira_indices")
PLAIN_SUFFIXES = ("sparse_delta.values", "sparse_delta.indices")
SUFFIXES = PEFT_SUFFIXES + PLAIN_SUFFIXES
PEFT_PREFIX = "base_model.model."


@dataclass
class SparseDelta(LayerDelta):
    """A ``LayerDelta`` with a sparse part ``scale · ΔW_sparse`` (``sparse_indices`` 2 × nnz, ``sparse_values`` nnz,
    on a layer of ``sparse_shape = (out, in)``); it may also carry low-rank, dense and bias parts (merges)."""

    sparse_indices: torch.Tensor | None = None
    sparse_values: torch.Tensor | None = None
    sparse_shape: tuple[int, int] | None = None

    def __post_init__(self):
        if self.sparse_values is None:
            super().__post_init__()
            return
        if (self.down is None) != (self.up is None):
            raise ValueError("a low-rank delta needs both down and up")
        problem = sparse_problem(self.sparse_indices, self.sparse_values, self.sparse_shape)
        if problem:
            raise ValueError(problem)

    @property
    def out_features(self) -> int:
        return int(self.sparse_shape[0]) if self.sparse_shape is not None else super().out_features

    @property
    def in_features(self) -> int | None:
        return int(self.sparse_shape[1]) if self.sparse_shape is not None else super().in_features

    def sparse_weight(self) -> torch.Tensor:
        """The sparse part as a dense float32 matrix (scale not applied); duplicates summed."""
        w = torch.zeros(self.sparse_shape)
        rows, cols = self.sparse_indices.long()
        return w.index_put_((rows, cols), self.sparse_values.float(), accumulate=True)

    def weight(self, kernel_shape: tuple[int, ...] | None = None) -> torch.Tensor | None:
        """Every part as one dense float32 ``ΔW`` (scale applied, DoRA not applied)."""
        w = self.sparse_weight() * self.scale
        if self.down is not None:
            w += (self.up.float().reshape(self.up.shape[0], -1) @ self.down.float().flatten(1)) * self.scale
        if self.dense is not None:
            w += self.dense.float().reshape(w.shape) * self.scale
        return w if kernel_shape is None else w.reshape(kernel_shape)

    def select_rows(self, index) -> "SparseDelta":
        raise ValueError("a SHiRA delta cannot be split across fused layers")

    def to(self, device=None, dtype=None) -> "SparseDelta":
        moved = super().to(device=device, dtype=dtype)
        return replace(moved, sparse_indices=self.sparse_indices.to(device=device),
                       sparse_values=self.sparse_values.to(device=device, dtype=dtype))


def sparse_problem(indices, values, shape) -> str | None:
    """Why ``(indices, values)`` cannot be a sparse delta of a ``shape`` layer (``None`` if they can)."""
    if indices is None or values is None or shape is None:
        return "a sparse delta needs indices, values and the layer shape"
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        return f"indices must be integers, got {indices.dtype}"
    if indices.dim() != 2 or indices.shape[0] != 2:
        return f"indices must have shape 2 x nnz (rows, then columns), got {tuple(indices.shape)}"
    if not values.is_floating_point() or values.dim() != 1:
        return f"values must be a 1-D float tensor, got {values.dtype} of shape {tuple(values.shape)}"
    if values.shape[0] != indices.shape[1]:
        return f"{values.shape[0]} values for {indices.shape[1]} index pairs"
    if values.numel() and not torch.isfinite(values).all():
        return "values hold NaN or infinite numbers"
    if indices.numel():
        low = int(indices.min())
        rows, cols = int(indices[0].max()), int(indices[1].max())
        if low < 0 or rows >= shape[0] or cols >= shape[1]:
            return (f"indices reach row {rows}, column {cols} (min {low}) outside the layer's "
                    f"{shape[0]} x {shape[1]} weight")
    return None


def coalesce(indices: torch.Tensor, values: torch.Tensor, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted, unique index pairs with repeated pairs summed."""
    t = torch.sparse_coo_tensor(indices.long(), values.float(), tuple(shape), check_invariants=True).coalesce()
    return t.indices(), t.values()


INDEX_SUFFIXES = ("shira_indices", "sparse_delta.indices")


def is_index_key(key: str) -> bool:
    """A sparse delta's integer index tensor (the one kind of LoRA-file tensor that is not floating point)."""
    return key.endswith(INDEX_SUFFIXES)


def is_shira_file(tensors: dict) -> bool:
    return any(key.endswith(SUFFIXES) for key in tensors)


def split_keys(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """``({layer: {"indices", "values"}}, other tensors)``; layers keep any component prefix, PEFT's
    ``base_model.model.`` is removed."""
    names = {"shira_weight": "values", "shira_indices": "indices",
             "sparse_delta.values": "values", "sparse_delta.indices": "indices"}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    rest = {}
    for key, value in tensors.items():
        for suffix, short in names.items():
            if key.endswith("." + suffix):
                layer = key[: -len(suffix) - 1].removeprefix(PEFT_PREFIX)
                groups.setdefault(layer, {})[short] = value
                break
        else:
            rest[key] = value
    return groups, rest


def build(group: dict[str, torch.Tensor], shape: tuple[int, int]) -> SparseDelta:
    """The checked, coalesced sparse delta of one layer of ``shape`` (out, in)."""
    missing = {"indices", "values"} - set(group)
    if missing:
        raise ValueError(f"SHiRA layer lacks its {' and '.join(sorted(missing))}")
    indices, values = group["indices"], group["values"]
    problem = sparse_problem(indices, values, shape)
    if problem:
        raise ValueError(problem)
    indices, values = coalesce(indices, values, shape)
    return SparseDelta(sparse_indices=indices, sparse_values=values, sparse_shape=tuple(shape), kind="shira")


def sparse_sum(parts: list[tuple[float, torch.Tensor, torch.Tensor]], shape) -> tuple[torch.Tensor, torch.Tensor]:
    """``Σ_i w_i ΔW_i`` of sparse deltas ``(w_i, indices_i, values_i)`` as one coalesced sparse delta."""
    indices = torch.cat([i.long() for _, i, _ in parts], dim=1)
    values = torch.cat([w * v.float() for w, _, v in parts])
    return coalesce(indices, values, shape)


def is_pure_sparse(delta: LayerDelta) -> bool:
    """Only a sparse part (what a SHiRA file can hold: no low-rank, dense, bias or DoRA part)."""
    return (getattr(delta, "sparse_values", None) is not None and delta.down is None and delta.dense is None
            and delta.bias is None and delta.magnitude is None)


def save_shira(path, deltas: dict[str, LayerDelta], metadata: dict[str, str] | None = None):
    """Write pure sparse ``deltas`` (``{"component.module": SparseDelta}``) as a SHiRA file in PEFT's layout under
    diffusers' component prefixes (``<component>.<module>.shira_weight`` / ``.shira_indices``, int32 2 × nnz as
    PEFT stores them), scale folded into the values; written next to ``path`` and moved into place, with the
    umask's mode."""
    from pathlib import Path

    from ...atomic_files import save_safetensors

    path = Path(path)
    tensors = {}
    for key, delta in deltas.items():
        if not is_pure_sparse(delta):
            raise ValueError(f"layer {key} is not a pure sparse delta; it cannot be written as a SHiRA file")
        tensors[f"{key}.shira_weight"] = (delta.sparse_values.float() * delta.scale).contiguous()
        tensors[f"{key}.shira_indices"] = delta.sparse_indices.to(torch.int32).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_safetensors(tensors, path, {"format": "pt", **(metadata or {})})


def support_overlap(a: torch.Tensor, b: torch.Tensor, columns: int) -> tuple[int, float]:
    """``(shared entries, shared / the smaller support)`` of two coalesced supports (2 × nnz index tensors)."""
    flat_a = a[0].long() * columns + a[1].long()
    flat_b = b[0].long() * columns + b[1].long()
    shared = int(torch.isin(flat_a, flat_b).sum())
    smaller = min(flat_a.numel(), flat_b.numel())
    return shared, (shared / smaller if smaller else 0.0)
