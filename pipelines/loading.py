"""Loading SDXL and FLUX.1 pipelines from a built-in name, a Hub id, a local folder or a single file.

* ``tiny-sdxl`` / ``tiny-flux``: the trained offline world from the shipped assets (:mod:`pipelines.assets`;
  missing files are an error); ``tiny-sdxl-random`` / ``tiny-flux-random``: seeded random weights
  (:mod:`pipelines.tiny`);
* a Hub id (``stabilityai/stable-diffusion-xl-base-1.0``, ``black-forest-labs/FLUX.1-dev``) or a local
  diffusers folder: ``DiffusionPipeline.from_pretrained``;
* a quantized folder written by ``studio quantize`` (``studio_quant.json``, see :mod:`pipelines.quant.storage`):
  its 4-bit denoiser inside the base model's pipeline;
* a single ``.safetensors`` checkpoint: an all-in-one SDXL file through
  ``StableDiffusionXLPipeline.from_single_file``; a FLUX transformer file (BFL or diffusers layout) through
  ``FluxTransformer2DModel.from_single_file``, with the other components from ``config`` (a Hub id or folder,
  by default the FLUX.1 repo matching the file).

Device and dtype: CUDA gets bfloat16 where supported (else float16), the CPU float32. ``offload=True`` calls
diffusers' ``enable_model_cpu_offload`` (only meaningful with an accelerator).
"""

from __future__ import annotations

import json
import logging
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from .assets import asset_path
from .errors import ModelLoadError
from .families import FAMILIES, FLUX, SDXL, Family
from .quant.storage import is_quantized_folder, load_quantized_pipeline, read_info
from .safetensors_io import PICKLE_SUFFIXES, check_safetensors_file
from .tiny import TINY_BUILDERS

log = logging.getLogger(__name__)

DEFAULT_MODEL = "tiny-sdxl"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def pick_device(device: str | torch.device | None = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def pick_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is not None:
        try:
            return _DTYPES[dtype.lower()]
        except KeyError:
            raise ModelLoadError(f"unknown dtype '{dtype}'; use one of {', '.join(_DTYPES)}") from None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def family_of(pipe) -> Family:
    import diffusers

    if isinstance(pipe, diffusers.StableDiffusionXLPipeline):
        return SDXL
    if isinstance(pipe, diffusers.FluxPipeline):
        return FLUX
    raise ModelLoadError(
        f"{type(pipe).__name__} is not supported; the studio composes LoRAs on StableDiffusionXLPipeline and "
        "FluxPipeline models"
    )


def sniff_single_file(path: Path) -> str:
    """``"sdxl"`` or ``"flux"`` from the tensor names of a single-file checkpoint (header only)."""
    header = check_safetensors_file(path)
    keys = [k for k in header if k != "__metadata__"]
    joined = "\n".join(keys[:5000])
    if "double_blocks." in joined or "single_transformer_blocks." in joined or "single_blocks." in joined:
        return "flux"
    if "conditioner.embedders.1" in joined or "add_embedding." in joined or "label_emb." in joined:
        return "sdxl"
    raise ModelLoadError(f"{path}: cannot tell which model this checkpoint holds (neither SDXL nor FLUX.1 keys)")


def model_defaults(model: str) -> dict:
    """Generation defaults a model folder ships in ``studio_defaults.json`` (size, steps, guidance, ...)."""
    folder = _trained_folder(model) if model in TINY_BUILDERS else Path(model).expanduser()
    if folder is None:
        return {}
    path = folder / "studio_defaults.json"
    if folder.is_dir() and path.exists():
        return json.loads(path.read_text())
    return {}


def _trained_folder(name: str) -> Path | None:
    """The shipped folder of a built-in world model; ``None`` for the seeded random ``*-random`` models.

    ``tiny-sdxl`` / ``tiny-flux`` are the trained world: when their files are missing this is a
    :class:`~pipelines.assets.MissingAssetError`, never a silent switch to the random model."""
    if name.endswith("-random"):
        return None
    return asset_path("models", name, "model_index.json", what=f"{name} model").parent


def _builtin(name: str, dtype: torch.dtype, components: dict | None = None):
    trained = _trained_folder(name)
    if trained is not None:
        import diffusers

        return diffusers.DiffusionPipeline.from_pretrained(str(trained), dtype=dtype, **(components or {}))
    pipe = TINY_BUILDERS[name]()
    for key, component in (components or {}).items():
        setattr(pipe, key, component)
    if dtype != torch.float32:
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                component.to(dtype=dtype)
    return pipe


def _from_pretrained(source: str, dtype: torch.dtype, components: dict | None = None):
    import diffusers

    path = Path(source)
    if path.exists() and path.is_dir() and not (path / "model_index.json").exists():
        raise ModelLoadError(f"{source}: a folder without model_index.json is not a diffusers pipeline")
    if path.exists() and path.is_dir():
        index = json.loads((path / "model_index.json").read_text())
        if index.get("_class_name") not in ("StableDiffusionXLPipeline", "FluxPipeline"):
            raise ModelLoadError(f"{source}: {index.get('_class_name')} is not an SDXL or FLUX.1 pipeline")
    try:
        return diffusers.DiffusionPipeline.from_pretrained(source, dtype=dtype, **(components or {}))
    except (OSError, ValueError) as e:
        hint = " (no network? pass a local folder or a single file)" if not path.exists() else ""
        raise ModelLoadError(f"cannot load '{source}'{hint}: {e}") from None


def _from_single_file(path: Path, dtype: torch.dtype, config: str | None, components: dict | None = None):
    import diffusers

    kind = sniff_single_file(path)
    components = dict(components or {})
    try:
        if kind == "sdxl":
            extra = {"config": config} if config else {}
            return diffusers.StableDiffusionXLPipeline.from_single_file(str(path), dtype=dtype, **extra,
                                                                       **components)
        repo = config or "black-forest-labs/FLUX.1-dev"
        transformer = components.pop("transformer", None)
        if transformer is None:
            transformer = diffusers.FluxTransformer2DModel.from_single_file(
                str(path), config=repo, subfolder="transformer", dtype=dtype
            )
        return diffusers.FluxPipeline.from_pretrained(repo, transformer=transformer, dtype=dtype)
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"cannot load single file {path} as {kind.upper()}: {e}. Pass --config with a local diffusers folder "
            "(or Hub id) of the matching model for the components the file does not hold."
        ) from None


def _load(model: str, dtype: torch.dtype, config: str | None, components: dict | None = None):
    """The pipeline of a built-in name, single file, folder or Hub id (``components`` replace loaded ones)."""
    path = Path(model).expanduser()
    if model in TINY_BUILDERS:
        return _builtin(model, dtype, components)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelLoadError(f"{model}: pickle checkpoints can run code when opened; use a .safetensors file")
    if path.is_file():
        return _from_single_file(path, dtype, config, components)
    return _from_pretrained(model, dtype, components)


def base_model_name(model: str) -> str:
    """``model`` itself, or for a quantized folder the base model it was made from."""
    if is_quantized_folder(Path(model).expanduser()):
        return str(read_info(Path(model).expanduser())["base"])
    return model


@contextmanager
def _loading_bars_only_on_a_terminal():
    """diffusers' "Loading pipeline components" and transformers' "Loading weights" bars, written into a log file
    or CI output, are many lines of carriage-return noise: switch them off while loading when stderr is not a
    terminal, and put both libraries' setting back afterwards."""
    if sys.stderr.isatty():
        yield
        return
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    was = [(lib, lib.is_progress_bar_enabled()) for lib in (diffusers_logging, transformers_logging)]
    for lib, _ in was:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, enabled in was:
            if enabled:
                lib.enable_progress_bar()


def load_pipeline(
    model: str = DEFAULT_MODEL,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    offload: bool = False,
    config: str | None = None,
):
    """Load ``model`` and return ``(pipe, family)``; the pipeline is the stock diffusers object."""
    device = pick_device(device)
    torch_dtype = pick_dtype(device, dtype)
    path = Path(model).expanduser()
    with _loading_bars_only_on_a_terminal():
        if is_quantized_folder(path):
            pipe = load_quantized_pipeline(path, torch_dtype,
                                           lambda base, parts: _load(base, torch_dtype, config, parts))
        else:
            pipe = _load(model, torch_dtype, config)
    family = family_of(pipe)
    if offload and device.type != "cpu":
        pipe.enable_model_cpu_offload(device=device)
    else:
        if offload:
            log.warning("model CPU offload needs an accelerator; running on %s without it", device)
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, family


__all__ = ["DEFAULT_MODEL", "FAMILIES", "family_of", "load_pipeline", "pick_device", "pick_dtype"]
