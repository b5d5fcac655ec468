"""The two model families the studio composes LoRAs on, and their block maps.

A *family* says which diffusers pipeline class it uses, where its denoiser and text encoders live, how the
kohya/LyCORIS key prefixes map onto those components, and how module paths group into the *blocks* that
per-block LoRA weights address:

* SDXL: ``te1``, ``te2``, ``down.0``-``down.2``, ``mid``, ``up.0``-``up.2`` (and ``other`` for conv_in,
  time/added embeddings and conv_out);
* FLUX.1: ``te1`` (CLIP), ``te2`` (T5), ``double.<i>`` for the dual-stream ``transformer_blocks``,
  ``single.<i>`` for ``single_transformer_blocks`` (and ``other`` for embedders and the output head).

Block-weight specs are dicts (or ``"down=0,mid=1"`` strings) of *selectors* to weights; a selector is a block
name, a group (``down``, ``up``, ``double``, ``single``, ``te``), or an index range (``double.0-9``). Selectors
apply in the order given, so put broad ones first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping

from .errors import StudioError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Family:
    name: str
    pipeline_class_name: str
    denoiser: str
    text_encoders: tuple[str, ...]
    # kohya / LyCORIS key prefix -> pipeline component
    key_prefixes: Mapping[str, str]
    # denoiser forward arguments whose first dimension is the batch
    batched_args: tuple[str, ...]
    # denoiser arguments carrying text conditioning (dotted for nested dicts)
    text_args: tuple[str, ...]
    default_steps: int
    default_guidance: float
    block_presets: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    # the denoiser's ``timestep`` argument times this is the noise level in [0, 1] (SDXL: t/1000; FLUX: sigma)
    timestep_scale: float = 1.0

    @property
    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def components(self) -> tuple[str, ...]:
        return (self.denoiser, *self.text_encoders)

    def block_of(self, component: str, module_path: str) -> str:
        """The block a module belongs to (``component`` is e.g. ``"unet"``, path relative to it)."""
        if component in self.text_encoders:
            return f"te{self.text_encoders.index(component) + 1}"
        if self.name == "sdxl":
            if m := re.match(r"down_blocks\.(\d+)\.", module_path):
                return f"down.{m.group(1)}"
            if module_path.startswith("mid_block."):
                return "mid"
            if m := re.match(r"up_blocks\.(\d+)\.", module_path):
                return f"up.{m.group(1)}"
            return "other"
        if m := re.match(r"transformer_blocks\.(\d+)\.", module_path):
            return f"double.{m.group(1)}"
        if m := re.match(r"single_transformer_blocks\.(\d+)\.", module_path):
            return f"single.{m.group(1)}"
        return "other"

    def block_names(self, pipe) -> list[str]:
        """All block names of a loaded pipeline, in model order."""
        names = [f"te{i + 1}" for i in range(len(self.text_encoders))]
        denoiser = getattr(pipe, self.denoiser)
        if self.name == "sdxl":
            names += [f"down.{i}" for i in range(len(denoiser.down_blocks))]
            names += ["mid"]
            names += [f"up.{i}" for i in range(len(denoiser.up_blocks))]
        else:
            names += [f"double.{i}" for i in range(len(denoiser.transformer_blocks))]
            names += [f"single.{i}" for i in range(len(denoiser.single_transformer_blocks))]
        return names + ["other"]


SDXL = Family(
    name="sdxl",
    pipeline_class_name="StableDiffusionXLPipeline",
    denoiser="unet",
    text_encoders=("text_encoder", "text_encoder_2"),
    key_prefixes={
        "lora_unet_": "unet",
        "lycoris_": "unet",
        "lora_te1_": "text_encoder",
        "lora_te_": "text_encoder",
        "lora_te2_": "text_encoder_2",
    },
    batched_args=("sample", "timestep", "encoder_hidden_states", "timestep_cond", "added_cond_kwargs.text_embeds",
                  "added_cond_kwargs.time_ids", "down_block_additional_residuals", "mid_block_additional_residual"),
    text_args=("encoder_hidden_states", "added_cond_kwargs.text_embeds"),
    default_steps=30,
    default_guidance=5.0,
    block_presets={
        "all": {},
        "unet-only": {"te": 0.0},
        # B-LoRA (Frenkel et al. 2024) and LoRA-block-weight practice: content/subject lives in the deep,
        # low-resolution blocks, style in the outer, high-resolution ones.
        "subject: deep blocks": {"te": 1.0, "down": 0.0, "up": 0.0, "down.2": 1.0, "mid": 1.0, "up.0": 1.0},
        "style: outer blocks": {"te": 0.0, "down.2": 0.0, "mid": 0.0, "up.0": 0.0},
    },
    timestep_scale=1.0 / 1000.0,
)

FLUX = Family(
    name="flux",
    pipeline_class_name="FluxPipeline",
    denoiser="transformer",
    text_encoders=("text_encoder", "text_encoder_2"),
    key_prefixes={
        "lora_unet_": "transformer",
        "lora_transformer_": "transformer",
        "lycoris_": "transformer",
        "lora_te1_": "text_encoder",
        "lora_te_": "text_encoder",
        "lora_te2_": "text_encoder_2",
    },
    batched_args=("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance",
                  "controlnet_block_samples", "controlnet_single_block_samples"),
    text_args=("encoder_hidden_states", "pooled_projections"),
    default_steps=28,
    default_guidance=3.5,
    block_presets={
        "all": {},
        "transformer-only": {"te": 0.0},
        "double-stream only": {"single": 0.0},
        "single-stream only": {"double": 0.0},
    },
)

FAMILIES: dict[str, Family] = {f.name: f for f in (SDXL, FLUX)}

_GROUPS = {"te": ("te",), "down": ("down",), "up": ("up",), "double": ("double",), "single": ("single",)}


def parse_block_spec(spec: str | Mapping[str, float] | None, family: Family | None = None) -> dict[str, float]:
    """Accept ``{"down": 0, "mid": 1}``, ``"down=0,mid=1"``, a preset name of ``family`` or ``None``.

    Values must be finite floats.
    """
    if spec is None or spec == "":
        return {}
    if isinstance(spec, str) and "=" not in spec:
        if family is None:
            raise StudioError(f"block weights '{spec}' must look like 'block=weight' (e.g. 'down.1=0.5')")
        return block_preset(family, spec)
    if isinstance(spec, str):
        out: dict[str, float] = {}
        for item in re.split(r"[,;]", spec):
            item = item.strip()
            if not item:
                continue
            if "=" not in item:
                raise StudioError(f"block weight '{item}' must look like 'block=weight' (e.g. 'down.1=0.5')")
            key, value = item.split("=", 1)
            out[key.strip()] = _finite(value, key)
        return out
    return {str(k): _finite(v, k) for k, v in spec.items()}


def _finite(value, key) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise StudioError(f"block weight for '{key}' is not a number: {value!r}") from None
    if x != x or x in (float("inf"), float("-inf")):
        raise StudioError(f"block weight for '{key}' is not a finite number: {value!r}")
    return x


def _selector_matches(selector: str, block: str) -> bool:
    if selector == block:
        return True
    if m := re.fullmatch(r"([a-z]+)\.(\d+)-(\d+)", selector):
        group, lo, hi = m.group(1), int(m.group(2)), int(m.group(3))
        bm = re.fullmatch(r"([a-z]+)\.(\d+)", block)
        return bool(bm) and bm.group(1) == group and lo <= int(bm.group(2)) <= hi
    if selector == "te":
        return block.startswith("te")
    return block.startswith(selector + ".")


def blocks_matching(family: Family, blocks: list[str], selector: str) -> list[str]:
    """The blocks a selector (block name, group or index range) addresses; an error when none."""
    matched = [b for b in blocks if _selector_matches(selector, b)]
    if not matched:
        raise StudioError(
            f"block '{selector}' does not exist in this {family.name.upper()} model; blocks are: " + ", ".join(blocks)
        )
    return matched


def resolve_block_weights(family: Family, blocks: list[str], spec: Mapping[str, float]) -> dict[str, float]:
    """Expand a block spec into one weight per block name (unnamed blocks keep weight 1)."""
    weights = {b: 1.0 for b in blocks}
    for selector, value in spec.items():
        for b in blocks_matching(family, blocks, selector):
            weights[b] = value
    return weights


def block_preset(family: Family, name: str) -> dict[str, float]:
    try:
        return dict(family.block_presets[name])
    except KeyError:
        raise StudioError(
            f"unknown block preset '{name}' for {family.name.upper()}; presets: {', '.join(family.block_presets)}"
        ) from None


def ddpm_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What a DDPM-scheduled denoiser (SDXL's UNet) is trained to predict for ``x_t = add_noise(x0, noise, t)``,
    by the scheduler's ``prediction_type``: ε, the velocity ``sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0`` (Salimans & Ho
    2022), or the clean sample."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    if kind == "sample":
        return x0
    raise StudioError(f"cannot train a denoiser with prediction_type '{kind}' (epsilon, v_prediction or sample)")
