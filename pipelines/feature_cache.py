"""Deep-feature caching per lane: some lanes of a batched denoiser call skip the deep blocks.

DeepCache (Ma et al. 2024) observes that the deep, low-resolution part of a diffusion denoiser changes slowly
from one step to the next, so a step may recompute only the shallow layers and reuse the deep features of an
earlier step. With lanes (one replica of the batch per LoRA, see :mod:`pipelines.seam`) the decision is per
lane: a strategy marks, at every call, which lanes *reuse* and which recompute; this module makes the reusing
rows of the batch skip the deep blocks and take their cached features, while the other rows run them.

The deep part is a contiguous *span* of the denoiser's blocks, entered and left once per forward:

* SDXL UNet: ``down_blocks[1:]``, ``mid_block`` and ``up_blocks[:-1]``; the cached feature is the output of
  ``up_blocks[-2]`` (the input of the last up block), as in DeepCache. Shallow: ``conv_in``, ``down_blocks[0]``,
  ``up_blocks[-1]``, ``conv_out`` (and the time embedding).
* FLUX transformer: ``transformer_blocks[1:]`` and ``single_transformer_blocks[:-1]``; the cached quantity is
  the span's *residual* (output minus input, for image and text tokens), which is added to the fresh input of
  the span. Shallow: the embedders, the first dual-stream block, the last single-stream block and the head.

Mechanism (no copy of any diffusers forward): forward pre-hooks on every block of the span slice the
per-sample arguments (hidden states, time embedding, text states, skip connections) to the rows that
recompute, and the mix state's per-sample gains with them; a forward hook on the span's last block stores the
fresh features per lane and splices the cached ones back in for the reusing rows, so everything after the span
sees the full batch again. The deep blocks therefore really run on fewer rows, which is where the time goes.
The cache lives for one pipeline call and is keyed by (lane key, call index within the step), so pipelines
that call the denoiser twice per step (FLUX true CFG) keep separate entries. Extra residual inputs from
ControlNet or T2I adapters inside the span are not supported together with the cache.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Hashable, Sequence

import torch
from torch import nn

from .mix_state import MixState

SDXL_BATCHED = frozenset({"hidden_states", "temb", "encoder_hidden_states", "res_hidden_states_tuple",
                          "attention_mask", "encoder_attention_mask"})
FLUX_BATCHED = frozenset({"hidden_states", "encoder_hidden_states", "temb"})


@dataclass(frozen=True)
class DeepSpan:
    """Blocks run in this order once per forward; ``carried`` names the span's input(s) its output replaces."""

    modules: tuple[nn.Module, ...]
    carried: tuple[str, ...]  # entry argument names, in the order of the last block's outputs
    residual: bool  # cache output - input (True) or the output itself
    batched: frozenset[str]  # per-sample arguments of the blocks


def deep_span(denoiser: nn.Module, family_name: str, shallow: int = 1) -> DeepSpan:
    """The deep part of ``denoiser``: everything but ``shallow`` blocks at each end."""
    if family_name == "sdxl":
        modules = (*denoiser.down_blocks[shallow:], denoiser.mid_block, *denoiser.up_blocks[:-shallow])
        span = DeepSpan(tuple(modules), ("hidden_states",), residual=False, batched=SDXL_BATCHED)
    elif family_name == "flux":
        singles = denoiser.single_transformer_blocks
        modules = (*denoiser.transformer_blocks[shallow:], *singles[: len(singles) - shallow])
        span = DeepSpan(tuple(modules), ("encoder_hidden_states", "hidden_states"), residual=True,
                        batched=FLUX_BATCHED)
    else:
        raise ValueError(f"no deep span defined for model family '{family_name}'")
    if not span.modules:
        raise ValueError(f"this {family_name} denoiser is too shallow to cache deep features")
    return span


@dataclass
class _Call:
    """One denoiser call: which lanes recompute the span (``live``) and which take cached features."""

    index: int
    batch: int  # rows per lane
    keys: list[Hashable]
    live: list[int]  # lanes that run the deep blocks
    rows: torch.Tensor | None  # their rows in the full batch; None when every lane runs them
    entry: tuple[torch.Tensor, ...] = ()
    saved: tuple = ()
    stats: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return len(self.keys) * self.batch


class DeepFeatureCache:
    """Per-lane deep-feature cache on a denoiser's :class:`DeepSpan` (see the module docstring).

    Call :meth:`begin` before each denoiser call (the seam does, from ``StepPlan.extras["feature_cache"]``)
    and :meth:`pause` for calls that must run uncached. ``skipped_rows`` counts the rows that skipped the span.
    """

    def __init__(self, span: DeepSpan, state: MixState):
        self.span = span
        self.state = state
        self.store: dict[tuple[Hashable, int], tuple[torch.Tensor, ...]] = {}
        self.call: _Call | None = None
        self.skipped_rows = 0
        self.computed_rows = 0
        self._handles: list = []
        self._signatures = {id(m): inspect.signature(m.forward) for m in span.modules}
        self._step = None
        self._call_index = 0

    # ------------------------------------------------------------------------------------------ lifecycle
    def install(self) -> "DeepFeatureCache":
        if not self._handles:
            for module in self.span.modules:
                self._handles.append(module.register_forward_pre_hook(self._pre, with_kwargs=True))
            self._handles.append(self.span.modules[-1].register_forward_hook(self._post))
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.store.clear()
        self.call = None

    def pause(self) -> None:
        """The next denoiser call runs every block on every row and leaves the cache untouched."""
        self.call = None

    def begin(self, step: int, batch: int, keys: Sequence[Hashable], reuse: Sequence[bool]) -> None:
        """Plan the next denoiser call: ``len(keys)`` lanes of ``batch`` rows; lane j reuses if ``reuse[j]``.

        A lane reuses only when its cache entry exists; at least one lane always runs the span.
        """
        if len(keys) != len(reuse):
            raise ValueError("one reuse flag per lane key")
        self._call_index = self._call_index + 1 if step == self._step else 0
        self._step = step
        index = self._call_index
        live = [j for j, key in enumerate(keys) if not (reuse[j] and (key, index) in self.store)]
        if not live:
            live = [0]
        rows = None
        if len(live) < len(keys):
            rows = torch.cat([torch.arange(j * batch, (j + 1) * batch) for j in live])
        self.call = _Call(index=index, batch=batch, keys=list(keys), live=live, rows=rows)

    # ------------------------------------------------------------------------------------------ hooks
    def _pre(self, module, args, kwargs):
        call = self.call
        if call is None:
            return None
        first = module is self.span.modules[0]
        if call.rows is None and not (first and self.span.residual):
            return None
        bound = self._signatures[id(module)].bind(*args, **kwargs)
        if first:
            call.entry = tuple(bound.arguments[name] for name in self.span.carried)
            if call.rows is not None:
                self._narrow_state(call)
        if call.rows is None:
            return None
        for name in self.span.batched & bound.arguments.keys():
            bound.arguments[name] = self._take(bound.arguments[name], call)
        return bound.args, bound.kwargs

    def _post(self, module, args, output):
        call = self.call
        if call is None:
            return None
        outputs = output if isinstance(output, tuple) else (output,)
        if len(outputs) != len(self.span.carried):
            raise RuntimeError(f"deep span ends in a block with {len(outputs)} outputs, expected "
                               f"{len(self.span.carried)}")
        b = call.batch
        for position, lane in enumerate(call.live):
            fresh = tuple(o[position * b:(position + 1) * b] for o in outputs)
            if self.span.residual:
                fresh = tuple(f - e[lane * b:(lane + 1) * b] for f, e in zip(fresh, call.entry))
            self.store[(call.keys[lane], call.index)] = tuple(f.detach() for f in fresh)
        self.computed_rows += len(call.live) * b
        if call.rows is None:
            return None
        self.skipped_rows += call.total - len(call.live) * b
        self._restore_state(call)
        full = []
        for k, out in enumerate(outputs):
            pieces = []
            for lane, key in enumerate(call.keys):
                if lane in call.live:
                    position = call.live.index(lane)
                    pieces.append(out[position * b:(position + 1) * b])
                else:
                    cached = self.store[(key, call.index)][k]
                    pieces.append(cached + call.entry[k][lane * b:(lane + 1) * b] if self.span.residual else cached)
            full.append(torch.cat(pieces, dim=0))
        return tuple(full) if isinstance(output, tuple) else full[0]

    # ------------------------------------------------------------------------------------------ helpers
    @staticmethod
    def _take(value, call: _Call):
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == call.total:
            return value.index_select(0, call.rows.to(value.device))
        if isinstance(value, tuple):
            return tuple(DeepFeatureCache._take(v, call) for v in value)
        return value

    def _narrow_state(self, call: _Call) -> None:
        state = self.state
        call.saved = (state.denoiser_gains, state.timestep)
        if state.denoiser_gains.shape[0] == call.total:
            state.set_gains(denoiser=state.denoiser_gains[call.rows])
        if state.timestep is not None and state.timestep.shape[0] == call.total:
            state.timestep = state.timestep[call.rows.to(state.timestep.device)]

    def _restore_state(self, call: _Call) -> None:
        gains, timestep = call.saved
        self.state.set_gains(denoiser=gains)
        self.state.timestep = timestep
