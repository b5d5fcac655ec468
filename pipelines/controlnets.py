"""ControlNet models for the ControlNet mode (:mod:`pipelines.modes`): found, loaded and checked against the base.

A ControlNet is given as a model object (``diffusers.ControlNetModel`` for SDXL, ``FluxControlNetModel`` for
FLUX.1), a local diffusers folder (``config.json`` + weights) or a Hub id; a folder or id is loaded once per
studio in the pipeline's dtype and device. Before anything renders, its configuration must fit the denoiser:
a ControlNet made for another base (SD 1.5's for SDXL, SDXL's for FLUX, another width) is refused with the
mismatching settings named, instead of a shape error deep in the first step.

Several ControlNets (multi-ControlNet: a pose ControlNet and a depth ControlNet, each with its own control image
and scale) are given as lists; the stock pipelines wrap them in diffusers' ``MultiControlNetModel`` /
``FluxMultiControlNetModel``, which sums the residuals, each scaled by its own conditioning scale.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ModelLoadError, StudioError
from .families import Family

_CLASSES = {"sdxl": "ControlNetModel", "flux": "FluxControlNetModel"}
# configuration keys that must equal the denoiser's
_MATCH = {
    "sdxl": ("in_channels", "cross_attention_dim", "addition_embed_type", "addition_time_embed_dim",
             "projection_class_embeddings_input_dim", "block_out_channels"),
    "flux": ("in_channels", "joint_attention_dim", "pooled_projection_dim", "attention_head_dim",
             "num_attention_heads", "guidance_embeds"),
}
IN_MEMORY = "<ControlNet>"
OWN = "<pipeline>"  # the wrapped pipeline's own controlnet component


def controlnet_class(family: Family):
    import diffusers

    return getattr(diffusers, _CLASSES[family.name])


def members(controlnet: Any) -> list[Any]:
    """The ControlNets a (Flux)MultiControlNetModel holds, or ``[controlnet]``."""
    nets = getattr(controlnet, "nets", None)
    return list(nets) if nets is not None and type(controlnet).__name__.endswith("MultiControlNetModel") \
        else [controlnet]


def check_controlnet(controlnet: Any, pipe, family: Family, label: str) -> None:
    """Refuse a ControlNet of the wrong class or for another base model (message names the settings)."""
    if len(members(controlnet)) > 1 or members(controlnet)[0] is not controlnet:
        for i, net in enumerate(members(controlnet)):
            check_controlnet(net, pipe, family, f"{label} #{i + 1}")
        return
    cls = controlnet_class(family)
    if not isinstance(controlnet, cls):
        raise StudioError(f"{label}: a {family.name.upper()} ControlNet must be a diffusers {cls.__name__}, got "
                          f"{type(controlnet).__name__}")
    denoiser = getattr(pipe, family.denoiser).config
    wrong = []
    for key in _MATCH[family.name]:
        mine, theirs = controlnet.config.get(key), denoiser.get(key)
        if key == "block_out_channels" and mine is not None and theirs is not None:
            mine, theirs = list(mine), list(theirs)
        if mine != theirs:
            wrong.append(f"{key} {mine!r} (model: {theirs!r})")
    if wrong:
        raise StudioError(f"{label}: this ControlNet was made for another base model than this "
                          f"{family.name.upper()} model: " + "; ".join(wrong))


def resolve_controlnet(source: Any, pipe, family: Family, cache: dict) -> tuple[Any, str]:
    """``(model, recipe source)`` for a ControlNet object, folder or Hub id; ``None``: the pipeline's own."""
    if source is None:
        own = pipe.components.get("controlnet")
        if own is None:
            raise StudioError("a control image needs a ControlNet: pass controlnet= (--controlnet DIR), or wrap a "
                              "ControlNet pipeline with Studio.from_pipe")
        check_controlnet(own, pipe, family, f"{type(pipe).__name__}.controlnet")
        return own, OWN
    if not isinstance(source, (str, Path)):
        check_controlnet(source, pipe, family, "controlnet")
        return source, IN_MEMORY
    text = str(source)
    path = Path(text).expanduser()
    key = str(path.resolve()) if path.exists() else text
    if key not in cache:
        if path.exists() and not (path / "config.json").is_file():
            raise ModelLoadError(f"{text}: a ControlNet is a diffusers folder with config.json and weights")
        cls = controlnet_class(family)
        denoiser = getattr(pipe, family.denoiser)
        try:
            model = cls.from_pretrained(key, dtype=denoiser.dtype)
        except (OSError, ValueError) as e:
            hint = " (no network? pass a local folder)" if not path.exists() else ""
            raise ModelLoadError(f"cannot load the ControlNet '{text}'{hint}: {str(e)[:300]}") from None
        check_controlnet(model, pipe, family, text)
        cache[key] = model.to(pipe._execution_device).eval()
    return cache[key], key
