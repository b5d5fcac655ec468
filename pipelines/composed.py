"""Composed layers: one concatenated low-rank branch with per-sample gains, for every adapter on a layer.

For N adapters with ``ΔW_i = s_i · B_i A_i`` on one linear layer, the layer keeps ``A_cat`` (Σr × in) and
``B_cat`` (out × Σr, with each ``s_i`` folded in) and computes

    y = W x + b + B_cat((A_cat x) ⊙ g)

where ``g`` is a gain over the concatenated rank dimension, per sample: every rank column carries the current
weight of the adapter that owns it (``MixState.gains_for`` times the layer's block weight). Two GEMMs serve any
number of adapters and any mix: merge (every sample, every adapter), switch (one-hot per step), composite (N
replicas of the batch, replica i with adapter i only, all in one forward).

A layer may bring its own low-rank segment (a 4-bit :class:`~pipelines.quant.linear.QuantLinear`'s SVDQuant
branch ``L_up L_down``): the branch then hosts it as a *fixed* segment, concatenated in front of the adapters'
ranks with a constant gain of 1, so the layer's branch and every LoRA still run as one pair of GEMMs.

An optional *gate* (for learned, feature-dependent fusion such as AutoLoRA's) replaces the sum over adapters:
when ``AdapterBranch.gate`` is set on a linear layer, the branch computes every adapter's own output ``o_i``
(the rank dimension split by owner, plus that adapter's dense, bias and DoRA parts) and returns
``h + gate(x, h, o, columns)``, where ``h`` is the base output including the layer's fixed segment. The
ungated path is unchanged.

Adapters that are not low-rank at a fair cost take exact side paths in the same layer: dense deltas (large
LoHa/LoKr, full diffs), bias deltas, DoRA's rescaling of the base output (see
:mod:`pipelines.adapters.kinds.dora`), and sparse SHiRA deltas, one float32 sparse-dense product per adapter
(:mod:`pipelines.adapters.kinds.shira`; no dense copy of the layer). ``ComposedLinear``/``ComposedConv2d`` subclass ``nn.Linear``/``nn.Conv2d``
and share the wrapped layer's ``weight`` and ``bias`` Parameters, so ``state_dict`` keys, ``isinstance`` checks
and device moves are unchanged; the base weights are never written, and putting the original module back
restores the model bit for bit.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .adapters.delta import LayerDelta
from .adapters.kinds import dora
from .mix_state import MixState
from .quant.linear import QuantLinear


@dataclass
class PreparedDelta:
    """A ``LayerDelta`` resolved against its layer (scale and DoRA folded in), kept on the CPU in float32."""

    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    dense: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    dora_out: torch.Tensor | None = None  # s - 1 per output row: adds (s-1) ⊙ W x
    dora_in: torch.Tensor | None = None  # s - 1 per input column: adds W ((s-1) ⊙ x)
    sparse_indices: torch.Tensor | None = None  # SHiRA: 2 x nnz (rows, columns), coalesced
    sparse_values: torch.Tensor | None = None  # nnz values, scale folded in

    def weight(self, base_weight: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
        """The exact dense change of the layer weight at gain 1, in float32 on ``device`` (default: CPU)."""
        shape = tuple(base_weight.shape)
        device = torch.device(device or "cpu")
        w = torch.zeros(shape, device=device)
        if self.down is not None:
            up, down = self.up.to(device), self.down.to(device)
            w += (up @ down.reshape(down.shape[0], -1)).reshape(shape)
        if self.dense is not None:
            w += self.dense.to(device).reshape(shape)
        if self.sparse_values is not None:
            rows, cols = self.sparse_indices.to(device)
            w.view(shape[0], -1).index_put_((rows, cols), self.sparse_values.to(device), accumulate=True)
        if self.dora_out is not None or self.dora_in is not None:
            base = base_weight.detach().float().to(device)
            if self.dora_out is not None:
                w += self.dora_out.to(device).view(-1, *[1] * (len(shape) - 1)) * base
            if self.dora_in is not None:
                w += self.dora_in.to(device).view(1, -1, *[1] * (len(shape) - 2)) * base
        return w


def prepare_delta(delta: LayerDelta, base: nn.Module) -> PreparedDelta:
    """Fold scale and DoRA into ``delta`` for layer ``base`` and check that the shapes fit."""
    shape = (base.out_features, base.in_features) if isinstance(base, nn.Linear) else tuple(base.weight.shape)
    kernel = shape[1:]
    s = None
    if delta.magnitude is not None:
        weight = base.weight  # a QuantLinear gives its effective dequantized weight here
        if weight.is_meta:
            raise ValueError("DoRA needs the base weights, which are not loaded (meta device)")
        s = dora.norm_scale(weight.detach().cpu(), delta.to(device="cpu"))
    out = PreparedDelta()
    if delta.down is not None and delta.down.shape[0] > 0:  # a merge can leave a dense part and rank 0
        rank = delta.rank
        down = delta.down.float()
        if down[0].numel() != int(torch.tensor(kernel).prod()):
            raise ValueError(f"LoRA down-projection of shape {tuple(delta.down.shape)} does not fit a layer of {shape}")
        down = down.reshape(rank, *kernel)
        up = delta.up.float().reshape(delta.up.shape[0], -1) * delta.scale
        if s is not None and delta.magnitude_axis == "out":
            up = up * s[:, None]
        if s is not None and delta.magnitude_axis == "in":
            down = down * s.view(1, -1, *[1] * (len(kernel) - 1))
        out.down, out.up = down.contiguous(), up.contiguous()
    if delta.dense is not None:
        if delta.dense.numel() != int(torch.tensor(shape).prod()):
            raise ValueError(f"dense delta of shape {tuple(delta.dense.shape)} does not fit a layer of {shape}")
        dense = delta.dense.float().reshape(shape) * delta.scale
        if s is not None and delta.magnitude_axis == "out":
            dense = dense * s.view(-1, *[1] * (len(shape) - 1))
        if s is not None and delta.magnitude_axis == "in":
            dense = dense * s.view(1, -1, *[1] * (len(shape) - 2))
        out.dense = dense.contiguous()
    if delta.bias is not None:
        out.bias = delta.bias.float().reshape(-1) * delta.scale
    if getattr(delta, "sparse_values", None) is not None:  # SHiRA (pipelines.adapters.kinds.shira)
        if len(shape) != 2 or tuple(delta.sparse_shape) != shape:
            raise ValueError(f"a sparse (SHiRA) delta for a {tuple(delta.sparse_shape)} weight does not fit a layer "
                             f"of {shape} (SHiRA applies to linear layers only)")
        coo = torch.sparse_coo_tensor(delta.sparse_indices.long(), delta.sparse_values.float() * delta.scale, shape,
                                      check_invariants=True).coalesce()  # repeated pairs summed
        out.sparse_indices, out.sparse_values = coo.indices().contiguous(), coo.values().contiguous()
    if s is not None:
        if delta.magnitude_axis == "out":
            out.dora_out = s - 1
        else:
            out.dora_in = s - 1
    return out


class AdapterBranch(nn.Module):
    """The adapters of one layer, packed for the active set; a submodule of the composed layer.

    Packed tensors are non-persistent buffers: they follow ``.to()`` and offloading, and stay out of
    ``state_dict``. The per-adapter ``PreparedDelta`` entries stay on the CPU and are re-packed only when
    the active set or the layer's device/dtype changes.
    """

    def __init__(self, state: MixState, block_id: int, layer_id: int | None = None):
        super().__init__()
        self.state = state
        self.block_id = block_id
        self.layer_id = layer_id
        self.entries: dict[str, PreparedDelta] = {}
        self._pack_key = None
        self._gain_key = None
        self._empty = True
        self._sparse: list[tuple[int, torch.Tensor]] = []
        self.fixed_rank = 0
        self._columns: list[int] = []
        # optional learned gate: gate(x, y, outputs[K, *y.shape], columns[K]) -> the layer's total change
        self.gate: Callable[..., torch.Tensor] | None = None
        for name in ("down_cat", "up_cat", "owner", "dense_cat", "dense_owner", "bias_cat", "bias_owner",
                     "dora_out_cat", "dora_out_owner", "dora_in_cat", "dora_in_owner"):
            self.register_buffer(name, None, persistent=False)

    def set_gate(self, gate: Callable[..., torch.Tensor] | None) -> None:
        """Attach (or, with ``None``, detach) a gate; it is not registered as a submodule of the model."""
        object.__setattr__(self, "gate", gate)

    # -------------------------------------------------------------------------------------------- packing
    def _pack(self, device: torch.device, dtype: torch.dtype, layer: nn.Module) -> None:
        fixed = layer.fixed_segment() if hasattr(layer, "fixed_segment") else None
        key = (self.state.pack_version, device, dtype, tuple(self.entries), fixed is not None)
        if key == self._pack_key:
            return
        cols = [(self.state.column(n), self.entries[n]) for n in self.state.active if n in self.entries]

        def cat(parts, dim=0):
            return torch.cat(parts, dim=dim).to(device=device, dtype=dtype) if parts else None

        def owners(items):
            return torch.tensor(items, dtype=torch.long, device=device) if items else None

        low = [(c, e) for c, e in cols if e.down is not None]
        # the layer's fixed segment goes first; its owner is the extra constant-1 gain column N (see forward)
        self.fixed_rank = 0 if fixed is None else fixed[0].shape[0]
        self.down_cat = cat(([fixed[0]] if fixed else []) + [e.down for _, e in low])
        self.up_cat = cat(([fixed[1]] if fixed else []) + [e.up for _, e in low], dim=1)
        self.owner = owners([len(self.state.names)] * self.fixed_rank + [c for c, e in low for _ in range(e.down.shape[0])])
        dense = [(c, e) for c, e in cols if e.dense is not None]
        self.dense_cat = cat([e.dense for _, e in dense])
        self.dense_owner = owners([c for c, _ in dense])
        biased = [(c, e) for c, e in cols if e.bias is not None]
        self.bias_cat = cat([e.bias[None] for _, e in biased])
        self.bias_owner = owners([c for c, _ in biased])
        dout = [(c, e) for c, e in cols if e.dora_out is not None]
        self.dora_out_cat = cat([e.dora_out[None] for _, e in dout])
        self.dora_out_owner = owners([c for c, _ in dout])
        din = [(c, e) for c, e in cols if e.dora_in is not None]
        self.dora_in_cat = cat([e.dora_in[None] for _, e in din])
        self.dora_in_owner = owners([c for c, _ in din])
        # SHiRA: one sparse CSR ΔW per adapter (y += g · ΔW x as a sparse product, no dense copy of the layer)
        self._sparse = [(c, sparse_matrix(e, layer, device)) for c, e in cols if e.sparse_values is not None]
        self._empty = not cols and fixed is None
        self._columns = [c for c, _ in cols]
        self._pack_key = key
        self._gain_key = None

    def pack(self, layer: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        """Pack for the active set now (outside a compiled graph; the forward does it itself when eager)."""
        self._pack(device, dtype, layer)

    # -------------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, y: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        """``y`` is the base layer's output for ``x`` (without the layer's fixed segment, which is computed here);
        returns ``y`` plus the fixed segment and every active adapter's share."""
        if not torch.compiler.is_compiling():  # a compiled denoiser is packed before the call (pipelines.compiled)
            self._pack(y.device, y.dtype, layer)
        if self._empty:
            return y
        gains = self.state.gains_for(self.block_id, y.device, y.dtype, self.layer_id)  # [G, N]
        if self.fixed_rank:
            gains = F.pad(gains, (0, 1), value=1.0)  # column N: the fixed segment's constant gain
        rows = gains.shape[0]
        if rows != 1 and rows != x.shape[0]:
            raise RuntimeError(
                f"mix state holds gains for {rows} samples but this layer sees a batch of {x.shape[0]}"
            )
        conv = isinstance(layer, nn.Conv2d)
        if self.gate is not None and not conv:
            if self.fixed_rank:  # the layer's own branch is part of the base output the gate sees
                r = self.fixed_rank
                y = y + F.linear(F.linear(x, self.down_cat[:r]), self.up_cat[:, :r])
            if not self._columns:
                return y
            outputs = self.adapter_outputs(x, y, layer, gains)
            return y + self.gate(x, y, outputs, self._columns)

        def per_sample(v: torch.Tensor) -> torch.Tensor:  # [G, K] -> broadcastable against the output
            return v.view(rows, v.shape[1], 1, 1) if conv else v.view(rows, *[1] * (y.dim() - 2), v.shape[1])

        out = y
        if self.down_cat is not None:
            if conv:
                h = F.conv2d(x, self.down_cat, None, layer.stride, layer.padding, layer.dilation)
                h = h * per_sample(gains[:, self.owner])
                out = out + F.conv2d(h, self.up_cat[:, :, None, None])
            else:
                h = F.linear(x, self.down_cat) * per_sample(gains[:, self.owner])
                out = out + F.linear(h, self.up_cat)
                if self.fixed_rank and self.dora_out_cat is not None:  # DoRA rescales the full base output
                    y = y + F.linear(h[..., : self.fixed_rank], self.up_cat[:, : self.fixed_rank])
        if self.dense_cat is not None:
            n = self.dense_owner.numel()
            if conv:
                z = F.conv2d(x, self.dense_cat, None, layer.stride, layer.padding, layer.dilation)
                z = z.view(z.shape[0], n, -1, *z.shape[2:])
                out = out + (z * gains[:, self.dense_owner].view(rows, n, 1, 1, 1)).sum(1)
            else:
                z = F.linear(x, self.dense_cat).unflatten(-1, (n, -1))
                out = out + (z * gains[:, self.dense_owner].view(rows, *[1] * (y.dim() - 2), n, 1)).sum(-2)
        for c, matrix in self._sparse:
            out = out + sparse_product(matrix, x, y) * per_sample(gains[:, c : c + 1])
        if self.bias_cat is not None:
            out = out + per_sample(gains[:, self.bias_owner] @ self.bias_cat)
        if self.dora_out_cat is not None:
            wx = y if layer.bias is None else y - (layer.bias.view(1, -1, 1, 1) if conv else layer.bias)
            out = out + wx * per_sample(gains[:, self.dora_out_owner] @ self.dora_out_cat)
        if self.dora_in_cat is not None:
            for i in range(self.dora_in_owner.numel()):
                s1 = self.dora_in_cat[i]
                xs = x * (s1.view(1, -1, 1, 1) if conv else s1)
                wx = layer._base_op(xs, with_bias=False)
                g = gains[:, self.dora_in_owner[i]].view(rows, *[1] * (y.dim() - 1))
                out = out + wx * g
        return out

    def adapter_outputs(self, x: torch.Tensor, y: torch.Tensor, layer: nn.Module,
                        gains: torch.Tensor | None = None) -> torch.Tensor:
        """Each active adapter's own change of a linear layer's output, at its gain: ``[K, *y.shape]``.

        Row k belongs to adapter column ``self._columns[k]``; the rows sum to what the ungated branch adds on
        top of the base output. ``y`` is the base output including the layer's fixed segment, if it has one (the
        fixed segment is no adapter's output and is left out here).
        """
        self._pack(y.device, y.dtype, layer)
        if gains is None:
            gains = self.state.gains_for(self.block_id, y.device, y.dtype, self.layer_id)
        rows = gains.shape[0]
        lead = [1] * (y.dim() - 2)
        parts: dict[int, list[torch.Tensor]] = {c: [] for c in self._columns}

        def gain(c: int) -> torch.Tensor:
            return gains[:, c].view(rows, *lead, 1)

        r = self.fixed_rank
        if self.down_cat is not None and self.down_cat.shape[0] > r:
            h = F.linear(x, self.down_cat[r:]) * gains[:, self.owner[r:]].view(rows, *lead, -1)
            up = self.up_cat[:, r:]
            owner = self.owner[r:].tolist()
            start = 0
            while start < len(owner):
                end = start
                while end < len(owner) and owner[end] == owner[start]:
                    end += 1
                parts[owner[start]].append(F.linear(h[..., start:end], up[:, start:end]))
                start = end
        if self.dense_cat is not None:
            z = F.linear(x, self.dense_cat).unflatten(-1, (self.dense_owner.numel(), -1))
            for i, c in enumerate(self.dense_owner.tolist()):
                parts[c].append(z[..., i, :] * gain(c))
        for c, matrix in self._sparse:
            parts[c].append(sparse_product(matrix, x, y) * gain(c))
        if self.bias_cat is not None:
            for i, c in enumerate(self.bias_owner.tolist()):
                parts[c].append(gain(c) * self.bias_cat[i])
        if self.dora_out_cat is not None:
            wx = y if layer.bias is None else y - layer.bias
            for i, c in enumerate(self.dora_out_owner.tolist()):
                parts[c].append(wx * self.dora_out_cat[i] * gain(c))
        if self.dora_in_cat is not None:
            for i, c in enumerate(self.dora_in_owner.tolist()):
                parts[c].append(layer._base_op(x * self.dora_in_cat[i], with_bias=False) * gain(c))
        return torch.stack([sum(parts[c][1:], parts[c][0]).expand_as(y) if parts[c] else torch.zeros_like(y)
                            for c in self._columns])


def sparse_matrix(entry: PreparedDelta, layer: nn.Module, device: torch.device) -> torch.Tensor:
    """An adapter's sparse ΔW (out x in) as a float32 CSR matrix on ``device``: the sparse product runs in float32
    whatever the layer's dtype (CPU sparse kernels lack half precision; it costs nnz, 1-2% of the layer)."""
    shape = (layer.out_features, layer.in_features)
    coo = torch.sparse_coo_tensor(entry.sparse_indices, entry.sparse_values, shape, is_coalesced=True,
                                  check_invariants=False)  # coalesced and range-checked by prepare_delta
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return coo.to(device=device, dtype=torch.float32).to_sparse_csr()


def sparse_product(matrix: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x ΔWᵀ`` for a sparse ΔW (CSR), shaped like ``y``: one sparse-dense product ``ΔW · x_flatᵀ``."""
    flat = x.reshape(-1, x.shape[-1]).to(matrix.dtype)
    return (matrix @ flat.T).T.reshape(y.shape).to(y.dtype)


class ComposedLinear(nn.Linear):
    """An ``nn.Linear`` that shares the wrapped layer's parameters and adds its :class:`AdapterBranch`."""

    def __init__(self, base: nn.Linear, branch: AdapterBranch):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.studio_branch = branch
        object.__setattr__(self, "original", base)

    def _base_op(self, x, with_bias=True):
        return F.linear(x, self.weight, self.bias if with_bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.studio_branch(x, self._base_op(x), self)


class ComposedConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` that shares the wrapped layer's parameters and adds its :class:`AdapterBranch`."""

    def __init__(self, base: nn.Conv2d, branch: AdapterBranch):
        nn.Module.__init__(self)
        if base.groups != 1:
            raise ValueError("LoRA on grouped convolutions is not supported")
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                     "transposed", "output_padding", "groups", "padding_mode"):
            setattr(self, attr, getattr(base, attr))
        if base.padding_mode != "zeros":
            raise ValueError("LoRA on convolutions with non-zero padding modes is not supported")
        self._reversed_padding_repeated_twice = base._reversed_padding_repeated_twice
        self.weight = base.weight
        self.bias = base.bias
        self.studio_branch = branch
        object.__setattr__(self, "original", base)

    def _base_op(self, x, with_bias=True):
        return F.conv2d(x, self.weight, self.bias if with_bias else None, self.stride, self.padding, self.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.studio_branch(x, self._base_op(x), self)


ComposedLayer = ComposedLinear | ComposedConv2d | QuantLinear


def compose_module(base: nn.Module, state: MixState, block_id: int, layer_id: int | None = None) -> nn.Module:
    """Wrap ``base`` (idempotent: a composed layer is returned as is).

    A :class:`~pipelines.quant.linear.QuantLinear` is not wrapped: it hosts the branch itself (its own SVD
    segment joins the adapters' concatenated ranks) and is returned.
    """
    if isinstance(base, (ComposedLinear, ComposedConv2d)):
        return base
    if isinstance(base, QuantLinear):
        if base.studio_branch is None:
            base.attach_branch(AdapterBranch(state, block_id, layer_id))
        return base
    branch = AdapterBranch(state, block_id, layer_id)
    if isinstance(base, nn.Linear):
        return ComposedLinear(base, branch)
    if isinstance(base, nn.Conv2d):
        return ComposedConv2d(base, branch)
    raise TypeError(f"cannot attach adapters to {type(base).__name__}")


def restore_module(layer: nn.Module) -> nn.Module:
    """The original module, re-bound to the (possibly moved) shared parameters."""
    if isinstance(layer, QuantLinear):
        layer.detach_branch()
        return layer
    original = layer.original
    original.weight = layer.weight
    original.bias = layer.bias
    return original
