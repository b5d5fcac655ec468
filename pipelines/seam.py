"""The denoising-loop seam: run a strategy's *lanes* inside the stock pipeline's denoiser call.

A strategy answers, for every denoising step, with a :class:`StepPlan`: L lanes, each a gain vector over the
loaded adapters, plus the weights that reduce the L lane predictions to one. For the duration of a pipeline
call the seam replaces ``forward`` of ``pipe.unet`` / ``pipe.transformer`` (an instance attribute over the
class's method, or over an offload hook's wrapper, put back on exit) by a wrapper that

* replicates the batch L times (lane-major), gives each lane its own text conditioning when the adapters have
  text-encoder parts, and sets the per-sample denoiser gains in the :class:`MixState`;
* calls the original forward once for all lanes, or once per *chunk* of at most ``max_lanes`` lanes when
  memory is short (see :mod:`pipelines.lane_memory`): each chunk gets its own rows of gains, text conditioning
  and feature-cache plan, so the result is the one-batch result;
* reduces the ``[L·B, ...]`` prediction to ``[B, ...]`` with the plan's weights: a scalar per lane, or a map per
  lane over latent pixels (UNet) or packed tokens (FLUX) for regional composition (see :class:`StepPlan`).

An out-of-memory error inside a lane call halves the chunk size (kept for the rest of the render) and runs the
step again once; a second one raises :class:`~pipelines.errors.OutOfMemoryError` saying what to lower.

So merge is one lane; switch is one lane whose adapter changes with the step; composite is N lanes averaged,
all in **one** batched forward. The pipeline's own loop, scheduler, classifier-free guidance, offloading and
``torch.compile`` are untouched: with guidance, averaging the lanes' conditional and unconditional
predictions before the pipeline applies ``u + s (c - u)`` equals averaging each lane's guided prediction.
The step index comes from ``callback_on_step_end`` (see :meth:`DenoiserSeam.on_step_end`).

Two optional parts of a plan reach deeper: ``block_gains`` (a per-step ``[blocks, N]`` multiplier of the
denoiser blocks, for time-varying block schedules) and ``extras["feature_cache"]`` (``{"keys": [...],
"reuse": [...]}``, one entry per lane: lanes that reuse skip the deep blocks and take cached deep features,
see :mod:`pipelines.feature_cache`). ``extras["attention_capture"]`` (a
:class:`~pipelines.attention_maps.AttentionCapture`) records the step's cross-attention maps without changing the
output; ``extras["between_steps"]`` runs after the step and may hand the pipeline new latents (see
:meth:`DenoiserSeam.on_step_end`, :meth:`DenoiserSeam.replay`). The seam also publishes the denoiser's timestep,
normalised to [0, 1], as ``MixState.timestep`` for timestep-aware layers and gates.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .errors import OutOfMemoryError
from .families import Family
from .feature_cache import DeepFeatureCache, deep_span
from .lane_memory import LaneBudget, execution_device
from .mix_state import MixState


@dataclass
class StepPlan:
    """What to run at one step: ``gains[L, N]`` per lane, ``weights[L]`` to reduce, text lane per lane.

    ``block_gains[blocks, N]`` (optional) multiplies each adapter's gain per denoiser block for this step.
    ``layer_weights[layers, N]`` (optional) multiplies every lane's gains layer by layer (rows are
    :meth:`MixState.layer_id` ids), for strategies that pick adapters per layer (K-LoRA).

    ``weights`` is ``[L]`` (one scalar per lane; may be negative, e.g. Composable Diffusion's 1 − N) or a
    spatial map per lane, normalised to sum to one over the lanes at every position (MultiDiffusion's
    ε = Σ_i M_i ⊙ ε_i): ``[L, H, W]`` over the latent pixels of a UNet's ``[C, H, W]`` prediction, ``[L, tokens]``
    over the packed tokens of a FLUX transformer's ``[tokens, C]`` prediction (2×2 latent patches, row-major).
    """

    gains: torch.Tensor
    weights: torch.Tensor
    text_lanes: list[int] | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    block_gains: torch.Tensor | None = None
    layer_weights: torch.Tensor | None = None

    def __post_init__(self):
        if self.gains.dim() != 2 or self.weights.dim() not in (1, 2, 3) or self.weights.shape[0] != self.gains.shape[0]:
            raise ValueError(f"bad plan: gains {tuple(self.gains.shape)}, weights {tuple(self.weights.shape)}")
        if self.weights.dim() > 1:
            total = self.weights.detach().float().sum(0)
            if not torch.allclose(total, torch.ones_like(total), atol=1e-4):
                raise ValueError(f"bad plan: spatial lane weights must sum to one at every position (they sum to "
                                 f"{float(total.min()):.4g}..{float(total.max()):.4g})")
        if self.layer_weights is not None and (
            self.layer_weights.dim() != 2 or self.layer_weights.shape[1] != self.gains.shape[1]
        ):
            raise ValueError(f"bad plan: layer weights {tuple(self.layer_weights.shape)} for gains "
                             f"{tuple(self.gains.shape)}")
        if self.text_lanes is not None and len(self.text_lanes) != self.gains.shape[0]:
            raise ValueError("one text lane per denoiser lane")
        if self.block_gains is not None and (self.block_gains.dim() != 2
                                             or self.block_gains.shape[1] != self.gains.shape[1]):
            raise ValueError(f"bad plan: block gains {tuple(self.block_gains.shape)} for gains "
                             f"{tuple(self.gains.shape)}")

    @property
    def lanes(self) -> int:
        return self.gains.shape[0]


class LaneConditioning:
    """Text conditioning computed once per text lane; swaps rows of the pipeline's tensors lane by lane.

    ``rows[arg][j]`` stacks every distinct conditioning row of lane j (e.g. prompt and negative prompt). The
    pipeline is handed lane 0's tensors; whatever layout it builds from them (``[neg; pos]`` for SDXL's
    guidance, separate calls for FLUX's true CFG, repeats for several images), each incoming row equals one
    of lane 0's rows, and lane j gets the same row of its own set. Matching by value keeps the seam free of
    assumptions about a pipeline's internal layout.
    """

    def __init__(self, rows: dict[str, list[torch.Tensor]]):
        self.rows = rows
        self._index_cache: dict[tuple, torch.Tensor] = {}

    def _row_index(self, arg: str, value: torch.Tensor) -> torch.Tensor:
        key = (arg, value.data_ptr(), tuple(value.shape))
        index = self._index_cache.get(key)
        if index is None:
            reference = self.rows[arg][0].to(value.device, value.dtype)
            found = []
            for row in value:
                hits = [k for k in range(reference.shape[0]) if torch.equal(row, reference[k])]
                if not hits:
                    raise RuntimeError(
                        f"the denoiser received '{arg}' rows that were not precomputed for the lanes "
                        "(custom prompt embeddings are not supported together with per-lane text conditioning)"
                    )
                found.append(hits[0])
            index = torch.tensor(found, dtype=torch.long)
            self._index_cache[key] = index
        return index

    def substitute(self, arg: str, value: torch.Tensor, lanes: list[int]) -> torch.Tensor:
        index = self._row_index(arg, value)
        parts = [self.rows[arg][j].to(value.device, value.dtype)[index] for j in lanes]
        return torch.cat(parts, dim=0)


def _get(kwargs: dict, dotted: str):
    head, _, rest = dotted.partition(".")
    value = kwargs.get(head)
    if rest:
        return None if not isinstance(value, dict) else value.get(rest)
    return value


def _set(kwargs: dict, dotted: str, value) -> None:
    head, _, rest = dotted.partition(".")
    if rest:
        kwargs[head] = {**kwargs[head], rest: value}
    else:
        kwargs[head] = value


class DenoiserSeam:
    """Context manager that routes ``family.denoiser`` calls of ``pipe`` through ``plan_for_step``.

    ``max_lanes``: at most this many lanes per denoiser call (an int >= 1), ``"auto"`` (default: from the
    device's free memory, see :class:`~pipelines.lane_memory.LaneBudget`) or ``None`` (all lanes at once).
    """

    def __init__(
        self,
        pipe,
        family: Family,
        state: MixState,
        plan_for_step: Callable[[int], StepPlan],
        conditioning: LaneConditioning | None = None,
        max_lanes: int | str | None = "auto",
    ):
        self.pipe = pipe
        self.family = family
        self.state = state
        self.plan_for_step = plan_for_step
        self.conditioning = conditioning
        self.step = 0
        self.plans: dict[int, StepPlan] = {}
        self.calls = 0
        self.chunk_calls = 0  # calls of the original forward (one per chunk)
        self.oom_retries = 0
        self._saved_gains = None
        self._saved_forward = None
        self.feature_cache: DeepFeatureCache | None = None
        self.denoiser: nn.Module = getattr(pipe, family.denoiser)
        self.budget = LaneBudget(max_lanes, execution_device(pipe, self.denoiser))
        self._signature = inspect.signature(type(self.denoiser).forward)
        self._original: Callable | None = None
        self.last_call: dict | None = None
        self._last_call_step: int | None = None

    # -------------------------------------------------------------------------------------------- plumbing
    def __enter__(self) -> "DenoiserSeam":
        denoiser = self.denoiser
        self._saved_gains = self.state.denoiser_gains.clone()
        # an instance attribute (an offload hook's or a compiled forward) is called through and put back;
        # otherwise the class's method is, and deleting our attribute uncovers it again
        self._saved_forward = denoiser.__dict__.get("forward")
        self._original = denoiser.forward
        denoiser.forward = self._forward
        return self

    def __exit__(self, *exc) -> None:
        denoiser = self.denoiser
        if self._saved_forward is not None:
            denoiser.forward = self._saved_forward
        else:
            denoiser.__dict__.pop("forward", None)
        self._original = self._saved_forward = None
        self.last_call = self._last_call_step = None
        if self.feature_cache is not None:
            self.feature_cache.remove()
        self.state.set_gains(denoiser=self._saved_gains)
        self.state.set_step_block_weights(None)
        self.state.set_layer_weights(None)
        self.state.timestep = None

    def on_step_end(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        """Use as (part of) ``callback_on_step_end``: advances the step the next plan is made for.

        A plan may carry ``extras["between_steps"]``, a callable ``(seam, pipe, callback_kwargs) -> dict`` run after
        its step; what it returns (e.g. ``{"latents": ...}``) goes back to the pipeline as the callback's output."""
        self.step = step + 1
        plan = self.plans.get(step)
        hook = None if plan is None else plan.extras.get("between_steps")
        return dict(hook(self, pipe, callback_kwargs) or {}) if hook is not None else {}

    def plan(self, step: int) -> StepPlan:
        plan = self.plan_for_step(step) if step not in self.plans else self.plans[step]
        self.plans[step] = plan
        return plan

    # -------------------------------------------------------------------------------------------- the call
    def _forward(self, *args, **kwargs):
        """The denoiser's forward while the seam is open: lanes in, one reduced prediction out."""
        plan = self.plan(self.step)
        self.calls += 1
        bound = self._signature.bind_partial(self.denoiser, *args, **kwargs).arguments
        bound.pop(next(iter(bound)))  # self
        if self._last_call_step != self.step:  # the step's first call (FLUX true CFG: the positive prompt's)
            self.last_call, self._last_call_step = dict(bound), self.step  # what :meth:`replay` repeats
        return self._run_plan(plan, bound)

    def replay(self, plan: StepPlan, **changes):
        """The latest step's first denoiser call again with ``changes`` (e.g. new ``sample``/``hidden_states`` and
        ``timestep``), run as ``plan``'s lanes: for strategies that change the latents between steps (CLoRA's
        latent update, called from :meth:`on_step_end`). Runs with whatever grad mode the caller set."""
        if self.last_call is None:
            raise RuntimeError("replay needs a denoiser call of this render first")
        return self._run_plan(plan, {**self.last_call, **changes})

    def _run_plan(self, plan: StepPlan, bound: dict):
        capture = plan.extras.get("attention_capture")  # pipelines.attention_maps.AttentionCapture
        if capture is None:
            return self._run_bound(plan, bound)
        with capture.recording(self.denoiser):
            return self._run_bound(plan, bound)

    def _run_bound(self, plan: StepPlan, bound: dict):
        self.state.set_layer_weights(plan.layer_weights)
        self.state.set_step_block_weights(plan.block_gains)
        batch = _get(bound, self.family.batched_args[0]).shape[0]
        substitute = self.conditioning is not None and plan.text_lanes is not None
        self._plan_feature_cache(plan, batch)
        if plan.lanes == 1 and not substitute:
            # one gain row per sample, as in lane calls: the gains' shape follows the batch, not the strategy
            self.state.set_gains(denoiser=plan.gains.expand(batch, -1).contiguous())
            self._publish_timestep(bound, batch)
            self.chunk_calls += 1
            return self._original(**bound)  # keywords, as in lane calls: a compiled forward sees one convention
        size = self.budget.lanes_per_call(plan.lanes, batch)
        try:
            return self._run_lanes(bound, plan, batch, size, substitute)
        except torch.OutOfMemoryError:
            pass  # leave the except block first: its traceback holds the failed call's tensors
        self._release_memory()
        smaller = self.budget.after_out_of_memory(size)
        if smaller is None:
            raise self._out_of_memory(plan.lanes, batch, size)
        self.oom_retries += 1
        try:
            return self._run_lanes(bound, plan, batch, smaller, substitute)
        except torch.OutOfMemoryError:
            pass
        self._release_memory()
        raise self._out_of_memory(plan.lanes, batch, smaller)

    def _run_lanes(self, bound: dict, plan: StepPlan, batch: int, size: int, substitute: bool):
        """Every lane of ``plan`` through the original forward, ``size`` lanes per call; then the reduce."""
        outputs = []
        for start in range(0, plan.lanes, size):
            chunk = list(range(start, min(start + size, plan.lanes)))
            new = dict(bound)
            for name in self.family.batched_args:
                value = _get(bound, name)
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch and len(chunk) > 1:
                    _set(new, name, torch.cat([value] * len(chunk), dim=0))
                elif isinstance(value, (tuple, list)) and value and len(chunk) > 1 and all(
                        isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch for v in value):
                    # per-block tensors (ControlNet residuals): each replicated like a batched tensor
                    _set(new, name, type(value)(torch.cat([v] * len(chunk), dim=0) for v in value))
            if substitute:
                lanes_text = [plan.text_lanes[j] for j in chunk]
                for name in self.family.text_args:
                    value = _get(bound, name)
                    if isinstance(value, torch.Tensor):
                        _set(new, name, self.conditioning.substitute(name, value, lanes_text))
            self.state.set_gains(denoiser=plan.gains[chunk].repeat_interleave(batch, dim=0))
            self._publish_timestep(new, batch * len(chunk))
            if self.feature_cache is not None and self.feature_cache.active:
                self.feature_cache.select(chunk)
            self.chunk_calls += 1
            with self.budget.observe(len(chunk)):
                outputs.append(self._original(**new))
        return _reduce(outputs, plan.lanes, batch, plan.weights, tokens_first=self.family.name == "flux")

    def _release_memory(self) -> None:
        if self.feature_cache is not None:
            self.feature_cache.abort()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _out_of_memory(self, lanes: int, batch: int, size: int) -> OutOfMemoryError:
        return OutOfMemoryError(
            f"out of memory running {lanes} lanes of {batch} sample(s) each, {size} lane(s) per denoiser call "
            f"(after halving once); lower max_lanes (--max-lanes, now {self.budget.describe()}), the image size "
            "or the number of LoRAs, or use offload=True (--offload)"
        )

    def _publish_timestep(self, arguments: dict, rows: int) -> None:
        t = arguments.get("timestep")
        if not isinstance(t, torch.Tensor):
            self.state.timestep = None if t is None else torch.full((1,), float(t) * self.family.timestep_scale)
            return
        t = t.detach().float().reshape(-1) * self.family.timestep_scale
        self.state.timestep = t if t.numel() in (1, rows) else t[:1]

    def _plan_feature_cache(self, plan: StepPlan, batch: int) -> None:
        request = plan.extras.get("feature_cache")
        if request is None or plan.lanes == 1:
            if self.feature_cache is not None:
                self.feature_cache.pause()
            return
        if len(request["keys"]) != plan.lanes:
            raise ValueError(f"feature cache request names {len(request['keys'])} lanes, the plan has {plan.lanes}")
        if self.feature_cache is None:
            self.feature_cache = DeepFeatureCache(deep_span(self.denoiser, self.family.name), self.state).install()
        self.feature_cache.begin(self.step, batch, request["keys"], request["reuse"])


def _reduce(outputs: list, lanes: int, batch: int, weights: torch.Tensor, tokens_first: bool = False):
    """Concatenate the chunks' predictions (``[L·B, ...]`` in all) and sum the lanes with ``weights``.

    ``weights`` is ``[L]`` or a spatial map per lane (see :class:`StepPlan`): ``[L, H, W]`` broadcast over the
    channels of ``[C, H, W]`` predictions, or, with ``tokens_first`` (FLUX), ``[L, tokens]`` over ``[tokens, C]``.
    A single lane (one lane with its own text conditioning) is returned as is, whatever its weight."""
    if lanes == 1:
        return outputs[0]

    def main(output) -> torch.Tensor:
        if isinstance(output, tuple):
            return output[0]
        return output.sample if hasattr(output, "sample") else output

    x = torch.cat([main(o) for o in outputs], dim=0) if len(outputs) > 1 else main(outputs[0])
    x = x.view(lanes, batch, *x.shape[1:])
    w = weights.to(device=x.device, dtype=x.dtype)
    sample, spatial = tuple(x.shape[2:]), tuple(w.shape[1:])
    if tokens_first and spatial:
        if sample[:len(spatial)] != spatial:
            raise ValueError(f"lane weight map {spatial} does not fit the prediction's tokens {sample}")
        w = w.view(lanes, 1, *spatial, *[1] * (len(sample) - len(spatial)))
    else:
        if spatial and sample[len(sample) - len(spatial):] != spatial:
            raise ValueError(f"lane weight map {spatial} does not fit the prediction's latent grid {sample}")
        w = w.view(lanes, *[1] * (x.dim() - 1 - len(spatial)), *spatial)
    reduced = (x * w).sum(0)
    first = outputs[0]
    if isinstance(first, tuple):
        return (reduced, *first[1:])
    if hasattr(first, "sample"):
        first.sample = reduced
        return first
    return reduced
