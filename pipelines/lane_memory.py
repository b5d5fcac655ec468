"""How many lanes one denoiser call may run: the ``max_lanes`` setting and its ``auto`` budget.

Lane strategies (composite, cmlora, ...) multiply the denoiser batch by the number of lanes L (and by 2 with
classifier-free guidance): composite with 5 LoRAs on SDXL at 1024² runs a batch of 10 where merge runs 2. The
seam (:mod:`pipelines.seam`) therefore runs lanes in chunks of at most :meth:`LaneBudget.lanes_per_call` lanes,
with the same result as one batch.

``max_lanes`` is an int >= 1 (a fixed cap), ``None`` (every lane in one call) or ``"auto"``:

* on a CUDA device, the first lane call of a render runs one lane alone and measures its activation peak
  (``torch.cuda.max_memory_allocated`` above what was allocated before the call); every later call runs as
  many lanes as ``HEADROOM`` of the free device memory (free plus what the caching allocator holds unused)
  fits at that per-lane cost;
* on the CPU (and other devices) ``auto`` means every lane in one call: host memory is not probed, set an
  int to cap it.

After an out-of-memory error the seam asks :meth:`LaneBudget.after_out_of_memory` for a smaller chunk (half,
kept as a cap for the rest of the render) and retries the step once.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .errors import StudioError

HEADROOM = 0.8  # share of the free device memory the lanes of one call may take


def parse_max_lanes(value: int | str | None) -> int | str | None:
    """Check a ``max_lanes`` setting: an int >= 1, ``"auto"``, ``"all"``/``None`` (no cap), or such a string."""
    if value is None or value == "auto":
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("auto", "all", "none"):
            return None if text in ("all", "none") else "auto"
        try:
            value = int(text)
        except ValueError:
            raise StudioError(f"max_lanes must be a whole number >= 1, 'auto' or 'all'; got '{value}'") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise StudioError(f"max_lanes must be a whole number >= 1, 'auto' or 'all'; got {value!r}")
    return value


def fitting_lanes(free_bytes: int, per_lane_bytes: float, lanes: int, headroom: float = HEADROOM) -> int:
    """How many of ``lanes`` fit in ``headroom · free_bytes`` at ``per_lane_bytes`` each (at least 1)."""
    if per_lane_bytes <= 0:
        return lanes
    return max(1, min(lanes, int(headroom * free_bytes // per_lane_bytes)))


class LaneBudget:
    """The chunk size of lane calls on one denoiser, for one render (one seam)."""

    def __init__(self, max_lanes: int | str | None, device: torch.device | str):
        self.setting = parse_max_lanes(max_lanes)
        self.cap: int | None = self.setting if isinstance(self.setting, int) else None
        self.device = torch.device(device)
        self.per_lane_bytes: float | None = None
        self._measure = False

    @property
    def probes_memory(self) -> bool:
        return self.setting == "auto" and self.device.type == "cuda"

    def describe(self) -> str:
        if self.setting is None:
            return "all"
        return str(self.setting)

    def lanes_per_call(self, lanes: int, batch: int) -> int:
        """The number of lanes (of ``batch`` rows each) the next denoiser call runs together."""
        size = lanes if self.cap is None else min(lanes, self.cap)
        if not self.probes_memory:
            return size
        if self.per_lane_bytes is None:
            self._measure = True
            return 1
        free, _ = torch.cuda.mem_get_info(self.device)
        unused = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        return fitting_lanes(free + unused, self.per_lane_bytes, size)

    @contextlib.contextmanager
    def observe(self, lanes: int) -> Iterator[None]:
        """Around one lane call: measures the per-lane activation peak when ``auto`` still needs it."""
        if not (self._measure and self.probes_memory):
            yield
            return
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        yield
        peak = torch.cuda.max_memory_allocated(self.device) - before
        self.per_lane_bytes = max(float(peak), 1.0) / lanes
        self._measure = False

    def after_out_of_memory(self, size: int) -> int | None:
        """The chunk size to retry with after ``size`` lanes per call ran out of memory (None: give up)."""
        self._measure = False
        if size <= 1:
            return None
        self.cap = size // 2
        return self.cap


def execution_device(pipe, denoiser: nn.Module) -> torch.device:
    """Where the denoiser runs: the pipeline's execution device (offloading moves it there per call)."""
    device = getattr(pipe, "_execution_device", None)
    if device is not None:
        return torch.device(device)
    for tensor in denoiser.parameters():
        return tensor.device
    return torch.device("cpu")
