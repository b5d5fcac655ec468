"""Calibration: run the real pipeline on a few prompts and steps and record what each target layer sees.

For every layer the recorder keeps the per-input-channel ``max|X_j|`` over all tokens of all calls (the
smoothing statistic) and a uniform random sample of token rows (for the per-layer α search, which compares
output errors). Sampling is priority sampling: every row gets a seeded random key and the rows with the
largest keys are kept, which is a uniform sample without replacement over everything seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from ..assets import asset_path

DEFAULT_PROMPTS_FILE = ("prompts", "calibration.txt")  # inside the shipped assets (pipelines.assets)


@dataclass
class LayerStats:
    amax: torch.Tensor  # [in] float32, max |X_j| over every token seen
    sample: torch.Tensor | None  # [n, in] float32 token rows (n <= samples per layer)
    tokens: int = 0


class ActivationRecorder:
    """Forward pre-hooks on ``modules`` that collect :class:`LayerStats` (a context manager)."""

    def __init__(self, modules: dict[str, nn.Module], samples_per_layer: int = 256, seed: int = 0):
        self.modules = modules
        self.samples_per_layer = samples_per_layer
        self.generator = torch.Generator().manual_seed(seed)
        self.amax: dict[str, torch.Tensor] = {}
        self.rows: dict[str, torch.Tensor] = {}
        self.keys: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self._handles = []

    def _record(self, name: str, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1])
        amax = flat.abs().amax(dim=0).float()
        self.amax[name] = amax if name not in self.amax else torch.maximum(self.amax[name], amax)
        self.tokens[name] = self.tokens.get(name, 0) + flat.shape[0]
        k = self.samples_per_layer
        if k <= 0:
            return
        keys = torch.rand(flat.shape[0], generator=self.generator)
        if flat.shape[0] > k:
            keys, idx = keys.topk(k)
            flat = flat[idx.to(flat.device)]
        rows = flat.float().cpu()
        if name in self.rows:
            keys = torch.cat([self.keys[name], keys])
            rows = torch.cat([self.rows[name], rows])
            if keys.shape[0] > k:
                keys, idx = keys.topk(k)
                rows = rows[idx]
        self.keys[name], self.rows[name] = keys, rows

    def __enter__(self) -> "ActivationRecorder":
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(
                lambda m, args, name=name: self._record(name, args[0])))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def stats(self) -> dict[str, LayerStats]:
        return {name: LayerStats(amax=self.amax[name].cpu(), sample=self.rows.get(name), tokens=self.tokens[name])
                for name in self.amax}


def read_prompts(path: str | Path | None) -> list[str]:
    """Prompts from a text file, one per line (blank lines and ``#`` comments skipped)."""
    from ..errors import StudioError

    path = Path(path) if path else asset_path(*DEFAULT_PROMPTS_FILE, what="calibration prompts")
    if not path.is_file():
        raise StudioError(f"{path}: calibration prompt file not found")
    prompts = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise StudioError(f"{path}: no prompts in the calibration file")
    return prompts


def calibrate(composer, modules: dict[str, nn.Module], prompts: Sequence[str], *, steps: int, width: int,
              height: int, guidance: float, seed: int = 0, samples_per_layer: int = 256,
              on_step: Callable[[int, int, dict], None] | None = None) -> dict[str, LayerStats]:
    """Render every prompt for ``steps`` steps with the stock pipeline and return each layer's statistics."""
    from ..render import run_pipeline
    from ..seam import StepPlan

    state = composer.state
    device = composer.pipe._execution_device
    empty = torch.zeros(1, len(state.names))
    with ActivationRecorder(modules, samples_per_layer, seed) as recorder:
        for i, prompt in enumerate(prompts):
            run_pipeline(
                composer, stack=[], text_lanes=empty, prompt=prompt, negative_prompt=None,
                plan_for_step=lambda step: StepPlan(gains=empty, weights=torch.ones(1), text_lanes=[0]),
                num_inference_steps=steps, guidance_scale=guidance, width=width, height=height,
                generator=torch.Generator(device.type).manual_seed(seed + i), output_type="latent",
                callback=on_step,
            )
    return recorder.stats()
