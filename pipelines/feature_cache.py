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
that call the denoiser twice per step (FLUX true CFG) keep separate entries. When the seam runs the lanes in
chunks (``max_lanes``), :meth:`DeepFeatureCache.begin` decides once per denoiser call which lanes reuse and
:meth:`DeepFeatureCache.select` hands each chunk its part of that decision; a chunk in which every lane reuses
does not run the deep blocks at all (they return stand-ins and the last one the cached features). Extra residual inputs from
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
    # per module, for calls in which every lane reuses (the blocks do not run at all): None -> the block hands
    # on its carried inputs; n -> it returns (hidden_states, n skip connections), like an SDXL down block
    skip_connections: tuple[int | None, ...] = ()

    def stand_in(self, index: int, arguments: dict):
        """What module ``index`` returns when skipped: placeholders of the right structure (the span's last
        output is replaced by the cached features, and the placeholder skip connections only reach the span's
        own up blocks, which are skipped too)."""
        n = self.skip_connections[index] if self.skip_connections else None
        carried = tuple(arguments[name] for name in self.carried)
        if n is not None:
            return carried[0], (carried[0],) * n
        return carried if len(carried) > 1 else carried[0]


def deep_span(denoiser: nn.Module, family_name: str, shallow: int = 1) -> DeepSpan:
    """The deep part of ``denoiser``: everything but ``shallow`` blocks at each end."""
    if family_name == "sdxl":
        downs = denoiser.down_blocks[shallow:]
        modules = (*downs, denoiser.mid_block, *denoiser.up_blocks[:-shallow])
        skips = tuple(len(b.resnets) + len(getattr(b, "downsamplers", None) or ()) for b in downs)
        span = DeepSpan(tuple(modules), ("hidden_states",), residual=False, batched=SDXL_BATCHED,
                        skip_connections=skips + (None,) * (len(modules) - len(downs)))
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
    """One denoiser call (one chunk of lanes): which lanes recompute the span and which take cached features."""

    index: int
    batch: int  # rows per lane
    keys: list[Hashable]  # the lanes of this call
    live: list[int]  # lanes that run the deep blocks
    rows: torch.Tensor | None  # their rows in the full batch; None when every lane runs them
    skip: bool = False  # no lane runs the span: its blocks are not run at all
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
        self._forwards: list = []  # the span modules' own instance ``forward`` (None: the class's), put back
        self._signatures = {id(m): inspect.signature(m.forward) for m in span.modules}
        self._step = None
        self._call_index = 0
        self._plan: tuple | None = None  # (call index, rows per lane, keys, reused per lane) of the next call

    # ------------------------------------------------------------------------------------------ lifecycle
    def install(self) -> "DeepFeatureCache":
        if not self._handles:
            for index, module in enumerate(self.span.modules):
                self._handles.append(module.register_forward_pre_hook(self._pre, with_kwargs=True))
                self._forwards.append(module.__dict__.get("forward"))
                module.forward = self._skippable(index, module, module.forward)
            self._handles.append(self.span.modules[-1].register_forward_hook(self._post))
        return self

    def _skippable(self, index: int, module: nn.Module, forward):
        """``module``'s forward, or its stand-in during a call in which no lane runs the span."""
        signature = self._signatures[id(module)]

        def run(*args, **kwargs):
            if self.call is not None and self.call.skip:
                return self.span.stand_in(index, signature.bind(*args, **kwargs).arguments)
            return forward(*args, **kwargs)

        return run

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for module, saved in zip(self.span.modules, self._forwards):
            if saved is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = saved
        self._handles = []
        self._forwards = []
        self.store.clear()
        self.call = None
        self._plan = None

    def pause(self) -> None:
        """The next denoiser call runs every block on every row and leaves the cache untouched."""
        self.call = None
        self._plan = None

    @property
    def active(self) -> bool:
        """Whether the next denoiser call is planned (after :meth:`begin`, until :meth:`pause`)."""
        return self._plan is not None

    def begin(self, step: int, batch: int, keys: Sequence[Hashable], reuse: Sequence[bool]) -> None:
        """Plan the next denoiser call: ``len(keys)`` lanes of ``batch`` rows; lane j reuses if ``reuse[j]``.

        A lane reuses only when its cache entry exists. The plan covers every lane; when the seam runs the lanes
        in chunks it calls :meth:`select` before each chunk (``begin`` selects all lanes, one call).
        """
        if len(keys) != len(reuse):
            raise ValueError("one reuse flag per lane key")
        self._call_index = self._call_index + 1 if step == self._step else 0
        self._step = step
        index = self._call_index
        reused = [bool(reuse[j]) and (key, index) in self.store for j, key in enumerate(keys)]
        self._plan = (index, batch, list(keys), reused)
        self.select(range(len(keys)))

    def select(self, lanes: Sequence[int]) -> None:
        """The next denoiser call runs only ``lanes`` (positions in :meth:`begin`'s keys), in that order.

        In a call in which every lane reuses (e.g. a chunk without the lane that refreshes), the span's blocks do
        not run at all: each returns a stand-in (:meth:`DeepSpan.stand_in`) and the last one the cached features.
        """
        index, batch, keys, reused = self._plan
        lanes = list(lanes)
        live = [p for p, j in enumerate(lanes) if not reused[j]]
        rows = None
        if live and len(live) < len(lanes):
            rows = torch.cat([torch.arange(p * batch, (p + 1) * batch) for p in live])
        self.call = _Call(index=index, batch=batch, keys=[keys[j] for j in lanes], live=live, rows=rows,
                          skip=not live)

    def abort(self) -> None:
        """After a failed call (e.g. out of memory): undo a narrowed mix state; the plan stays for a retry."""
        call = self.call
        if call is not None and call.saved:
            self._restore_state(call)
            call.saved = ()

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
        if call.rows is None and not call.skip:
            return None
        self.skipped_rows += call.total - len(call.live) * b
        if call.rows is not None:
            self._restore_state(call)
            call.saved = ()
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
