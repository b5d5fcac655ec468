"""`MixState`: the knobs strategies turn and composed layers read.

One ``MixState`` belongs to one pipeline. It holds, for the N loaded adapters (its *columns*):

* ``text_gains`` and ``denoiser_gains``: the per-sample weight of every adapter, shape ``[G, N]``. ``G == 1``
  broadcasts over the batch (merge); ``G == batch`` gives every sample its own mix (switch lanes, composite
  replicas);
* ``block_weights``: a per-block multiplier of every adapter, shape ``[blocks, N]`` (LoRA block weights);
* ``layer_weights``: an optional per-layer multiplier, shape ``[layers, N]`` (``None``: all ones, no cost), for
  strategies whose choice changes layer by layer and step by step (K-LoRA); rows are the stable ids that
  :meth:`layer_id` hands out to composed layers;
* ``active``: the adapters packed into the layers' branches right now. Changing it re-concatenates small
  tensors on the next forward; it never re-parses files or re-injects layers;
* ``step_block_weights``: an optional second ``[blocks, N]`` multiplier of the denoiser blocks that a strategy
  may change at every step (time-varying block schedules); ``None`` when unused;
* ``timestep``: the denoiser's current timestep per sample, normalised to [0, 1] (set by the seam for
  layers and gates that depend on it; ``None`` outside a denoiser call).

Every change bumps ``version``; layers cache their expanded gains per version.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch


class MixState:
    def __init__(self, blocks: Sequence[str], text_blocks: Iterable[str]):
        self.blocks = list(blocks)
        self.block_index = {b: i for i, b in enumerate(self.blocks)}
        self.text_block_ids = frozenset(self.block_index[b] for b in text_blocks)
        self.names: list[str] = []
        self.active: tuple[str, ...] = ()
        self.text_gains = torch.zeros(1, 0)
        self.denoiser_gains = torch.zeros(1, 0)
        self.block_weights = torch.ones(len(self.blocks), 0)
        self.step_block_weights: torch.Tensor | None = None
        self.timestep: torch.Tensor | None = None
        self.layer_index: dict[str, int] = {}
        self.layer_weights: torch.Tensor | None = None
        self._layer_source: torch.Tensor | None = None
        self.version = 0
        self.pack_version = 0
        self._cache: dict = {}

    # ----------------------------------------------------------------------------------------------- columns
    def column(self, name: str) -> int:
        return self.names.index(name)

    def layer_id(self, key: str) -> int:
        """The row of layer ``key`` in ``layer_weights`` (handed out on first use, never reused)."""
        return self.layer_index.setdefault(key, len(self.layer_index))

    def add_column(self, name: str) -> int:
        if name in self.names:
            raise ValueError(f"adapter '{name}' is already loaded")
        self.names.append(name)
        self.text_gains = torch.cat([self.text_gains, torch.zeros(self.text_gains.shape[0], 1)], dim=1)
        self.denoiser_gains = torch.cat([self.denoiser_gains, torch.zeros(self.denoiser_gains.shape[0], 1)], dim=1)
        self.block_weights = torch.cat([self.block_weights, torch.ones(len(self.blocks), 1)], dim=1)
        self.step_block_weights = None
        self.layer_weights = None
        self._bump(repack=True)
        return len(self.names) - 1

    def remove_column(self, name: str) -> None:
        i = self.column(name)
        keep = [j for j in range(len(self.names)) if j != i]
        self.names.pop(i)
        self.text_gains = self.text_gains[:, keep]
        self.denoiser_gains = self.denoiser_gains[:, keep]
        self.block_weights = self.block_weights[:, keep]
        self.step_block_weights = None
        self.active = tuple(n for n in self.active if n != name)
        self.layer_weights = None
        self._bump(repack=True)

    # ----------------------------------------------------------------------------------------------- setters
    def set_active(self, names: Sequence[str]) -> None:
        names = tuple(names)
        unknown = [n for n in names if n not in self.names]
        if unknown:
            raise KeyError(f"not loaded: {unknown}")
        if names != self.active:
            self.active = names
            self._bump(repack=True)

    def gains_row(self, weights: Mapping[str, float]) -> torch.Tensor:
        """A ``[N]`` gain vector from ``{name: weight}`` (absent adapters get 0)."""
        row = torch.zeros(len(self.names))
        for name, w in weights.items():
            row[self.column(name)] = float(w)
        return row

    def set_gains(self, *, text: torch.Tensor | None = None, denoiser: torch.Tensor | None = None) -> None:
        for value in (text, denoiser):
            if value is not None and (value.dim() != 2 or value.shape[1] != len(self.names)):
                raise ValueError(f"gains must be [G, {len(self.names)}], got {tuple(value.shape)}")
        if text is not None:
            self.text_gains = text.detach().float().cpu()
        if denoiser is not None:
            self.denoiser_gains = denoiser.detach().float().cpu()
        self._bump()

    def set_block_weights(self, name: str, weights: Mapping[str, float]) -> None:
        col = self.column(name)
        column = torch.ones(len(self.blocks))
        for block, w in weights.items():
            column[self.block_index[block]] = float(w)
        if not torch.equal(self.block_weights[:, col], column):
            self.block_weights[:, col] = column
            self._bump()

    def set_step_block_weights(self, weights: torch.Tensor | None) -> None:
        """This step's ``[blocks, N]`` multiplier of the denoiser blocks (``None``: none)."""
        if weights is not None:
            if tuple(weights.shape) != (len(self.blocks), len(self.names)):
                raise ValueError(f"step block weights must be [{len(self.blocks)}, {len(self.names)}], "
                                 f"got {tuple(weights.shape)}")
            weights = weights.detach().float().cpu()
        same = (weights is None and self.step_block_weights is None) or (
            weights is not None and self.step_block_weights is not None
            and torch.equal(weights, self.step_block_weights))
        if not same:
            self.step_block_weights = weights
            self._bump()

    def set_layer_weights(self, table: torch.Tensor | None) -> None:
        """Per-layer multipliers ``[layers, N]`` (rows by :meth:`layer_id`; missing rows count as ones)."""
        if table is self._layer_source and (table is None) == (self.layer_weights is None):
            return  # the same plan again (e.g. the second denoiser call of a step)
        if table is not None and (table.dim() != 2 or table.shape[1] != len(self.names)):
            raise ValueError(f"layer weights must be [layers, {len(self.names)}], got {tuple(table.shape)}")
        self._layer_source = table
        self.layer_weights = None if table is None else table.detach().float().cpu()
        self._bump()

    # ------------------------------------------------------------------------------------------------ reading
    def gains_for(
        self, block_id: int, device: torch.device, dtype: torch.dtype, layer_id: int | None = None
    ) -> torch.Tensor:
        """``[G, N]`` gains of a layer in block ``block_id`` (text or denoiser gains, times block weights, times
        the layer's row of ``layer_weights`` when one is set)."""
        key = (block_id, device, dtype)
        cached = self._cache.get(key)
        if cached is None:
            text = block_id in self.text_block_ids
            gains = (self.text_gains if text else self.denoiser_gains) * self.block_weights[block_id]
            if self.step_block_weights is not None and not text:
                gains = gains * self.step_block_weights[block_id]
            cached = gains.to(device=device, dtype=dtype)
            self._cache[key] = cached
        table = self.layer_weights
        if table is None or layer_id is None or layer_id >= table.shape[0]:
            return cached
        layer_key = ("layer", layer_id, device, dtype)
        out = self._cache.get(layer_key)
        if out is None:
            table_key = ("layer-table", device, dtype)
            on_device = self._cache.get(table_key)
            if on_device is None:
                on_device = self._cache[table_key] = table.to(device=device, dtype=dtype)
            out = self._cache[layer_key] = cached * on_device[layer_id]
        return out

    def _bump(self, repack: bool = False) -> None:
        self.version += 1
        if repack:
            self.pack_version += 1
        self._cache.clear()
