"""``torch.compile`` for a denoiser with composed layers, without recompiling when the mix changes.

:class:`CompiledDenoiser` replaces the denoiser's ``forward`` by ``torch.compile(forward)`` (an instance
attribute, so the seam of :mod:`pipelines.seam` wraps it like any forward and the lanes, chunks and reduce stay
outside the graph). What strategies change between steps and renders reaches the graph as *tensors* of fixed
shape, never as Python numbers that Dynamo would specialise on:

* adapter weights, switch's one-hot rows, step windows, block gains and layer weights are the mix state's gain
  tensors ``[G, N]`` (new values, same shapes: no recompile);
* packing the active adapters into the concatenated branch (Python bookkeeping, ``MixState.pack_version``)
  runs *before* each compiled call, outside the graph (:func:`pack_layers`); inside it the layers only read the
  packed tensors. A stack with another total rank gives new tensor shapes: Dynamo compiles once more and then
  marks those sizes dynamic;
* the seam always calls the denoiser with keyword arguments, so a lane call and a one-lane call look alike.

A batch of another size (composite's L lanes, classifier-free guidance on or off) is a new shape; Dynamo's
automatic dynamic shapes compile it once more and then treat the batch size as symbolic.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .composed import AdapterBranch
from .errors import StudioError


def pack_layers(denoiser: nn.Module) -> int:
    """Pack every composed layer of ``denoiser`` for the active adapters (cheap when nothing changed)."""
    model_dtype = next((p.dtype for p in denoiser.parameters() if p.is_floating_point()), torch.float32)
    packed = 0
    for layer in denoiser.modules():
        branch = getattr(layer, "studio_branch", None)
        if not isinstance(branch, AdapterBranch):
            continue
        weight = layer.__dict__.get("_parameters", {}).get("weight")  # QuantLinear's weight is computed: skip it
        reference = weight if isinstance(weight, torch.Tensor) and weight.is_floating_point() else None
        device = reference.device if reference is not None else next(layer.buffers()).device
        branch.pack(layer, device, reference.dtype if reference is not None else model_dtype)
        packed += 1
    return packed


class CompiledDenoiser:
    """Compiles ``denoiser.forward`` in place; :meth:`remove` puts the eager forward back."""

    def __init__(self, denoiser: nn.Module, backend: Any = "inductor", **options: Any):
        self.denoiser = denoiser
        self.backend = backend
        self._saved = denoiser.__dict__.get("forward")
        self._eager = denoiser.forward
        self._compiled = torch.compile(self._eager, backend=backend, **options)
        denoiser.forward = self.forward

    def forward(self, *args, **kwargs):
        pack_layers(self.denoiser)
        return self._compiled(*args, **kwargs)

    def remove(self) -> None:
        if self._saved is None:
            self.denoiser.__dict__.pop("forward", None)
        else:
            self.denoiser.forward = self._saved


def compile_backend(setting: bool | str | None) -> str | None:
    """Check ``Studio(compile=...)`` before anything loads: False/None -> None; True -> ``"inductor"``; a string
    must name a ``torch.compile`` backend (e.g. ``"aot_eager"``, ``"cudagraphs"``)."""
    if setting is False or setting is None:
        return None
    if setting is True:
        return "inductor"
    if isinstance(setting, str) and setting in torch._dynamo.list_backends(exclude_tags=()):
        return setting
    raise StudioError(f"compile must be True, False or a torch.compile backend "
                      f"({', '.join(torch._dynamo.list_backends())}, ...); got {setting!r}")
