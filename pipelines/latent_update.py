"""Gradient steps on the latents between denoising steps: ``z ← z − α ∇_z L``, through the stock pipeline.

Test-time latent optimisation (Attend-and-Excite, Chefer et al. 2023; CONFORM and CLoRA, Meral et al. 2024/2025)
changes the latents a step starts from by a loss on that step's cross-attention maps. The studio keeps the
diffusers pipelines stock, so the update runs in ``callback_on_step_end`` (the documented seam, which may hand the
pipeline new ``latents``): after step ``s`` the seam replays step ``s``'s denoiser call at the *next* timestep on
the new latents with gradients on (:meth:`~pipelines.seam.DenoiserSeam.replay`), a loss is computed from the
captured maps, and the latents step ``s + 1`` starts from are ``z − α ∇_z L``. The pipeline's own forward of step
``s + 1`` then runs on them. (Doing it inside the wrapped forward instead would leave the scheduler stepping from
the old latents: the pipeline keeps its own ``latents`` variable.)

Only the latents get a gradient: every parameter of the denoiser is frozen for the update
(:func:`frozen_parameters`, restored exactly afterwards), so no parameter gradient is computed or stored; an
out-of-memory error becomes :class:`~pipelines.errors.OutOfMemoryError` naming what to lower.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from .errors import OutOfMemoryError

__all__ = ["frozen_parameters", "gradient_step", "next_step_inputs"]


@contextlib.contextmanager
def frozen_parameters(*modules: nn.Module) -> Iterator[None]:
    """``requires_grad_(False)`` on every parameter of ``modules`` for the body; each flag restored afterwards."""
    saved = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def next_step_inputs(pipe, family_name: str, latents: torch.Tensor, last_call: dict) -> dict:
    """The denoiser arguments the pipeline will pass at its next step for ``latents``, as the stock pipelines build
    them (SDXL: ``[z]·k`` rows for guidance, ``scheduler.scale_model_input``; FLUX: packed latents, ``t / 1000``)."""
    scheduler = pipe.scheduler
    index = scheduler.step_index
    if index is None or index >= len(scheduler.timesteps):
        raise RuntimeError("no next step to update the latents for")
    t = scheduler.timesteps[index]
    if family_name == "sdxl":
        rows = last_call["sample"].shape[0] // latents.shape[0]
        sample = torch.cat([latents] * rows) if rows > 1 else latents
        return {"sample": scheduler.scale_model_input(sample, t), "timestep": t}
    timestep = t.expand(latents.shape[0]).to(latents.dtype) / 1000
    return {"hidden_states": latents, "timestep": timestep}


def gradient_step(seam, plan, latents: torch.Tensor, loss_of: Callable[[], torch.Tensor],
                  step_size: float) -> tuple[torch.Tensor, float]:
    """One ``z − α ∇_z L`` on ``latents``: replay the step's call at the next timestep as ``plan`` (whose
    ``extras["attention_capture"]`` records maps with their graph), ``L = loss_of()``; returns the new latents
    (detached) and ``L``."""
    pipe, denoiser = seam.pipe, seam.denoiser
    try:
        with frozen_parameters(denoiser), torch.enable_grad():
            z = latents.detach().requires_grad_(True)
            seam.replay(plan, **next_step_inputs(pipe, seam.family.name, z, seam.last_call))
            loss = loss_of()
            if not loss.requires_grad:  # nothing to optimise (e.g. no negatives): the latents stay
                return latents, float(loss)
            (grad,) = torch.autograd.grad(loss, z)
    except torch.OutOfMemoryError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise OutOfMemoryError(
            f"out of memory in the latent update (a forward with gradients through {plan.lanes} lanes): lower "
            "max_lanes (--max-lanes), the image size or the number of LoRAs, or turn the update off") from None
    return (latents.detach() - step_size * grad.to(latents.dtype)).detach(), float(loss)
