"""`Composer`: attaches parsed adapters to a pipeline's layers and takes them off again.

One composer per pipeline. It owns the :class:`MixState`, replaces each targeted ``nn.Linear``/``nn.Conv2d``
by its composed twin the first time an adapter touches it, and puts the original module back once no adapter
is left on it, so that removing every adapter restores the pipeline bit for bit. Loading is all-or-nothing:
every delta is prepared (scale and DoRA folded, shapes checked) before the first layer is touched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .adapters.parse import ParsedLora
from .composed import ComposedConv2d, ComposedLinear, PreparedDelta, compose_module, prepare_delta, restore_module
from .families import Family
from .mix_state import MixState


@dataclass
class AttachedAdapter:
    name: str
    parsed: ParsedLora
    layer_keys: tuple[str, ...]
    has_text_parts: bool


class Composer:
    def __init__(self, pipe, family: Family):
        self.pipe = pipe
        self.family = family
        blocks = family.block_names(pipe)
        self.state = MixState(blocks, text_blocks=[b for b in blocks if b.startswith("te")])
        self.layers: dict[str, nn.Module] = {}
        self.adapters: dict[str, AttachedAdapter] = {}

    # ---------------------------------------------------------------------------------------------- lookup
    def _parent(self, key: str) -> tuple[nn.Module, str]:
        component, _, path = key.partition(".")
        root = getattr(self.pipe, component)
        parent_path, _, child = path.rpartition(".")
        return (root.get_submodule(parent_path) if parent_path else root), child

    def module(self, key: str) -> nn.Module:
        parent, child = self._parent(key)
        return getattr(parent, child)

    def block_of(self, key: str) -> str:
        component, _, path = key.partition(".")
        return self.family.block_of(component, path)

    # --------------------------------------------------------------------------------------------- attach
    def add(self, name: str, parsed: ParsedLora) -> AttachedAdapter:
        if name in self.adapters:
            raise ValueError(f"an adapter named '{name}' is already loaded")
        prepared: dict[str, PreparedDelta] = {}
        for key, delta in parsed.deltas.items():
            prepared[key] = prepare_delta(delta, self.module(key))
        self.state.add_column(name)
        for key, entry in prepared.items():
            layer = self.layers.get(key)
            if layer is None:
                parent, child = self._parent(key)
                block_id = self.state.block_index[self.block_of(key)]
                layer = compose_module(getattr(parent, child), self.state, block_id)
                setattr(parent, child, layer)
                self.layers[key] = layer
            layer.studio_branch.entries[name] = entry
        text = any(not k.startswith(self.family.denoiser + ".") for k in prepared)
        attached = AttachedAdapter(name, parsed, tuple(prepared), has_text_parts=text)
        self.adapters[name] = attached
        return attached

    def remove(self, name: str) -> None:
        attached = self.adapters.pop(name)
        for key in attached.layer_keys:
            layer = self.layers[key]
            layer.studio_branch.entries.pop(name, None)
            if not layer.studio_branch.entries:
                parent, child = self._parent(key)
                setattr(parent, child, restore_module(layer))
                del self.layers[key]
        self.state.remove_column(name)

    def clear(self) -> None:
        for name in list(self.adapters):
            self.remove(name)

    # ---------------------------------------------------------------------------------------------- views
    def names(self) -> list[str]:
        return list(self.adapters)

    def text_part_names(self) -> set[str]:
        return {n for n, a in self.adapters.items() if a.has_text_parts}

    def delta_weight(self, name: str, key: str) -> torch.Tensor:
        """The exact dense weight change of adapter ``name`` on layer ``key`` at weight 1 (float32, CPU)."""
        layer = self.layers[key]
        return layer.studio_branch.entries[name].weight(layer.weight)

    def composed_layers(self) -> dict[str, ComposedLinear | ComposedConv2d]:
        return dict(self.layers)
