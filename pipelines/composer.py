"""`Composer`: attaches parsed adapters to a pipeline's layers and takes them off again.

One composer per pipeline. It owns the :class:`MixState`, replaces each targeted ``nn.Linear``/``nn.Conv2d``
by its composed twin the first time an adapter touches it, and puts the original module back once no adapter
is left on it, so that removing every adapter restores the pipeline bit for bit. Loading is all-or-nothing:
every delta is prepared (scale and DoRA folded, shapes checked) before the first layer is touched.

Strategies that fuse several adapters into a new one (weight-space merges) attach it as a *derived* adapter
(``add(..., derived_from=sources)``): it is removed together with any of its sources. ``cache`` holds what
strategies computed from the loaded adapters (merged adapters, per-layer statistics); its keys are tuples whose
first item is the tuple of adapter names the value was computed from, and removing an adapter drops every entry
that names it, so nothing computed from a removed adapter is ever reused.
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
    derived_from: tuple[str, ...] = ()


class Composer:
    def __init__(self, pipe, family: Family):
        self.pipe = pipe
        self.family = family
        blocks = family.block_names(pipe)
        self.state = MixState(blocks, text_blocks=[b for b in blocks if b.startswith("te")])
        self.layers: dict[str, nn.Module] = {}
        self.adapters: dict[str, AttachedAdapter] = {}
        self.cache: dict = {}

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
    def add(self, name: str, parsed: ParsedLora, derived_from: tuple[str, ...] = ()) -> AttachedAdapter:
        if name in self.adapters:
            raise ValueError(f"an adapter named '{name}' is already loaded")
        missing = [s for s in derived_from if s not in self.adapters]
        if missing:
            raise ValueError(f"derived adapter '{name}' refers to adapters that are not loaded: {missing}")
        prepared: dict[str, PreparedDelta] = {}
        for key, delta in parsed.deltas.items():
            prepared[key] = prepare_delta(delta, self.module(key))
        self.state.add_column(name)
        for key, entry in prepared.items():
            layer = self.layers.get(key)
            if layer is None:
                parent, child = self._parent(key)
                block_id = self.state.block_index[self.block_of(key)]
                layer = compose_module(getattr(parent, child), self.state, block_id, self.state.layer_id(key))
                setattr(parent, child, layer)
                self.layers[key] = layer
            layer.studio_branch.entries[name] = entry
        text = any(not k.startswith(self.family.denoiser + ".") for k in prepared)
        attached = AttachedAdapter(name, parsed, tuple(prepared), has_text_parts=text,
                                   derived_from=tuple(derived_from))
        self.adapters[name] = attached
        return attached

    def remove(self, name: str) -> None:
        """Detach ``name`` and every adapter derived from it."""
        for other in [n for n, a in self.adapters.items() if name in a.derived_from]:
            self.remove(other)
        self.cache = {k: v for k, v in self.cache.items() if name not in k[0]}
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
            if name in self.adapters:
                self.remove(name)

    # ---------------------------------------------------------------------------------------------- views
    def names(self) -> list[str]:
        return list(self.adapters)

    def text_part_names(self) -> set[str]:
        return {n for n, a in self.adapters.items() if a.has_text_parts}

    def delta_weight(self, name: str, key: str, device: torch.device | str | None = None) -> torch.Tensor:
        """The exact dense weight change of adapter ``name`` on layer ``key`` at weight 1 (float32; CPU by
        default)."""
        layer = self.layers[key]
        return layer.studio_branch.entries[name].weight(layer.weight, device)

    def composed_layers(self) -> dict[str, ComposedLinear | ComposedConv2d]:
        return dict(self.layers)
