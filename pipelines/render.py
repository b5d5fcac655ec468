"""One call of the stock pipeline with a stack of adapters and a step planner.

This is the only place that calls ``pipe(...)`` for the studio. It activates the stack in the mix state,
prepares per-lane text conditioning when the planner needs it, and runs the pipeline inside a
:class:`DenoiserSeam`, chaining the seam's step counter with the caller's ``callback_on_step_end``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import torch

from .composer import Composer
from .conditioning import encode_lanes
from .errors import StudioError
from .modes import CONTROLNET_MODES, fit_call, mode_of, mode_pipeline, schedule_offset
from .seam import DenoiserSeam, StepPlan


def needs_cfg(pipe, family_name: str, guidance_scale: float, negative_prompt: str | None, true_cfg_scale: float) -> bool:
    if family_name == "sdxl":
        return guidance_scale > 1.0 and pipe.unet.config.time_cond_proj_dim is None
    return bool(negative_prompt) and true_cfg_scale > 1.0


def run_pipeline(
    composer: Composer,
    *,
    stack: list[str],
    plan_for_step: Callable[[int], StepPlan],
    text_lanes: torch.Tensor,
    prompt: str,
    negative_prompt: str | None,
    num_inference_steps: int,
    guidance_scale: float,
    width: int,
    height: int,
    generator: torch.Generator,
    output_type: str = "pil",
    callback: Callable[[int, int, dict], None] | None = None,
    pipeline_kwargs: dict[str, Any] | None = None,
    seam_factory: Callable[..., DenoiserSeam] = DenoiserSeam,
    max_lanes: int | str | None = "auto",
    lane_prompts: list[str] | None = None,
):
    """Render one prompt; ``plan_for_step`` and ``text_lanes`` are in the state's column space ([·, N]).

    ``max_lanes`` caps the lanes per denoiser call (see :mod:`pipelines.lane_memory`); it never changes the image.

    Mode inputs in ``pipeline_kwargs`` (``image``, ``mask_image``, ``strength``) choose the stock pipeline that
    runs the loop (:mod:`pipelines.modes`); step ``s`` of its loop is step ``s + begin_index`` of the
    ``num_inference_steps`` schedule that ``plan_for_step`` addresses.

    ``lane_prompts`` (one per row of ``text_lanes``) gives text lanes prompts of their own (regional lanes);
    the pipeline's progress bar and recipe still show ``prompt``.
    """
    family, state = composer.family, composer.state
    extra = dict(pipeline_kwargs or {})
    mode = mode_of(extra)
    pipe = mode_pipeline(composer.pipe, family, mode, extra.pop("controlnet", None))
    true_cfg = float(extra.get("true_cfg_scale", 1.0))
    do_cfg = needs_cfg(pipe, family.name, guidance_scale, negative_prompt, true_cfg)
    state.set_active(stack)
    saved_text = state.text_gains.clone()
    text_stack = [n for n in stack if n in composer.text_part_names()]
    conditioning = None
    call: dict[str, Any] = {}
    own_prompts = lane_prompts is not None and len(set(lane_prompts)) > 1
    if lane_prompts is not None and len(lane_prompts) != text_lanes.shape[0]:
        raise StudioError(f"{len(lane_prompts)} lane prompts for {text_lanes.shape[0]} text lanes")
    if text_lanes.shape[0] > 1 and own_prompts and mode in CONTROLNET_MODES:
        raise StudioError("ControlNet with lanes of their own prompts (regional prompts) is not supported: the "
                          "ControlNet runs once per step with one text conditioning")
    if text_lanes.shape[0] > 1 and text_stack and mode in CONTROLNET_MODES:
        raise StudioError(
            "ControlNet with lanes of their own text conditioning (LoRAs with text-encoder parts: "
            f"{', '.join(text_stack)}) is not supported: the ControlNet runs once per step with one text "
            "conditioning. Use merge, or these LoRAs without their text-encoder parts (blocks 'te=0')")
    if text_lanes.shape[0] > 1 and (text_stack or own_prompts):
        call, conditioning = encode_lanes(
            pipe, family, state, text_lanes, prompt=prompt, negative_prompt=negative_prompt, do_cfg=do_cfg,
            max_sequence_length=extra.get("max_sequence_length"), prompts=lane_prompts if own_prompts else None,
        )
    else:
        state.set_gains(text=text_lanes[:1])
        call["prompt"] = lane_prompts[0] if lane_prompts else prompt
        if negative_prompt and (family.name == "sdxl" or do_cfg):
            call["negative_prompt"] = negative_prompt
    offset: list[int] = []  # read at the first denoiser call, once the pipeline has set its schedule

    def plan_in_schedule(step: int) -> StepPlan:
        if not offset:
            offset.append(schedule_offset(pipe))
        plan = plan_for_step(step + offset[0])
        if mode in CONTROLNET_MODES and "feature_cache" in plan.extras:  # ControlNet residuals enter the skipped blocks
            plan = replace(plan, extras={k: v for k, v in plan.extras.items() if k != "feature_cache"})
        return plan

    seam = seam_factory(pipe, family, state, plan_in_schedule, conditioning, max_lanes=max_lanes)

    def on_step_end(p, step, timestep, callback_kwargs):
        changed = seam.on_step_end(p, step, timestep, callback_kwargs)  # e.g. latents a strategy updated
        if callback is not None:
            callback(step, num_inference_steps, {**callback_kwargs, **changed})
        return changed

    call.update(
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        width=width,
        height=height,
        generator=generator,
        output_type=output_type,
        callback_on_step_end=on_step_end,
        callback_on_step_end_tensor_inputs=["latents"],
    )
    call.update(extra)
    call = fit_call(pipe, call)
    try:
        with seam, torch.no_grad():
            output = pipe(**call)
    finally:
        state.set_gains(text=saved_text)
    return output, seam
