"""A small resumable training loop: seeded steps, periodic atomic checkpoints, a progress bar.

A session's commands can stop at any time; every stage of the world build checkpoints its modules,
optimizer and step every ``every`` steps (and at the end), and picks up from the last checkpoint when run again.
Because batches are a function of (seed, step) (see :mod:`.data`), a resumed run reproduces an uninterrupted one.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_model, save_model
from torch import nn
from tqdm.auto import tqdm


_DEVICE = torch.device("cpu")


def set_device(name: str) -> torch.device:
    """Where every stage trains (``cpu``, ``cuda``, ``cuda:1``...). Batches are drawn from CPU generators either
    way, so a GPU build sees the same data, noise and timesteps as a CPU one."""
    global _DEVICE
    _DEVICE = torch.device(name)
    if _DEVICE.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return _DEVICE


def device() -> torch.device:
    return _DEVICE


def _atomic_save(obj_writer: Callable[[Path], None], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    obj_writer(tmp)
    os.replace(tmp, path)


class Checkpoint:
    def __init__(self, folder: Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer):
        self.folder = Path(folder)
        self.modules = modules
        self.optimizer = optimizer

    @property
    def done_marker(self) -> Path:
        return self.folder / "DONE"

    def load(self) -> int:
        state_path = self.folder / "state.pt"
        if not state_path.exists():
            return 0
        for name, module in self.modules.items():
            load_model(module, str(self.folder / f"{name}.safetensors"))
        state = torch.load(state_path, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        return int(state["step"])

    def save(self, step: int) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for name, module in self.modules.items():  # save_model handles tied weights (T5's shared embedding)
            _atomic_save(lambda p, m=module: save_model(m, str(p)), self.folder / f"{name}.safetensors")
        _atomic_save(lambda p: torch.save({"optimizer": self.optimizer.state_dict(), "step": step}, p),
                     self.folder / "state.pt")


def cosine_lr(optimizer: torch.optim.Optimizer, base_lr: float, step: int, total: int, warmup: int = 100) -> None:
    if step < warmup:
        lr = base_lr * (step + 1) / warmup
    else:
        lr = base_lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def train(
    name: str,
    checkpoint: Checkpoint,
    total_steps: int,
    step_fn: Callable[[int], float],
    *,
    lr: float,
    every: int = 200,
    warmup: int = 100,
) -> None:
    """Run ``step_fn(step) -> loss`` from the last checkpoint to ``total_steps``."""
    if checkpoint.done_marker.exists():
        checkpoint.load()
        return
    start = checkpoint.load()
    bar = tqdm(total=total_steps, initial=start, desc=name, mininterval=5, dynamic_ncols=True)
    ema = None
    for step in range(start, total_steps):
        cosine_lr(checkpoint.optimizer, lr, step, total_steps, warmup)
        loss = step_fn(step)
        ema = loss if ema is None else 0.98 * ema + 0.02 * loss
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.4f}")
        if (step + 1) % every == 0 or step + 1 == total_steps:
            checkpoint.save(step + 1)
    bar.close()
    checkpoint.done_marker.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.done_marker.write_text(str(total_steps))


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on embeddings, norms and biases: unseen tokens keep their (random) identity."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if param.dim() < 2 or "embed" in name or "norm" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
