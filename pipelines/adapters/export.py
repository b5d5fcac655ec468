"""Writing per-layer low-rank deltas as a LoRA file that diffusers' ``load_lora_weights`` loads.

The file is written by diffusers' own ``save_lora_weights`` of the model's pipeline class, in the diffusers/PEFT
layout (``unet.<module>.lora_A.weight`` / ``lora_B.weight``, ``transformer.`` for FLUX, ``text_encoder.`` and
``text_encoder_2.``) with each component's PEFT ``LoraConfig`` in the ``lora_adapter_metadata`` header entry:
per-module ranks in ``rank_pattern`` and ``alpha = rank`` everywhere, so every module's scale is 1 and
``B @ A`` is the delta itself. Extra string metadata (provenance) is added to the same header.
"""

from __future__ import annotations

import collections
import json
import os
import tempfile
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..atomic_files import file_mode
from ..errors import StudioError
from ..families import Family
from .delta import LayerDelta


def _component_layers(deltas: Mapping[str, LayerDelta], pipe) -> dict[str, dict[str, torch.Tensor]]:
    layers: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    for key, delta in deltas.items():
        component, _, module_path = key.partition(".")
        if delta.down is None or delta.dense is not None or delta.magnitude is not None:
            raise StudioError(
                f"layer {key}: the delta is not low-rank (dense or DoRA parts), so it cannot be written as a LoRA "
                "file; factor it first (studio.squeeze.factor_dense_parts, which `studio merge` and "
                "`studio squeeze` apply)"
            )
        module = getattr(pipe, component).get_submodule(module_path)
        rank = delta.rank
        up = delta.up.float().reshape(delta.up.shape[0], rank) * delta.scale
        down = delta.down.float()
        if isinstance(module, nn.Conv2d):
            down = down.reshape(rank, module.in_channels, *module.kernel_size)
            up = up.reshape(up.shape[0], rank, 1, 1)
        else:
            down = down.reshape(rank, -1)
        layers[component][f"{module_path}.lora_A.weight"] = down.contiguous()
        layers[component][f"{module_path}.lora_B.weight"] = up.contiguous()
        if delta.bias is not None:
            layers[component][f"{module_path}.lora_B.bias"] = (delta.bias.float() * delta.scale).contiguous()
    return layers


def _lora_config(state_dict: dict[str, torch.Tensor]) -> dict:
    """The PEFT ``LoraConfig`` (as a dict) that gives every module of ``state_dict`` scale 1."""
    from peft import LoraConfig

    suffix = ".lora_B.weight"
    ranks = {k.removesuffix(suffix): v.shape[1] for k, v in state_dict.items() if k.endswith(suffix)}
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    pattern = {m: rk for m, rk in ranks.items() if rk != r}
    config = LoraConfig(r=r, lora_alpha=r, rank_pattern=pattern, alpha_pattern=dict(pattern),
                        target_modules=sorted(ranks), lora_bias=any(k.endswith(".lora_B.bias") for k in state_dict))
    return config.to_dict()


def save_lora(
    path: str | Path,
    deltas: Mapping[str, LayerDelta],
    pipe,
    family: Family,
    *,
    metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write ``deltas`` (``{"component.module": LayerDelta}``, low-rank) to ``path`` as a diffusers LoRA file, its
    tensors in ``dtype`` (float32 by default: exact; float16/bfloat16 halve the file).

    The file is replaced atomically (written next to ``path`` first).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise StudioError(f"{path}: a LoRA file must be a .safetensors file")
    if not deltas:
        raise StudioError("the merge has no layers to write")
    layers = _component_layers(deltas, pipe)
    layers = {c: {k: v.to(dtype) for k, v in sd.items()} for c, sd in layers.items()}
    kwargs = {}
    for component, state_dict in layers.items():
        if component == family.denoiser:
            prefix = "unet" if family.name == "sdxl" else "transformer"
        elif component == "text_encoder" or (component == "text_encoder_2" and family.name == "sdxl"):
            prefix = component
        else:
            raise StudioError(f"diffusers' {family.pipeline_class_name} cannot save LoRA layers of '{component}'")
        kwargs[f"{prefix}_lora_layers"] = state_dict
        kwargs[f"{prefix}_lora_adapter_metadata"] = _lora_config(state_dict)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        family.pipeline_class.save_lora_weights(tmp, weight_name=path.name, **kwargs)
        written = Path(tmp) / path.name
        if metadata:
            with safe_open(str(written), framework="pt") as f:
                header = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            header.update({str(k): v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
            save_file(tensors, str(written), metadata=header)
        os.chmod(written, file_mode())  # safetensors writes 0600 whatever the umask
        os.replace(written, path)
    return path
