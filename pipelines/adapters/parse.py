"""Reading a LoRA file into exact per-layer deltas for a loaded pipeline.

Three routes, chosen by the file's layout:

* **diffusers route** (diffusers/PEFT ``lora_A``/``lora_B`` files, old diffusers attention-processor files,
  XLabs and BFL-control FLUX files): diffusers' ``lora_state_dict`` converts the keys; ranks and alphas are
  resolved with the same rules diffusers uses to build its PEFT ``LoraConfig`` (``alpha_pattern``,
  ``rank_pattern``, rsLoRA), so the deltas equal what ``load_lora_weights`` would apply.
* **kohya/LyCORIS route** (``lora_unet_*``, ``lora_te1_*``, ``lycoris_*`` ... with ``lora_down``/``lora_up``,
  ``hada_*``, ``lokr_*``, ``diff``, ``dora_scale``): each module's tensors become a delta through its kind
  (:mod:`.kinds`); module names are resolved by :mod:`.naming` (model module table, then diffusers'
  converters probed). ``scale = alpha / rank`` per module, as kohya defines it.
* **QR-LoRA route** (``*.lora.q.weight``/``lora.base_r.weight``/``lora.delta_r.weight``, :mod:`.kinds.qr`):
  each layer becomes ``s · Q ΔR`` after Q and R (the file's own, or those of the bases file it names next to
  it) are checked against the base weight they claim to come from; the file's other keys take the diffusers
  route.

Before anything is attached, every delta is checked against its target layer; a LoRA for another base model,
a file that matches no layer, or mismatched shapes raise :class:`IncompatibleLoraError` naming the file and,
when it can tell, the base model the file was made for.

**Hostile and damaged files.** The whole file is validated before anything is attached, and the work a file may
cause is bounded before it is done: the container (:mod:`..safetensors_io`: header size and nesting, offsets,
floating dtypes only, finite values); every value within ``MAX_ABS_VALUE`` (no trained LoRA holds 10⁴; values
at float16's maximum or ×10³⁰ only render black) and every layer's change below ``MAX_RELATIVE_DELTA`` times
the layer's own weight (Frobenius norms); each module's factors complete and consistent for its kind
(``validate`` of :mod:`.kinds`: a ``lora_A`` without ``lora_B``, a missing LoKr factor, ranks that disagree,
scalar or 1-D tensors where matrices belong, an ``alpha`` that is not one number); the size of the delta the
factors would produce no larger than the model's largest layer, checked from shapes *before* any Kronecker or
Khatri-Rao product is computed. **Nothing is dropped silently**: keys the studio does not know (an unknown
suffix, a factor without its partner, an orphan tensor diffusers' converter leaves over) refuse the file,
naming the keys; modules that name no layer of the loaded model are kept in ``ParsedLora.skipped`` and reported
as a warning by every front end (a LoRA trained with extra layers stays usable).
"""

from __future__ import annotations

import hashlib
import json
import math
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..control_lora import control_lora_problem, pad_embedder_delta
from ..errors import IncompatibleLoraError, LoraFileError
from ..families import Family
from ..safetensors_io import read_safetensors
from . import kinds
from .delta import LayerDelta
from .factors import PlannedDelta, alpha_value
from .metadata import BASE_NAMES, LoraInfo, describe_header
from .naming import Target, resolve_by_probe, resolve_by_table


MAX_ABS_VALUE = 1e4  # no trained LoRA factor, alpha or DoRA magnitude comes near this
MAX_RELATIVE_DELTA = 100.0  # ‖ΔW‖ / ‖W‖ per layer; trained LoRAs stay below ~1
LORA_HEADER_BYTES = 16 * 1024 * 1024  # a LoRA header (keys + metadata such as ss_tag_frequency) stays far below
KNOWN_EXTRAS = {"alpha", "dora_scale", "scale"}  # per-module keys besides a kind's factors


@dataclass
class ParsedLora:
    name: str
    source: str
    sha256: str | None
    info: LoraInfo
    deltas: dict[str, LayerDelta]  # "component.module.path" -> delta
    skipped: list[str] = field(default_factory=list)  # file modules that land on no layer of this model

    @property
    def components(self) -> set[str]:
        return {k.split(".", 1)[0] for k in self.deltas}


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def parse_lora(
    source: str | Path | dict[str, torch.Tensor],
    pipe,
    family: Family,
    *,
    name: str | None = None,
    metadata: dict[str, str] | None = None,
) -> ParsedLora:
    """Read ``source`` (a ``.safetensors`` path or a state dict) into deltas that fit ``pipe``."""
    if isinstance(source, dict):
        tensors, metadata, label, sha = dict(source), dict(metadata or {}), "<state dict>", None
        for key, value in tensors.items():
            if not isinstance(value, torch.Tensor):
                raise LoraFileError(label, f"'{key}' is a {type(value).__name__}, not a tensor")
            if not value.is_floating_point() and not (key.endswith(".alpha") and value.numel() == 1
                                                      and value.dtype != torch.bool) \
                    and not (kinds.shira.is_index_key(key) and value.dtype != torch.bool):
                raise LoraFileError(label, f"tensor '{key}' is {value.dtype}; LoRA weights must be floating point")
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise LoraFileError(label, f"tensor '{key}' holds NaN or infinite values")
    else:
        path = Path(source)
        tensors, metadata = read_safetensors(path, floating_only=True, max_header_bytes=LORA_HEADER_BYTES)
        label, sha = str(path), file_sha256(path)
    _check_magnitudes(tensors, label)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    info = describe_header(None if label.startswith("<") else label, shapes, metadata)
    if name:
        info.name = name
    if not tensors:
        raise LoraFileError(label, "the file holds no tensors")
    if info.base is not None and info.base != family.name:
        raise IncompatibleLoraError(
            label,
            f"this LoRA was made for {BASE_NAMES[info.base]} (according to its {info.base_evidence}), "
            f"but the loaded model is {BASE_NAMES[family.name]}",
        )
    control = control_lora_problem(tensors, info.format, pipe)  # BFL Canny/Depth, either layout
    if control:
        raise IncompatibleLoraError(label, control)
    if info.format == "qr-bases":
        raise IncompatibleLoraError(
            label,
            "this is a QR-LoRA bases file (the frozen Q and R that QR-LoRA adapters of one base share), not an "
            f"adapter: load the adapters that name it in {kinds.qr.BASES_KEY}",
        )
    if kinds.shira.is_shira_file(tensors):
        deltas, skipped = _shira_route(tensors, metadata, pipe, family, label)
    elif info.format == "qr-lora":
        folder = None if label.startswith("<") else Path(label).parent
        deltas, skipped = _qr_route(tensors, metadata, pipe, family, label, folder)
    elif info.format in ("peft", "diffusers-old", "xlabs"):
        if info.format == "peft":
            _check_peft_file_keys(tensors, label)
        deltas, skipped = _diffusers_route(tensors, metadata, pipe, family, label)
    elif info.format == "unknown":
        suffixes = {k.partition(".")[2] for k in tensors}
        algorithms = sorted({kinds.UNSUPPORTED_SUFFIXES[s] for s in suffixes if s in kinds.UNSUPPORTED_SUFFIXES})
        if algorithms:
            raise IncompatibleLoraError(label, f"uses {', '.join(algorithms)}, which the studio does not apply yet")
        sample = ", ".join(list(tensors)[:4])
        raise IncompatibleLoraError(label, f"no LoRA/LyCORIS keys recognised (first keys: {sample})")
    else:
        deltas, skipped = _kohya_route(tensors, pipe, family, label)
    deltas = pad_embedder_delta(deltas, pipe)  # x_embedder widened by an applied control LoRA (diffusers pads too)
    _check_fit(deltas, skipped, pipe, family, label, info)
    return ParsedLora(name=info.name, source=label, sha256=sha, info=info, deltas=deltas, skipped=skipped)


# --------------------------------------------------------------------------------------------------- routes
def _kohya_route(tensors, pipe, family, label):
    limits = LayerLimits.of(pipe, family)
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in tensors.items():
        module, _, suffix = key.partition(".")
        groups[module][suffix] = value
    built: dict[str, LayerDelta] = {}
    for module, group in groups.items():
        suffixes = set(group) - KNOWN_EXTRAS
        unsupported = {kinds.UNSUPPORTED_SUFFIXES[s] for s in suffixes if s in kinds.UNSUPPORTED_SUFFIXES}
        if unsupported:
            raise IncompatibleLoraError(
                label,
                f"module '{module}' uses {', '.join(sorted(unsupported))}, which the studio does not apply yet",
            )
        kind = kinds.kind_for(suffixes)
        if kind is None:
            raise IncompatibleLoraError(label, f"module '{module}' has unrecognised keys: {sorted(group)}")
        unknown = sorted(suffixes - set(kind.SUFFIXES))
        if unknown:
            raise IncompatibleLoraError(
                label, f"module '{module}' has keys the studio does not know for {kind.__name__.rsplit('.', 1)[-1]}: "
                       f"{unknown}; refusing rather than dropping them")
        try:
            alpha = alpha_value(group["alpha"]) if "alpha" in group else None
            validate = getattr(kind, "validate", None)
            if validate is not None:
                limits.check(validate(group))
            delta = kind.build(group, alpha)
            if "dora_scale" in group:
                delta = kinds.dora.attach_magnitude(delta, group["dora_scale"])
        except (KeyError, ValueError, RuntimeError, NotImplementedError, IndexError) as e:
            raise IncompatibleLoraError(label, f"module '{module}': {e}") from None
        built[module] = delta
    targets: dict[str, list[Target]] = {}
    unresolved: dict[str, int] = {}
    for module, delta in built.items():
        target = resolve_by_table(family, pipe, module)
        if target is not None:
            targets[module] = [target]
        else:
            unresolved[module] = delta.out_features
    targets.update(resolve_by_probe(family, pipe, unresolved))
    deltas: dict[str, LayerDelta] = {}
    skipped = []
    for module, delta in built.items():
        for target in targets.get(module, []):
            if target.rows is not None and delta.magnitude is not None and delta.magnitude_axis == "in":
                raise IncompatibleLoraError(
                    label, f"module '{module}': column-norm DoRA on a fused layer cannot be split exactly"
                )
            part = delta if target.rows is None else delta.select_rows(target.rows)
            if target.key in deltas:
                raise IncompatibleLoraError(label, f"two entries of the file land on the same layer {target.key}")
            deltas[target.key] = part
        if module not in targets:
            skipped.append(module)
    return deltas, skipped


def _diffusers_route(tensors, metadata, pipe, family, label):
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft
    from diffusers.utils.peft_utils import _create_lora_config
    from peft.utils.other import get_pattern_key

    cls = family.pipeline_class
    limits = LayerLimits.of(pipe, family)
    sd = dict(tensors)
    try:
        if family.name == "sdxl":
            state_dict, alphas = cls.lora_state_dict(sd, unet_config=pipe.unet.config)
        else:
            state_dict, alphas = cls.lora_state_dict(sd, return_alphas=True)
    except Exception as e:
        raise IncompatibleLoraError(label, f"diffusers cannot convert this file ({e.__class__.__name__}: {e})") from None
    try:
        config_meta = _lora_config_metadata(metadata)
    except ValueError as e:
        raise IncompatibleLoraError(label, str(e)) from None
    by_component: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in state_dict.items():
        component, _, rest = key.partition(".")
        if component not in family.components():
            component, rest = family.denoiser, key  # un-prefixed keys belong to the denoiser
        by_component[component][rest] = value
    deltas: dict[str, LayerDelta] = {}
    for component, sd_c in by_component.items():
        if not any("lora_A" in k for k in sd_c):
            try:
                if component == family.denoiser:
                    sd_c = convert_unet_state_dict_to_peft(sd_c)
                else:
                    sd_c = convert_state_dict_to_peft(convert_state_dict_to_diffusers(sd_c))
            except Exception as e:  # diffusers' converters refuse unknown layouts with assorted exception types
                raise IncompatibleLoraError(
                    label, f"diffusers cannot convert its {component} keys ({e.__class__.__name__}: {str(e)[:200]})"
                ) from None
        module_obj = getattr(pipe, component)
        if component != family.denoiser and not hasattr(module_obj, "text_model"):
            sd_c = {k.removeprefix("text_model."): v for k, v in sd_c.items()}
        ranks = {f"^{k}": v.shape[1] for k, v in sd_c.items() if "lora_B" in k and v.ndim > 1}
        if not ranks:
            leftover = sorted(sd_c)[:4]
            if leftover:
                raise IncompatibleLoraError(label, f"keys without a lora_A/lora_B pair would be dropped: {leftover}")
            continue
        comp_alphas = None
        if alphas:
            comp_alphas = {k.removeprefix(f"{component}."): v for k, v in alphas.items() if k.startswith(f"{component}.")}
            try:
                comp_alphas = {k: alpha_value(torch.as_tensor(v)) for k, v in comp_alphas.items()} or None
            except ValueError as e:
                raise IncompatibleLoraError(label, f"{component}: {e}") from None
        comp_meta = config_meta.get(component)
        try:
            config = _create_lora_config(
                sd_c, comp_alphas, comp_meta, ranks, is_unet=component == family.denoiser
            )
        except Exception as e:  # PEFT's LoraConfig refuses bad metadata with assorted exception types
            raise IncompatibleLoraError(
                label, f"its {component} LoRA config (metadata) is invalid ({e.__class__.__name__}: {str(e)[:200]})"
            ) from None
        modules = sorted({k.split(".lora_")[0] for k in sd_c if ".lora_A" in k or ".lora_B" in k})
        _check_peft_keys(sd_c, modules, component, label)
        for module in modules:
            down = sd_c[f"{module}.lora_A.weight"]
            up = sd_c[f"{module}.lora_B.weight"]
            problem = _peft_pair_problem(down, up)
            if problem:
                raise IncompatibleLoraError(label, f"module '{component}.{module}': {problem}")
            rank = down.shape[0]
            alpha_key = get_pattern_key(config.alpha_pattern.keys(), module)
            alpha = config.alpha_pattern.get(alpha_key, config.lora_alpha)
            scale = alpha / (math.sqrt(rank) if getattr(config, "use_rslora", False) else rank)
            # PEFT's lora_B bias (lora_bias=True) is scaled with the adapter like its weight
            try:
                limits.check(PlannedDelta(out=up.shape[0], inputs=int(math.prod(down.shape[1:]))))
                delta = LayerDelta(down=down, up=up.reshape(up.shape[0], -1), bias=sd_c.get(f"{module}.lora_B.bias"),
                                   scale=float(scale), kind="lora")
                magnitude = sd_c.get(f"{module}.lora_magnitude_vector")
                if magnitude is None:
                    magnitude = sd_c.get(f"{module}.lora_magnitude_vector.weight")
                if magnitude is not None:
                    delta = kinds.dora.attach_magnitude(delta, magnitude)
            except ValueError as e:
                raise IncompatibleLoraError(label, f"module '{component}.{module}': {e}") from None
            deltas[f"{component}.{module}"] = delta
    return deltas, []


def _qr_route(tensors, metadata, pipe, family, label, folder: Path | None):
    """QR-LoRA layers (see :mod:`.kinds.qr`), each checked against the base weight it was made for; Q and R
    the file leaves out come from the bases file it names in ``folder``. The file's other keys (the released
    trainer saves a PEFT text-encoder LoRA alongside) take the diffusers route."""
    groups, rest = kinds.qr.split_keys(tensors)
    if any("q" not in g or "r" not in g for g in groups.values()):
        _fill_qr_bases(groups, metadata, label, folder)
    try:
        alpha = float(metadata["qr_lora.alpha"]) if "qr_lora.alpha" in metadata else None
    except ValueError:
        raise LoraFileError(label, f"metadata qr_lora.alpha is not a number: {metadata['qr_lora.alpha']!r}") from None
    deltas: dict[str, LayerDelta] = {}
    skipped = []
    for key, group in groups.items():
        try:
            delta = kinds.qr.build(group, alpha)
        except ValueError as e:
            raise IncompatibleLoraError(label, f"layer '{key}': {e}") from None
        name, module = _sparse_route_layer(pipe, family, key)
        if module is None:
            skipped.append(key)
            continue
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and not weight.is_meta:
            problem = kinds.qr.base_mismatch(group["q"], group["r"], weight, delta.scale)
            if problem:
                raise IncompatibleLoraError(label, f"QR-LoRA layer '{name}': {problem}")
        deltas[name] = delta
    if rest:
        more, more_skipped = _diffusers_route(rest, metadata, pipe, family, label)
        deltas.update(more)
        skipped += more_skipped
    return deltas, skipped


def _shira_route(tensors, metadata, pipe, family, label):
    """SHiRA / plain sparse-delta layers (:mod:`.kinds.shira`), each checked against its linear layer; the file's
    other keys (e.g. a LoRA for the text encoders) take the diffusers route."""
    groups, rest = kinds.shira.split_keys(tensors)
    deltas: dict[str, LayerDelta] = {}
    skipped = []
    for key, group in groups.items():
        name, module = _sparse_route_layer(pipe, family, key)
        if module is None:
            skipped.append(key)
            continue
        if not isinstance(module, nn.Linear) and not hasattr(module, "in_features"):
            raise IncompatibleLoraError(label, f"SHiRA layer '{name}' is a {type(module).__name__}; "
                                               "SHiRA applies to linear layers only")
        try:
            deltas[name] = kinds.shira.build(group, (module.out_features, module.in_features))
        except ValueError as e:
            raise IncompatibleLoraError(label, f"SHiRA layer '{name}': {e}") from None
    if rest:
        more, more_skipped = _diffusers_route(rest, metadata, pipe, family, label)
        deltas.update(more)
        skipped += more_skipped
    return deltas, skipped


def _sparse_route_layer(pipe, family: Family, key: str) -> tuple[str, nn.Module | None]:
    """The layer a QR-LoRA or SHiRA key names: ``"<component>.<path>"``, or a bare path in the denoiser; returns
    the full ``component.path`` name and the module (None where the model has no such layer)."""
    component, _, path = key.partition(".")
    if component not in family.components():
        component, path = family.denoiser, key
    try:
        return f"{component}.{path}", getattr(pipe, component).get_submodule(path)
    except AttributeError:
        return f"{component}.{path}", None


def _fill_qr_bases(groups, metadata, label, folder: Path | None) -> None:
    try:
        name = kinds.qr.bases_file_name(metadata)
    except ValueError as e:
        raise LoraFileError(label, str(e)) from None
    if name is None:
        return  # kinds.qr.build names the missing tensors
    if folder is None:
        raise LoraFileError(label, f"keeps Q and R in the bases file {name!r}: load it from its file, not a state dict")
    path = folder / name
    if path.is_symlink() and path.resolve().parent != folder.resolve():
        raise LoraFileError(label, f"its bases file {name!r} is a link leading out of {folder}")
    if not path.is_file():
        raise LoraFileError(label, f"keeps Q and R in the bases file {name!r}, which is not in {folder}")
    bases, _ = read_safetensors(path)
    try:
        kinds.qr.fill_from_bases(groups, bases)
    except ValueError as e:
        raise IncompatibleLoraError(label, f"{e} ({path})") from None


def _lora_config_metadata(metadata: dict[str, str]) -> dict[str, dict]:
    """diffusers stores each component's PEFT LoraConfig as ``lora_adapter_metadata`` (JSON, keys prefixed)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        flat = None
    if not isinstance(flat, dict):
        raise ValueError("metadata lora_adapter_metadata is not a JSON object")
    out: dict[str, dict] = defaultdict(dict)
    for key, value in flat.items():
        component, _, field_name = key.partition(".")
        out[component][field_name] = value
    return dict(out)


# ------------------------------------------------------------------------------------------------ validation
class LayerLimits:
    """The largest layer of a model (rows, flattened inputs, elements): no delta of a LoRA for this model can
    exceed it, so a file's planned deltas are bounded by it before any product of factors is computed."""

    def __init__(self, out: int, inputs: int, numel: int):
        self.out, self.inputs, self.numel = out, inputs, numel

    @classmethod
    def of(cls, pipe, family: Family) -> "LayerLimits":
        """Measured on every parse (milliseconds even for SDXL): a pipeline's components may be swapped."""
        out = inputs = numel = 1
        for component in family.components():
            root = getattr(pipe, component, None)
            if not isinstance(root, nn.Module):
                continue
            for module in root.modules():
                if isinstance(module, (nn.Linear, nn.Conv2d)):
                    rows, rest = module.weight.shape[0], int(math.prod(module.weight.shape[1:]))
                    if isinstance(module, nn.Conv2d):
                        rest = module.in_channels * int(math.prod(module.kernel_size))
                    out, inputs, numel = max(out, rows), max(inputs, rest), max(numel, rows * rest)
        return cls(out, inputs, numel)

    FUSED = 4  # a file's fused source layer (FLUX's qkv+mlp ``linear1``) spans up to this many model layers

    def check(self, plan: PlannedDelta) -> None:
        if plan.out > self.FUSED * self.out or plan.inputs > self.inputs or plan.numel > self.FUSED * self.numel:
            raise ValueError(
                f"its factors make a {plan.out} x {plan.inputs} delta, larger than any layer of this model (the "
                f"largest has {self.out} rows, {self.inputs} inputs, {self.numel} weights): a LoRA for another "
                "model, or a damaged file; refused before computing it")


def _check_magnitudes(tensors: dict[str, torch.Tensor], label: str) -> None:
    """Values no trained LoRA has (|x| > ``MAX_ABS_VALUE``): such a file renders black or noise, so refuse it."""
    for key, value in tensors.items():
        if kinds.shira.is_index_key(key):  # positions in the weight, not values (checked against the layer)
            continue
        if not value.numel():
            continue
        # integer alphas (e.g. U16) have no abs() in torch: compare in float64
        largest = (value if value.is_floating_point() else value.to(torch.float64)).abs().max().item()
        if largest > MAX_ABS_VALUE:
            raise LoraFileError(
                label, f"tensor '{key}' holds values up to {largest:.3g}; a trained LoRA stays far "
                       f"below {MAX_ABS_VALUE:g} (a corrupted or tampered file?)")


_PEFT_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_magnitude_vector",
                  "lora_magnitude_vector.weight")


def _check_peft_keys(sd: dict[str, torch.Tensor], modules: list[str], component: str, label: str) -> None:
    """Every key of a converted PEFT state dict is used: both factors of each module, nothing else left over."""
    known = {f"{m}.{suffix}" for m in modules for suffix in _PEFT_SUFFIXES}
    leftover = sorted(k for k in sd if k not in known)
    if leftover:
        shown = ", ".join(leftover[:4]) + (f" and {len(leftover) - 4} more" if len(leftover) > 4 else "")
        raise IncompatibleLoraError(label, f"{component}: keys the studio does not know would be dropped ({shown}); "
                                           "refusing the file rather than applying part of it")
    for module in modules:
        for side, other in (("lora_A", "lora_B"), ("lora_B", "lora_A")):
            if f"{module}.{side}.weight" in sd and f"{module}.{other}.weight" not in sd:
                raise IncompatibleLoraError(label, f"module '{component}.{module}' has {side} but no {other}: an "
                                                   "incomplete LoRA cannot be applied")


def _check_peft_file_keys(tensors: dict[str, torch.Tensor], label: str) -> None:
    """A diffusers/PEFT file holds only PEFT keys; anything else (a stray ``dora_scale``, a LyCORIS factor) would
    be dropped by diffusers' converter without a word, so the file is refused naming those keys."""
    foreign = sorted(k for k in tensors if not k.endswith((*_PEFT_SUFFIXES, ".alpha")))
    if foreign:
        shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
        raise IncompatibleLoraError(label, f"a diffusers/PEFT LoRA with keys that are not PEFT LoRA keys ({shown}); "
                                           "refusing the file rather than dropping them")


def _peft_pair_problem(down: torch.Tensor, up: torch.Tensor) -> str | None:
    if down.dim() not in (2, 4) or up.dim() not in (2, 4) or down.numel() == 0 or up.numel() == 0:
        return f"lora_A {tuple(down.shape)} and lora_B {tuple(up.shape)} must be non-empty matrices (or convolutions)"
    if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
        return f"lora_B must be a 1x1 convolution, got shape {tuple(up.shape)}"
    if up.shape[1] != down.shape[0]:
        return (f"lora_B has rank {up.shape[1]} but lora_A has rank {down.shape[0]} "
                f"(shapes {tuple(up.shape)} and {tuple(down.shape)})")
    return None


def _check_fit(deltas, skipped, pipe, family, label, info: LoraInfo):
    problems = []
    for key, delta in deltas.items():
        component, _, path = key.partition(".")
        try:
            module = getattr(pipe, component).get_submodule(path)
        except AttributeError:
            problems.append(f"{key}: no such layer")
            continue
        problem = _shape_problem(delta, module) or _strength_problem(delta, module)
        if problem:
            problems.append(f"{key}: {problem}")
    hint = ""
    if info.base is None:
        hint = " (the file does not say which base model it was made for)"
    if problems:
        listed = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise IncompatibleLoraError(
            label, f"{len(problems)} of its layers do not fit this {BASE_NAMES[family.name]} model{hint}: {listed}"
        )
    if not deltas:
        sample = ", ".join(skipped[:3])
        raise IncompatibleLoraError(
            label,
            f"none of its {len(skipped)} modules match a layer of this {BASE_NAMES[family.name]} model{hint} "
            f"(e.g. {sample})",
        )


def frobenius(delta: LayerDelta) -> float:
    """‖ΔW‖_F at weight 1, without forming a low-rank ΔW: ‖s·U D‖² = s²·trace((UᵀU)(DDᵀ)) (r × r products)."""
    if delta.down is not None:
        up = delta.up.float().reshape(delta.up.shape[0], -1)
        down = delta.down.float().reshape(delta.down.shape[0], -1)
        return abs(delta.scale) * math.sqrt(max(torch.trace((up.T @ up) @ (down @ down.T)).item(), 0.0))
    if delta.dense is not None:
        return abs(delta.scale) * delta.dense.float().norm().item()
    return 0.0


# ‖W‖_F per layer, kept while the layer's own tensors are unchanged: every file of a stack is checked against the
# same layers, and the norm of a full-size SDXL/FLUX layer set costs seconds (a float32 pass over every weight).
_WEIGHT_NORMS: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, float]]" = weakref.WeakKeyDictionary()


def _weight_norm(module: nn.Module) -> float | None:
    """‖W‖_F of ``module.weight`` (floored at 1e-3·sqrt(numel)), cached by the layer's own parameters and buffers
    (their storage and version counters), so an in-place edit, a swapped tensor or a new module recomputes it."""
    own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    if any(t.is_meta for t in own):
        return None
    stamp = tuple((t.data_ptr(), t._version, tuple(t.shape)) for t in own)
    cached = _WEIGHT_NORMS.get(module)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.is_meta:
        return None
    weight = weight.detach()
    norm = max(torch.linalg.vector_norm(weight, dtype=torch.float32).item(), 1e-3 * math.sqrt(weight.numel()))
    _WEIGHT_NORMS[module] = (stamp, norm)
    return norm


def _strength_problem(delta: LayerDelta, module: nn.Module) -> str | None:
    """A delta far larger than the layer it changes (``MAX_RELATIVE_DELTA`` × ‖W‖_F) is no trained LoRA: such a
    file (factors scaled by a tool or an attacker) only renders black or noise. Trained LoRAs stay below ~1
    (the tiny world's: at most 0.91)."""
    base = _weight_norm(module)
    if base is None:
        return None
    norm = frobenius(delta)
    if not math.isfinite(norm) or norm > MAX_RELATIVE_DELTA * base:
        return (f"its change has norm {norm:.3g}, {norm / base:.3g} times the layer's own weight (a trained LoRA "
                f"stays below {MAX_RELATIVE_DELTA:g} times); a corrupted or tampered file?")
    return None


def _shape_problem(delta: LayerDelta, module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        out_f, in_f, kernel = module.out_features, module.in_features, ()
    elif isinstance(module, nn.Conv2d):
        out_f, in_f, kernel = module.out_channels, module.in_channels, tuple(module.kernel_size)
        if module.groups != 1:
            return "grouped convolution"
    else:
        return f"a {type(module).__name__} cannot take a LoRA"
    if delta.out_features != out_f:
        return f"LoRA output size {delta.out_features} vs layer {out_f}"
    if delta.down is not None:
        got = delta.down[0].numel()
        if got != in_f * int(math.prod(kernel)):
            return f"LoRA input size {tuple(delta.down.shape[1:])} vs layer {(in_f, *kernel)}"
    if delta.dense is not None and delta.dense.numel() != out_f * in_f * int(math.prod(kernel)):
        return f"delta shape {tuple(delta.dense.shape)} vs layer {(out_f, in_f, *kernel)}"
    return None
