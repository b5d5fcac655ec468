"""The quantized-model folder: write it, recognise it, load it back into the stock pipeline.

Layout (``studio quantize MODEL --out DIR``)::

    DIR/studio_quant.json                     what this is: base model, family, quantization settings, one entry
                                              per quantized layer (shape, mode, rank, α, errors), skipped layers,
                                              the files with their sizes and SHA-256, the default runtime
    DIR/denoiser/config.json                  the denoiser's diffusers config
    DIR/denoiser/model.safetensors            the whole denoiser: packed INT4/NVFP4 residuals (``qweight``),
                                              scale bits (``wscales``, ``wscale_global``), ``smooth`` (λ), the
                                              branch (``lora_down``, ``lora_up``), biases, and every layer that
                                              stays 16-bit

The other components (text encoders, VAE, tokenizers, scheduler) come from the base model named in
``studio_quant.json`` (a built-in name, a Hub id, a diffusers folder or a single file), so the folder holds
only what quantization changed. Loading builds the denoiser from its config on the ``meta`` device, puts
:class:`QuantLinear` shells where the JSON says, checks every tensor name, shape and dtype against the file
before assigning, and hands the denoiser to the base model's loader. Problems raise :class:`ModelLoadError`
naming the file and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import LoraFileError, ModelLoadError
from ..safetensors_io import check_safetensors_file
from .linear import QuantLinear
from .runtime import DEFAULT_RUNTIME, check_runtime

QUANT_FILE = "studio_quant.json"
DENOISER_DIR = "denoiser"
WEIGHTS_FILE = f"{DENOISER_DIR}/model.safetensors"
CONFIG_FILE = f"{DENOISER_DIR}/config.json"
FORMAT_NAME = "studio-svdquant"
FORMAT_VERSION = 1


def is_quantized_folder(path: str | Path) -> bool:
    """A folder written by ``studio quantize`` (or one that lost its ``studio_quant.json`` but kept the rest)."""
    path = Path(path)
    return path.is_dir() and ((path / QUANT_FILE).is_file() or (path / WEIGHTS_FILE).is_file())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------- writing
def save_quantized(out_dir: str | Path, denoiser: nn.Module, *, family: str, denoiser_name: str, base: str,
                   quant: dict, layers: dict[str, dict], skipped: dict[str, str],
                   calibration: dict | None = None, storage_dtype: torch.dtype = torch.bfloat16,
                   runtime: str = DEFAULT_RUNTIME) -> Path:
    """Write the folder for ``denoiser`` (whose target layers are already :class:`QuantLinear`); ``runtime`` is
    the runtime loading selects unless told otherwise."""
    from ..atomic_files import save_safetensors

    out = Path(out_dir)
    (out / DENOISER_DIR).mkdir(parents=True, exist_ok=True)
    state = {}
    for key, value in denoiser.state_dict().items():
        if value.is_floating_point():  # 16-bit layers, biases, λ and the branch (4-bit codes and scale bits are ints)
            value = value.to(storage_dtype)
        state[key] = value.detach().cpu().contiguous()
    save_safetensors(state, out / WEIGHTS_FILE, {"format": "pt", "studio": FORMAT_NAME})
    denoiser.save_config(str(out / DENOISER_DIR))
    specs = {name: m.spec() for name, m in denoiser.named_modules() if isinstance(m, QuantLinear)}
    files = {}
    for rel in (WEIGHTS_FILE, CONFIG_FILE):
        path = out / rel
        files[rel] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    info = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "family": family, "denoiser": denoiser_name,
        "denoiser_class": type(denoiser).__name__, "base": base, "quantization": quant,
        "calibration": calibration or {}, "files": files, "runtime": check_runtime(runtime),
        "layers": {name: {**specs[name], **layers.get(name, {})} for name in specs},
        "skipped": skipped,
    }
    (out / QUANT_FILE).write_text(json.dumps(info, indent=1), encoding="utf-8")
    return out


# ------------------------------------------------------------------------------------------------- reading
def read_info(folder: str | Path) -> dict:
    """``studio_quant.json`` of ``folder``, checked for the fields loading needs."""
    path = Path(folder) / QUANT_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: missing, so the quantized model in {folder} cannot be loaded "
                             "(re-run `studio quantize`)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT_NAME:
        raise ModelLoadError(f"{path}: not a studio quantized-model description (format '{FORMAT_NAME}' expected)")
    if info.get("version") != FORMAT_VERSION:
        raise ModelLoadError(f"{path}: version {info.get('version')} is not supported (this studio reads {FORMAT_VERSION})")
    for field in ("family", "denoiser", "base", "layers", "files"):
        if field not in info:
            raise ModelLoadError(f"{path}: the field '{field}' is missing")
    return info


def _check_files(folder: Path, info: dict, verify_hash: bool) -> None:
    for rel in (WEIGHTS_FILE, CONFIG_FILE):
        path = folder / rel
        record = info["files"].get(rel)
        if not path.is_file():
            raise ModelLoadError(f"{path}: missing (the quantized model folder is incomplete)")
        if record is None:
            raise ModelLoadError(f"{folder / QUANT_FILE}: does not list {rel}")
        size = path.stat().st_size
        if size != record.get("bytes"):
            raise ModelLoadError(
                f"{path}: {size} bytes, but {QUANT_FILE} records {record.get('bytes')}: the file was replaced, "
                "truncated or belongs to another quantization")
        if verify_hash and _sha256(path) != record.get("sha256"):
            raise ModelLoadError(f"{path}: SHA-256 differs from the one recorded in {QUANT_FILE}")


def _build_denoiser(folder: Path, info: dict) -> nn.Module:
    import diffusers
    from accelerate import init_empty_weights

    config_path = folder / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{config_path}: not valid JSON ({e})") from None
    cls_name = config.get("_class_name")
    if cls_name != info.get("denoiser_class") or not hasattr(diffusers, cls_name or ""):
        raise ModelLoadError(f"{config_path}: class '{cls_name}' does not match {QUANT_FILE} "
                             f"('{info.get('denoiser_class')}')")
    with init_empty_weights():
        model = getattr(diffusers, cls_name).from_config(config)
    for path, spec in info["layers"].items():
        parent_path, _, child = path.rpartition(".")
        try:
            parent = model.get_submodule(parent_path) if parent_path else model
            old = getattr(parent, child)
        except AttributeError:
            raise ModelLoadError(f"{folder / QUANT_FILE}: layer '{path}' does not exist in {cls_name}") from None
        if not isinstance(old, nn.Linear) or (old.in_features, old.out_features) != (spec["in"], spec["out"]):
            raise ModelLoadError(f"{folder / QUANT_FILE}: layer '{path}' is recorded as {spec['in']}->{spec['out']} "
                                 f"but the model config has {type(old).__name__} {getattr(old, 'in_features', '?')}"
                                 f"->{getattr(old, 'out_features', '?')}")
        try:
            setattr(parent, child, QuantLinear.from_spec(spec, device="meta"))
        except (KeyError, ValueError) as e:
            raise ModelLoadError(f"{folder / QUANT_FILE}: bad entry for layer '{path}': {e}") from None
    return model


def _load_state(folder: Path, model: nn.Module) -> None:
    from safetensors import safe_open

    path = folder / WEIGHTS_FILE
    try:
        header = check_safetensors_file(path)
    except LoraFileError as e:
        raise ModelLoadError(str(e)) from None
    expected = model.state_dict()
    stored = {k: v for k, v in header.items() if k != "__metadata__"}
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    mismatched = [k for k in set(expected) & set(stored) if list(expected[k].shape) != list(stored[k]["shape"])]
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:3])})")
    if mismatched:
        k = sorted(mismatched)[0]
        problems.append(f"{len(mismatched)} tensors of the wrong shape (e.g. {k}: {stored[k]['shape']} vs "
                        f"{list(expected[k].shape)})")
    if problems:
        raise ModelLoadError(f"{path}: does not match {QUANT_FILE} and the denoiser config: " + "; ".join(problems))
    tensors = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for key in expected:
            value = f.get_tensor(key)
            want = expected[key].dtype
            if not (value.is_floating_point() and want.is_floating_point) and value.dtype != want:
                raise ModelLoadError(f"{path}: tensor '{key}' is {value.dtype}, expected {want}")
            tensors[key] = value
    model.load_state_dict(tensors, strict=True, assign=True)
    leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftovers:
        raise ModelLoadError(f"{path}: no values for {', '.join(leftovers[:3])}")


def folder_runtime(folder: Path, info: dict) -> str:
    """The runtime ``studio quantize --runtime`` recorded (``auto`` for folders written before there was one)."""
    runtime = info.get("runtime", DEFAULT_RUNTIME)
    try:
        return check_runtime(runtime, str(folder / QUANT_FILE))
    except ValueError as e:
        raise ModelLoadError(str(e)) from None


def load_quantized_denoiser(folder: str | Path, dtype: torch.dtype, *, verify_hash: bool = False
                            ) -> tuple[nn.Module, dict]:
    """The quantized denoiser of ``folder`` (16-bit parts cast to ``dtype``) and its ``studio_quant.json``; its
    layers run the folder's recorded runtime (default ``auto``, see :mod:`.runtime`)."""
    folder = Path(folder)
    info = read_info(folder)
    runtime = folder_runtime(folder, info)
    _check_files(folder, info, verify_hash)
    model = _build_denoiser(folder, info)
    _load_state(folder, model)
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.runtime = runtime
    return nn.Module.to(model, dtype=dtype).eval(), info  # (ModelMixin.to warns about fp32 modules)


def load_quantized_pipeline(folder: str | Path, dtype: torch.dtype,
                            load_base: Callable[[str, dict[str, Any]], Any]):
    """The base pipeline of ``folder`` with its quantized denoiser; ``load_base(source, components)`` loads the
    base model with ``components`` substituted (see :func:`pipelines.loading.load_pipeline`)."""
    folder = Path(folder)
    denoiser, info = load_quantized_denoiser(folder, dtype)
    base = info["base"]
    if is_quantized_folder(base):
        raise ModelLoadError(f"{folder / QUANT_FILE}: its base '{base}' is itself a quantized folder")
    pipe = load_base(base, {info["denoiser"]: denoiser})
    if getattr(pipe, info["denoiser"], None) is not denoiser:
        setattr(pipe, info["denoiser"], denoiser)
    pipe.studio_quant_info = info
    return pipe
