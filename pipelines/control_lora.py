"""FLUX.1 control LoRAs (BFL's FLUX.1-Canny-dev-lora / FLUX.1-Depth-dev-lora and files trained like them):
read, checked, applied to the transformer as a change of the base model, and taken off again bit for bit.

A control LoRA is not a style LoRA. It is trained for diffusers' ``FluxControlPipeline``, which concatenates the
control image's latents to the image latents along the channels, so the transformer's input embedder
``x_embedder`` takes twice its usual input (128 instead of 64 channels on FLUX.1-dev). diffusers'
``FluxControlPipeline.load_lora_weights`` (``_maybe_expand_transformer_param_shape_or_error_``) replaces
``x_embedder`` by a wider ``Linear`` (the old weight in the first columns, zeros after), raises
``config.in_channels``, loads the LoRA as a PEFT adapter and writes the file's normalisation scales
(``norm_q`` / ``norm_k`` / ``norm_added_q`` / ``norm_added_k``, ``_load_norm_into_transformer``) into the
transformer; other LoRAs loaded afterwards get their ``x_embedder`` factor zero-padded to the new width
(``_maybe_expand_lora_state_dict``).

The studio treats a control LoRA as what it is, a different base model that every lane and every strategy must
share, not an adapter to mix:

* :func:`read_control_lora` reads the file (BFL layout converted by diffusers' own
  ``_convert_bfl_flux_control_lora_to_diffusers`` through ``lora_state_dict``; diffusers layout as written by
  ``FluxControlPipeline.save_lora_weights``), resolves every LoRA pair exactly as ordinary LoRA files are
  resolved (ranks, alphas, metadata: :func:`pipelines.adapters.parse._diffusers_route`), and checks everything
  against the transformer before anything changes;
* :func:`apply_control_lora` widens ``x_embedder`` (the same module object; ``in_features`` doubles, the new
  input columns start at zero, as diffusers does), adds each layer's ``scale · s · B A`` to its weight (fused:
  every lane sees it), writes the norm scales, and keeps the replaced parameters themselves;
* :func:`remove_control_lora` puts those parameter objects back: the transformer is bit for bit as before,
  shapes, ``in_features`` and ``config.in_channels`` included.

Per-sample LoRA gains (the studio's composed layers) compose on top unchanged. A control LoRA given as an
ordinary LoRA is refused by :func:`control_lora_problem`, with the way to apply it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .errors import IncompatibleLoraError, StudioError

# the normalisation weights diffusers' FluxControlPipeline loads from a control LoRA (written, not low-rank)
NORM_KEYS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")
EMBEDDER = "x_embedder"
HOW = ("apply it as the control LoRA (control_lora= / --control-lora) with a control image, which runs diffusers' "
       "FluxControlPipeline")


def _norm_keys(keys) -> list[str]:
    """Keys like ``transformer.transformer_blocks.0.attn.norm_q.weight``."""
    out = []
    for key in keys:
        parts = key.split(".")
        if len(parts) >= 2 and parts[-2] in NORM_KEYS and parts[-1] == "weight" and "lora" not in key:
            out.append(key)
    return out


def _input_width(transformer) -> int | None:
    embedder = getattr(transformer, EMBEDDER, None)
    weight = getattr(embedder, "weight", None)
    return int(weight.shape[1]) if isinstance(weight, torch.Tensor) and weight.ndim == 2 else None


def base_input_width(transformer) -> int | None:
    """``x_embedder``'s input width of the base model (before any control LoRA widened it)."""
    applied = _APPLIED.get(transformer) if transformer is not None else None
    return applied.base_width if applied is not None else _input_width(transformer)


def control_lora_problem(tensors: Mapping[str, torch.Tensor], file_format: str, pipe=None) -> str | None:
    """Why ``tensors`` (a LoRA file's state dict, ``file_format`` as :func:`pipelines.adapters.metadata.
    detect_format` labels it) is a FLUX control LoRA that cannot be composed as an ordinary LoRA, or ``None``.

    ``pipe``: the loaded pipeline, whose transformer's base ``x_embedder`` width tells a widened input apart."""
    if file_format == "bfl-control":
        return ("this is a FLUX control LoRA in BFL's layout (Canny/Depth: img_in and query_norm.scale keys): it "
                "widens the transformer's image input embedder and replaces normalisation scales, so it is not "
                f"mixed like other LoRAs; {HOW}")
    lora_keys = [k for k in tensors if "lora_A" in k or "lora_B" in k]
    if not lora_keys:
        return None
    norms = _norm_keys(tensors)
    if norms:
        return (f"this is a FLUX control LoRA in diffusers' layout: besides LoRA factors it holds normalisation "
                f"scales ({norms[0]}, ...) that FluxControlPipeline writes into the transformer; {HOW}")
    embedder = next((k for k in tensors if k.removeprefix("transformer.") == f"{EMBEDDER}.lora_A.weight"), None)
    width = base_input_width(getattr(pipe, "transformer", None)) if pipe is not None else None
    if embedder is not None and width is not None and tensors[embedder].ndim == 2 \
            and int(tensors[embedder].shape[1]) > width:
        return (f"this is a FLUX control LoRA in diffusers' layout: its x_embedder takes "
                f"{int(tensors[embedder].shape[1])} input channels, the model's {width} (the control image's latents "
                f"are concatenated to the image latents, as diffusers' FluxControlPipeline does); {HOW}")
    return None


# ------------------------------------------------------------------------------------------------ reading
@dataclass
class ControlLoraFile:
    """A control LoRA checked against one FLUX transformer: its low-rank changes and its norm scales."""

    source: str  # the file (absolute)
    sha256: str | None
    deltas: dict[str, Any]  # transformer module path -> pipelines.adapters.delta.LayerDelta (x_embedder: wide)
    norms: dict[str, torch.Tensor]  # transformer parameter path ("...attn.norm_q.weight") -> new value
    input_width: int  # x_embedder's input width while applied (twice the base width)
    base_width: int


def _base_module(module: nn.Module) -> nn.Module:
    return getattr(module, "original", module)  # a composed layer wraps the model's own Linear


def read_control_lora(source: str | Path, pipe, family) -> ControlLoraFile:
    """Read and check a control LoRA file against ``pipe``'s FLUX transformer; nothing is changed.

    Raises :class:`IncompatibleLoraError` naming the file for an ordinary LoRA given as a control LoRA, a control
    LoRA for another base (another inner dimension or input width), text-encoder parts, DoRA, or norm scales for
    parameters the model lacks; :class:`pipelines.errors.LoraFileError` for an unreadable or truncated file."""
    from .adapters.metadata import describe_header
    from .adapters.parse import LORA_HEADER_BYTES, _check_magnitudes, _diffusers_route, _strength_problem, file_sha256
    from .safetensors_io import read_safetensors

    path = Path(source).expanduser()
    label = str(path)
    if family.name != "flux":
        raise IncompatibleLoraError(label, "control LoRAs (FluxControlPipeline) are made for FLUX.1; the loaded "
                                           f"model is {family.name.upper()}")
    if not path.is_file():
        raise IncompatibleLoraError(label, "control LoRA file not found")
    tensors, metadata = read_safetensors(path, floating_only=True, max_header_bytes=LORA_HEADER_BYTES)
    _check_magnitudes(tensors, label)
    info = describe_header(label, {k: tuple(v.shape) for k, v in tensors.items()}, metadata)
    if info.format == "bfl-control":
        try:  # diffusers' converter (BFL names -> diffusers names, fused qkv split)
            tensors, _ = family.pipeline_class.lora_state_dict(dict(tensors), return_alphas=True)
        except Exception as e:  # the converter pops the keys of all 19 + 38 FLUX.1 blocks: KeyError and others
            raise IncompatibleLoraError(label, f"diffusers cannot convert this BFL control LoRA "
                                               f"({e.__class__.__name__}: {str(e)[:200]})") from None
    elif info.format != "peft":
        raise IncompatibleLoraError(label, f"is a {info.format} LoRA file, not a FLUX control LoRA (those come in "
                                           "BFL's layout or diffusers' lora_A/lora_B layout)")
    norm_keys = _norm_keys(tensors)
    pairs = {k: v for k, v in tensors.items() if k not in norm_keys}
    other = sorted(k for k in pairs if not k.startswith("transformer.") and "." in k
                   and k.split(".", 1)[0] in family.components())
    if other:
        raise IncompatibleLoraError(label, f"a control LoRA changes the transformer only; this file also has "
                                           f"{other[0]} ...")
    transformer = pipe.transformer
    base_width = base_input_width(transformer)
    deltas, _ = _diffusers_route(pairs, metadata, pipe, family, label)
    deltas = {k.removeprefix("transformer."): v for k, v in deltas.items()}
    embedder = deltas.get(EMBEDDER)
    if embedder is None or embedder.in_features == base_width:
        raise IncompatibleLoraError(label, f"is not a control LoRA: its x_embedder takes the model's own "
                                           f"{base_width} input channels{'' if embedder else ' (it has none)'}, so "
                                           "it is an ordinary LoRA; pass it with the other LoRAs (loras= / --lora)")
    if embedder.in_features != 2 * base_width:
        raise IncompatibleLoraError(label, f"its x_embedder takes {embedder.in_features} input channels; a control "
                                           f"LoRA for this model takes {2 * base_width} (the model's {base_width} "
                                           "image channels and as many control channels): made for another base model")
    quantized = next((p for p, m in transformer.named_modules() if type(_base_module(m)).__name__ == "QuantLinear"), None)
    if quantized is not None:
        raise IncompatibleLoraError(label, f"control LoRAs apply to the 16/32-bit FLUX transformer; this model is "
                                           f"4-bit ({quantized} is a QuantLinear), which they do not support")
    problems = []
    for path_in, delta in deltas.items():
        try:
            module = _base_module(transformer.get_submodule(path_in))
        except AttributeError:
            problems.append(f"{path_in}: no such layer")
            continue
        if type(module) is not nn.Linear:
            problems.append(f"{path_in}: a {type(module).__name__}, not a plain linear layer (control LoRAs apply "
                            "to the 16/32-bit transformer; 4-bit models are not supported)")
            continue
        width = base_width if path_in == EMBEDDER else module.in_features
        want_in = embedder.in_features if path_in == EMBEDDER else module.in_features
        if delta.magnitude is not None or not delta.is_low_rank:
            problems.append(f"{path_in}: DoRA / dense deltas are not control-LoRA layers")
        elif delta.out_features != module.out_features or delta.in_features != want_in:
            problems.append(f"{path_in}: LoRA {delta.out_features}x{delta.in_features} vs layer "
                            f"{module.out_features}x{width}")
        elif (strength := _strength_problem(delta, module)) is not None:  # far larger than the layer: damaged
            problems.append(f"{path_in}: {strength}")
    parameters = dict(transformer.named_parameters())
    norms = {}
    for key in norm_keys:
        name = key.removeprefix("transformer.")
        target = parameters.get(name)
        value = tensors[key]
        if target is None:
            problems.append(f"{name}: no such normalisation weight")
        elif tuple(target.shape) != tuple(value.shape):
            problems.append(f"{name}: {tuple(value.shape)} vs model {tuple(target.shape)}")
        else:
            norms[name] = value
    if problems:
        listed = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise IncompatibleLoraError(label, f"{len(problems)} of its layers do not fit this FLUX model (a control "
                                           f"LoRA for another base?): {listed}")
    return ControlLoraFile(source=str(path.resolve()), sha256=file_sha256(path), deltas=deltas, norms=norms,
                           input_width=embedder.in_features, base_width=base_width)


# ------------------------------------------------------------------------------------------------ applying
@dataclass
class AppliedControlLora:
    """A control LoRA applied to a transformer at ``scale``, with what it replaced (the original parameter
    objects, untouched) so that :func:`remove_control_lora` restores the transformer bit for bit."""

    file: ControlLoraFile
    scale: float
    base_width: int
    replaced: list[tuple[nn.Module, str, nn.Parameter | None]] = field(default_factory=list)
    in_channels: Any = None  # config.in_channels before

    @property
    def source(self) -> str:
        return self.file.source


_APPLIED: "weakref.WeakKeyDictionary[nn.Module, AppliedControlLora]" = weakref.WeakKeyDictionary()


def applied_control_lora(pipe) -> AppliedControlLora | None:
    """The control LoRA applied to ``pipe``'s transformer, or ``None``."""
    transformer = getattr(pipe, "transformer", None)
    return _APPLIED.get(transformer) if transformer is not None else None


def _swap(applied: AppliedControlLora, module: nn.Module, attr: str, value: torch.Tensor) -> None:
    old = getattr(module, attr)
    applied.replaced.append((module, attr, old))
    requires_grad = bool(old.requires_grad) if old is not None else False
    setattr(module, attr, nn.Parameter(value, requires_grad=requires_grad))


def apply_control_lora(pipe, file: ControlLoraFile, scale: float = 1.0) -> AppliedControlLora:
    """Apply ``file`` to ``pipe``'s transformer at ``scale`` (see the module docstring).

    The transformer must carry no composed layer (the studio detaches its LoRAs first: they are parsed again
    against the widened model) and no other control LoRA. Each new weight is ``W + scale · s · B A`` computed in
    float32 and stored in the layer's dtype; ``x_embedder``'s new input columns are zero before its change."""
    transformer = pipe.transformer
    if transformer in _APPLIED:
        raise StudioError(f"a control LoRA ({_APPLIED[transformer].source}) is already applied; remove it first")
    modules = {p: transformer.get_submodule(p) for p in file.deltas}
    wrapped = [p for p, m in modules.items() if type(m) is not nn.Linear]
    if wrapped:
        raise StudioError(f"{file.source}: layer {wrapped[0]} is a {type(modules[wrapped[0]]).__name__}, not a plain "
                          "Linear: control LoRAs apply to the 16/32-bit transformer with no LoRA attached (4-bit "
                          "models are not supported)")
    if _input_width(transformer) != file.base_width:
        raise StudioError(f"{file.source}: the transformer's x_embedder takes {_input_width(transformer)} channels, "
                          f"the file was checked against {file.base_width}")
    applied = AppliedControlLora(file=file, scale=float(scale), base_width=file.base_width,
                                 in_channels=transformer.config.in_channels)
    try:
        with torch.no_grad():
            for path, delta in file.deltas.items():
                module = modules[path]
                weight = module.weight
                up = delta.up.to(weight.device, torch.float32)
                down = delta.down.to(weight.device, torch.float32).reshape(delta.down.shape[0], -1)
                base = weight.float()
                if down.shape[1] != base.shape[1]:  # x_embedder: the new input columns start at zero
                    base = torch.cat([base, base.new_zeros(base.shape[0], down.shape[1] - base.shape[1])], dim=1)
                new = torch.addmm(base, up, down, alpha=delta.scale * applied.scale)  # W + scale·s·B A, one pass
                _swap(applied, module, "weight", new.to(weight.dtype))
                if delta.bias is not None:  # PEFT's lora_B bias, scaled with the adapter
                    bias = module.bias
                    added = delta.bias.float().to(weight.device) * (delta.scale * applied.scale)
                    base = bias.float() if bias is not None else torch.zeros_like(added)
                    _swap(applied, module, "bias", (base + added).to(weight.dtype))
                if path == EMBEDDER:
                    applied.replaced.append((module, "in_features", module.in_features))
                    module.in_features = int(new.shape[1])
            for name, value in file.norms.items():
                owner_path, _, attr = name.rpartition(".")
                owner = transformer.get_submodule(owner_path)
                old = getattr(owner, attr)
                _swap(applied, owner, attr, value.to(device=old.device, dtype=old.dtype).clone())
        setattr(transformer.config, "in_channels", file.input_width)  # as diffusers does (FluxControlPipeline reads it)
    except BaseException:
        _restore(transformer, applied)
        raise
    _APPLIED[transformer] = applied
    return applied


def _restore(transformer, applied: AppliedControlLora) -> None:
    for module, attr, old in reversed(applied.replaced):
        if isinstance(old, nn.Parameter) or old is None:
            module._parameters[attr] = old
        else:
            setattr(module, attr, old)
    applied.replaced.clear()
    setattr(transformer.config, "in_channels", applied.in_channels)


def remove_control_lora(pipe) -> AppliedControlLora | None:
    """Take the applied control LoRA (if any) off ``pipe``'s transformer: every replaced parameter object is put
    back, ``x_embedder.in_features`` and ``config.in_channels`` restored. Returns what was removed."""
    transformer = getattr(pipe, "transformer", None)
    applied = _APPLIED.pop(transformer, None) if transformer is not None else None
    if applied is not None:
        _restore(transformer, applied)
    return applied


def pad_embedder_delta(deltas: dict, pipe) -> dict:
    """An ordinary LoRA's ``transformer.x_embedder`` factor, zero-padded to the width a control LoRA gave the layer
    (as diffusers' ``_maybe_expand_lora_state_dict``: the LoRA does not read the control channels)."""
    applied = applied_control_lora(pipe)
    key = f"transformer.{EMBEDDER}"
    delta = deltas.get(key)
    if applied is None or delta is None or not delta.is_low_rank or delta.in_features != applied.base_width:
        return deltas
    from dataclasses import replace

    down = torch.zeros(delta.down.shape[0], applied.file.input_width, dtype=delta.down.dtype)
    down[:, : delta.down.shape[1]] = delta.down
    return {**deltas, key: replace(delta, down=down)}
