"""Cached Multi-LoRA (Zou et al. 2025, "Cached Multi-LoRA Composition for Multi-Concept Image Generation", ICLR).

Three parts, each visible below:

1. **Frequency profiling** (Sec. 3): render an image with each LoRA alone, take its grayscale 2-D FFT
   (``fftshift``), the log-magnitude ``log(1 + |F|)``, its radial average profile ``P(r)`` normalised by its
   maximum, and score the LoRA by the mean of the profile's high-frequency part,

       s = mean_{r >= c · r_max} P(r) / max_r P(r)

   with the cut-off ``c`` a fraction of the largest radius (the released code uses r >= 72 of ~362 at 512²,
   i.e. c ≈ 0.2), so the score means the same at any image size. High scores: edges and texture (style,
   character, clothing, object LoRAs); low: smooth structure (backgrounds). Profiles are cached on disk per
   LoRA file hash + model + render settings (:mod:`fusion.disk_cache`).
2. **Ordering**: LoRAs sorted by score, highest first; high-frequency LoRAs lead early, low-frequency ones later.
3. **Dominant-LoRA composite with caching** (Sec. 4): every step is a LoRA-Composite pass over the N active
   LoRAs whose predictions are weighted, not averaged — the dominant LoRA gets ``(N - 1/2) / (2N - 3/2)`` and
   each other LoRA ``1 / (2N - 3/2)`` (weights sum to 1; N=2: 0.6/0.4, N=3: 0.556/0.222/0.222). At *refresh
   steps* the dominant role passes to the next LoRA of the frequency order, and every LoRA runs the whole
   denoiser, refreshing its cache. The non-uniform refresh schedule is: every 2 steps for the first 37.5 % of
   the steps, every 3 up to 87.5 %, every 2 after. Between refresh steps the dominant LoRA still runs the
   whole denoiser, while each other LoRA's replica recomputes only the shallow layers and reuses its deep
   features from its last full pass (DeepCache-style; :mod:`pipelines.feature_cache`: the UNet's deep blocks
   on SDXL, the residual of the deep transformer blocks on FLUX). Those rows really skip the deep blocks.

Differences from the released code (Yqcca/CMLoRA), where we follow the paper:

* in the non-uniform schedule mode the released pipeline passes ``quick_replicate = cache_interval > 1`` with
  ``cache_interval == 0``, so its cache is off and every LoRA runs the full UNet every step; here the cache
  is on by default (``cache=false`` gives the uncached variant, for comparison);
* the released cache-clear ``prv_features_list[1:][i] = None`` assigns into a copy of the list (no effect);
* the online mode slices the radial profile at a fixed radius 80 on a 64² latent, an empty slice (NaN score);
  here the cut-off is a fraction of the image's largest radius, and profiles come from decoded images;
* the released code rotates the dominant LoRA among hard-coded ComposLoRA category names (character, style,
  ... before background); here the rotation follows the measured frequency order, for any LoRA;
* each replica is conditioned on the prompt encoded with only its own LoRA's text-encoder part (as for
  ``composite``).

Profiling renders each LoRA alone (prompt: its trigger words, else its name), seed ``profile_seed``, at the
run's size and guidance, with ``min(profile_steps, steps)`` steps; with ``order=stack`` no profiling happens.
"""

from __future__ import annotations

import bisect

import numpy as np
import torch

from pipelines.errors import StrategyError

from .base import Param, RunContext, StepContext, StepPlan, Strategy
from .disk_cache import DiskCache

# the paper's non-uniform refresh schedule: (end of segment as a fraction of the steps, refresh interval)
REFRESH_SEGMENTS = ((0.375, 2), (0.875, 3), (1.0, 2))


def grayscale(image: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of an ``[H, W, 3]`` image (what PIL's ``convert("L")`` uses)."""
    image = np.asarray(image, dtype=np.float64)
    return image[..., :3] @ np.array([0.299, 0.587, 0.114]) if image.ndim == 3 else image


def radial_profile(gray: np.ndarray) -> np.ndarray:
    """Mean of ``log(1 + |fftshift(fft2(gray))|)`` over integer radii from the spectrum's centre, / its maximum."""
    spectrum = np.log1p(np.abs(np.fft.fftshift(np.fft.fft2(gray))))
    rows, cols = spectrum.shape
    y, x = np.indices(spectrum.shape)
    radius = np.hypot(y - rows // 2, x - cols // 2).astype(int).ravel()
    sums = np.bincount(radius, weights=spectrum.ravel())
    counts = np.bincount(radius)
    profile = sums / np.maximum(counts, 1)
    return profile / profile.max()


def frequency_score(profile: np.ndarray, cutoff: float) -> float:
    """Mean of the normalised profile over radii ``>= cutoff * r_max``."""
    r_max = len(profile) - 1
    start = min(int(np.ceil(cutoff * r_max)), r_max)
    return float(np.mean(profile[start:]))


def refresh_steps(num_steps: int) -> list[int]:
    """Steps at which the dominant LoRA rotates and every LoRA refreshes its deep features."""
    steps, begin = [], 0
    for end_fraction, interval in REFRESH_SEGMENTS:
        end = num_steps if end_fraction >= 1.0 else int(end_fraction * num_steps)
        steps += list(range(begin, end, interval))
        begin = max(begin, end)
    return sorted(set(steps))


def lane_weights(count: int, dominant: int) -> torch.Tensor:
    """``(N - 1/2) / (2N - 3/2)`` for the dominant lane, ``1 / (2N - 3/2)`` for the others."""
    w = torch.full((count,), 1.0 / (2 * count - 1.5))
    w[dominant] = (count - 0.5) / (2 * count - 1.5)
    return w


class CMLoRA(Strategy):
    name = "cmlora"
    summary = "frequency-ordered dominant-LoRA composite; non-dominant LoRAs reuse cached deep features"
    citation = "Zou et al. 2025, Cached Multi-LoRA Composition for Multi-Concept Image Generation (CMLoRA)"
    params = (
        Param("cache", True, "non-dominant LoRAs reuse their deep features between refresh steps", type=bool),
        Param("order", "frequency", "dominant-LoRA order: by measured frequency score, or the stack order",
              type=str, choices=("frequency", "stack")),
        Param("cutoff", 0.2, "high-frequency part of the radial spectrum: radii >= cutoff x largest radius",
              min=0.0, max=1.0),
        Param("profile_steps", 20, "denoising steps of each LoRA's profiling render (at most the run's)",
              type=int, min=1),
        Param("profile_seed", 0, "seed of the profiling renders", type=int, min=0),
    )

    def __init__(self, **values):
        super().__init__(**values)
        self.ranking: list[int] = []
        self.scores: list[float] | None = None
        self._refresh: tuple[int, list[int]] | None = None

    # ------------------------------------------------------------------------------------------ profiling
    def prepare(self, run: RunContext) -> None:
        count = len(run.names)
        self.scores = None
        self.ranking = list(range(count))
        if self.order == "frequency" and count >= 2:
            if run.render is None:
                raise StrategyError("cmlora orders LoRAs by rendering each alone; this context cannot render "
                                    "(use order=stack to skip frequency profiling)")
            self.scores = [frequency_score(self.profile(run, i), self.cutoff) for i in range(count)]
            self.ranking = sorted(range(count), key=lambda i: (-self.scores[i], i))
        self.info["cmlora"] = {"order": [run.names[i] for i in self.ranking],
                               "scores": None if self.scores is None else dict(zip(run.names, self.scores))}

    def profile(self, run: RunContext, index: int) -> np.ndarray:
        """The radial profile of LoRA ``index`` rendered alone (from the disk cache when possible)."""
        name = run.names[index]
        parsed = run.composer.adapters[name].parsed if run.composer is not None else None
        triggers = parsed.info.triggers if parsed is not None else []
        prompt = ", ".join(triggers) if triggers else (parsed.name if parsed is not None else name)
        steps = min(self.profile_steps, run.num_steps)
        weight = float(run.weights[index])
        sha = run.hashes[index] if index < len(run.hashes) else None
        key = {"kind": "cmlora-radial-profile", "version": 1, "lora_sha256": sha, "model": run.model,
               "weight": weight, "prompt": prompt, "steps": steps, "seed": self.profile_seed,
               **{k: run.settings.get(k) for k in ("width", "height", "guidance", "negative_prompt")}}
        cache = DiskCache("cmlora", run.cache_dir)
        if sha is not None and (hit := cache.get(key)) is not None:
            return np.asarray(hit)
        row = torch.zeros(len(run.names))
        row[index] = weight
        image = run.render(row, steps=steps, prompt=prompt, seed=self.profile_seed)
        profile = radial_profile(grayscale(image))
        if sha is not None:
            cache.put(key, profile.tolist())
        return profile

    # ------------------------------------------------------------------------------------------ stepping
    def text_lanes(self, weights: torch.Tensor) -> torch.Tensor:
        return torch.diag(weights)

    def refresh(self, num_steps: int) -> list[int]:
        if self._refresh is None or self._refresh[0] != num_steps:
            self._refresh = (num_steps, refresh_steps(num_steps))
        return self._refresh[1]

    def dominant(self, step: int, num_steps: int, active: list[int]) -> int:
        """The LoRA leading at ``step``: the r-th refresh step hands the role to the r-th LoRA of the order."""
        ranked = [i for i in (self.ranking or active) if i in active] or active
        rotations = bisect.bisect_right(self.refresh(num_steps), step) - 1
        return ranked[rotations % len(ranked)]

    def plan(self, ctx: StepContext) -> StepPlan:
        active = [i for i, w in enumerate(ctx.weights.tolist()) if w != 0.0]
        if not active:
            return StepPlan(gains=torch.zeros(1, len(ctx.weights)), weights=torch.ones(1), text_lanes=[0])
        lead = self.dominant(ctx.step, ctx.num_steps, active)
        weights = lane_weights(len(active), active.index(lead))
        extras = {"dominant": lead}
        if self.cache:
            refreshing = ctx.step in self.refresh(ctx.num_steps)
            extras["feature_cache"] = {"keys": active, "reuse": [not refreshing and i != lead for i in active]}
        return StepPlan(gains=torch.diag(ctx.weights)[active], weights=weights, text_lanes=active, extras=extras)
