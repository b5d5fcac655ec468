"""Fine-grained gated fusion (AutoLoRA, Li et al. 2025, arXiv 2508.02107): per-layer, per-timestep LoRA weights.

Every LoRA's contribution to the denoiser is multiplied by a gate that depends on where (layer or block) and
when (denoising progress) it acts. Two kinds of gates:

* **learned** (the paper, Sec. 3.3, :mod:`fusion.gates`): per linear layer, token and channel,

      g_i = σ(LN(o_i) ⊙ w_lora + (LN(h_base) ⊙ LN(o_i)) ⊙ w_cross + b + W_t φ(t)),
      h = h_base + Σ_i w_out ⊙ g_i ⊙ o_i,

  trained per stack with ``studio train-gates`` (model frozen; loss Eq. 9: MSE to the concept's target plus a
  hinge ``max(0, 0.5 − MSE)`` under another concept's prompt) and saved beside the stack. The timestep term
  ``W_t φ(t)`` is ours: the released code hands the timestep to the gate and ignores it.
* **schedule** (training-free, :mod:`fusion.block_schedule`): the gain of LoRA i in block b at progress p is
  ``G_i(b, p)`` from a user-editable table over blocks × progress (presets: ``subject-deep-early`` puts the
  subject in the deep blocks early and the style in the outer blocks late; ``b-lora`` separates them statically;
  ``flat`` is merge). The layer computes ``W x + Σ_i G_i(b, p) · w_i · s_i B_i A_i x``.

``mode=auto`` uses learned gates when ``studio train-gates`` wrote them for this stack and model, else the
schedule. ``roles`` names each LoRA's role in stack order (default: the first is the ``subject``, the others
``style``); a schedule table may also be keyed by a LoRA's name or stack index. One denoiser pass per step,
every LoRA at its weight (as merge), with its gains shaped by the gate.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipelines.errors import StrategyError, StudioError

from .base import Param, RunContext, StepContext, StepPlan, Strategy
from .block_schedule import BlockSchedule, BoundSchedule
from .gates import GateSet, gates_path, stack_digest


class Gated(Strategy):
    name = "gated"
    summary = "per-block, per-step LoRA gains: learned AutoLoRA gates or a training-free block x time schedule"
    citation = "Li et al. 2025, AutoLoRA: Automatic LoRA Retrieval and Fine-Grained Gated Fusion (arXiv 2508.02107)"
    params = (
        Param("mode", "auto", "learned gates, a block x time schedule, or learned when trained for this stack",
              type=str, choices=("auto", "learned", "schedule")),
        Param("schedule", "subject-deep-early", "preset (subject-deep-early, b-lora, flat) or a TOML file", type=str),
        Param("roles", "", "role per LoRA in stack order, comma-separated (default: subject, then style)", type=str),
        Param("gates", "", "learned gates file (default: the one `studio train-gates` wrote beside the stack)",
              type=str),
    )

    def __init__(self, **values):
        super().__init__(**values)
        self.gate_set: GateSet | None = None
        self.table: BoundSchedule | None = None
        self.used = ""

    def prepare(self, run: RunContext) -> None:
        self.gate_set, self.table = None, None
        if not run.names:
            return
        path = self._gates_file(run)
        if self.mode == "learned" or (self.mode == "auto" and path is not None and path.exists()):
            if path is None or not path.exists():
                raise StrategyError(f"no learned gates for this stack ({path or 'in-memory LoRAs'}); train them "
                                    "with `studio train-gates` or use mode=schedule")
            self.gate_set = GateSet.load(path, run.composer, run.names)
            expected = stack_digest(run.model, run.hashes)
            if self.gate_set.metadata.get("digest") != expected:
                raise StrategyError(f"{path}: gates were trained for another stack or model "
                                    f"(digest {self.gate_set.metadata.get('digest')}, this stack {expected})")
            denoiser = getattr(run.composer.pipe, run.composer.family.denoiser)
            self.gate_set.to(next(denoiser.parameters()).device)
            self.gate_set.attach(run.composer)
            self.used = f"learned gates {path.name}"
            self.info["gated"] = {"used": self.used}
            return
        roles = self._roles(len(run.names))
        candidates = [[name, str(k), role] for k, (name, role) in enumerate(zip(run.names, roles))]
        self.table = BlockSchedule.load(self.schedule).bind(run.family, run.composer.state.blocks, candidates)
        self.used = f"schedule {self.schedule}"
        self.info["gated"] = {"used": self.used}

    def finish(self, run: RunContext) -> None:
        if self.gate_set is not None:
            self.gate_set.detach()

    def plan(self, ctx: StepContext) -> StepPlan:
        plan = StepPlan(gains=ctx.weights[None].clone(), weights=torch.ones(1), text_lanes=[0])
        if self.table is not None:
            plan.block_gains = self.table.gains(ctx.progress)
        return plan

    # ------------------------------------------------------------------------------------------ helpers
    def _roles(self, count: int) -> list[str]:
        if not self.roles.strip():
            return ["subject"] + ["style"] * (count - 1)
        roles = [r.strip() for r in self.roles.split(",")]
        if len(roles) != count or not all(roles):
            raise StrategyError(f"roles '{self.roles}' names {len(roles)} role(s) for a stack of {count} LoRA(s)")
        return roles

    def _gates_file(self, run: RunContext) -> Path | None:
        if self.gates:
            return Path(self.gates).expanduser()
        try:
            return gates_path([run.composer.adapters[n].parsed.source for n in run.names], run.model, run.hashes)
        except StudioError:
            return None
