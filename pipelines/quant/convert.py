"""End to end: load a model, calibrate on real renders, quantize its denoiser, write the quantized folder."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..composer import Composer
from ..errors import ModelLoadError, StudioError
from .calibrate import calibrate
from .quantizer import QuantConfig, QuantResult, quantize_denoiser
from .runtime import DEFAULT_RUNTIME, check_runtime, describe, plan
from .storage import is_quantized_folder, save_quantized
from .targets import plan_targets


@dataclass
class Calibration:
    """What the calibration renders: prompts, steps, image size (None: the model's default), guidance."""

    prompts: Sequence[str]
    steps: int = 4
    size: int | None = None
    guidance: float | None = None
    seed: int = 0
    samples_per_layer: int = 256

    def to_json(self) -> dict:
        return {"prompts": list(self.prompts), "steps": self.steps, "size": self.size, "guidance": self.guidance,
                "seed": self.seed, "samples_per_layer": self.samples_per_layer}


def quantize_pipeline(pipe, family, config: QuantConfig, calibration: Calibration | None, *,
                      default_size: int = 1024,
                      on_step: Callable[[int, int, dict], None] | None = None,
                      on_layer: Callable[[int, int, str], None] | None = None) -> QuantResult:
    """Calibrate ``pipe`` (unless ``calibration`` is None) and quantize its denoiser in place."""
    denoiser = getattr(pipe, family.denoiser)
    targets, _ = plan_targets(denoiser, family.name, group_size=config.group_size, rank=config.rank,
                              method=config.method)
    stats = None
    if calibration is not None and config.method == "svdquant":
        modules = {t.path: denoiser.get_submodule(t.path) for t in targets}
        size = calibration.size or default_size
        guidance = family.default_guidance if calibration.guidance is None else calibration.guidance
        stats = calibrate(Composer(pipe, family), modules, calibration.prompts, steps=calibration.steps,
                          width=size, height=size, guidance=guidance, seed=calibration.seed,
                          samples_per_layer=calibration.samples_per_layer, on_step=on_step)
    with torch.no_grad():
        return quantize_denoiser(denoiser, family.name, config, stats, on_layer=on_layer)


def convert(model: str, out_dir: str | Path, config: QuantConfig, calibration: Calibration | None, *,
            device: str | None = None, dtype: str | None = None, model_config: str | None = None,
            runtime: str = DEFAULT_RUNTIME,
            on_step: Callable[[int, int, dict], None] | None = None,
            on_layer: Callable[[int, int, str], None] | None = None) -> tuple[QuantResult, Path]:
    """``studio quantize``: quantize ``model``'s denoiser and write the folder ``out_dir`` (``runtime``: the
    runtime loading the folder selects by default, see :mod:`.runtime`)."""
    from ..loading import load_pipeline
    from ..tiny import TINY_BUILDERS, TINY_IMAGE_SIZE

    try:
        check_runtime(runtime)
    except ValueError as e:
        raise StudioError(str(e)) from None
    out = Path(out_dir).expanduser()
    if is_quantized_folder(Path(model).expanduser()):
        raise ModelLoadError(f"{model}: already quantized; quantize the 16-bit base model instead")
    if out.exists() and any(out.iterdir()) and not is_quantized_folder(out):
        raise StudioError(f"{out}: exists and is not empty; choose a new folder (a quantized folder is overwritten)")
    pipe, family = load_pipeline(model, device=device, dtype=dtype, config=model_config)
    base = model
    local = Path(model).expanduser()
    if model not in TINY_BUILDERS and local.exists():
        base = str(local.resolve())
    if model in TINY_BUILDERS:
        default_size = TINY_IMAGE_SIZE
    elif family.name == "sdxl":
        default_size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    else:
        default_size = 1024
    t0 = time.perf_counter()
    result = quantize_pipeline(pipe, family, config, calibration, default_size=default_size, on_step=on_step,
                               on_layer=on_layer)
    denoiser = getattr(pipe, family.denoiser)
    try:
        result.runtime = describe(plan(denoiser, runtime), runtime) + " on this machine"
    except RuntimeError as e:  # recorded anyway: the folder may be rendered on another machine
        result.runtime = f"runtime {runtime} recorded, but not on this machine: {e}"
    calib = calibration.to_json() if calibration is not None else {}
    calib["seconds"] = round(time.perf_counter() - t0, 2)
    save_quantized(out, denoiser, family=family.name, denoiser_name=family.denoiser, base=base,
                   quant=config.to_json(), layers={k: v.to_json() for k, v in result.layers.items()},
                   skipped=result.skipped, calibration=calib, storage_dtype=config.storage_dtype, runtime=runtime)
    return result, out
