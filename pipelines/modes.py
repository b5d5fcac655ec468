"""Modes: text-to-image, img2img and inpainting on the denoiser the studio already composes LoRAs on.

diffusers ships one pipeline class per mode (``StableDiffusionXLImg2ImgPipeline``, ``FluxInpaintPipeline``,
...). They all drive the same denoiser (``unet`` / ``transformer``) and text encoders, so the studio's composed
layers and its denoising-loop seam (:mod:`pipelines.seam`) serve every one of them: the mode only decides
which stock pipeline object runs the loop. That object is built from the loaded pipeline's own components
(the same module objects: nothing is reloaded, copied, cast or moved) and the mode is chosen by the inputs a
call carries, in the studio's vocabulary:

===============  =======================================  ==========================================
inputs           SDXL                                     FLUX.1
===============  =======================================  ==========================================
(none)           ``StableDiffusionXLPipeline``            ``FluxPipeline``
``image``        ``StableDiffusionXLImg2ImgPipeline``     ``FluxImg2ImgPipeline``
``image`` +      ``StableDiffusionXLInpaintPipeline``     ``FluxInpaintPipeline``
``mask_image``
``control_image`` ``StableDiffusionXLControlNetPipeline`` ``FluxControlNetPipeline``
``control_image`` ``StableDiffusionXLControlNetImg2ImgPipeline``, ``FluxControlNetImg2ImgPipeline``, ... inpaint
+ ``image`` (+ ``mask_image``)
``control_image`` (refused)                               ``FluxControlPipeline``
+ control LoRA
+ ``image`` (+ ``mask_image``)                            ``FluxControlImg2ImgPipeline``, ``FluxControlInpaintPipeline``
===============  =======================================  ==========================================

A FLUX control LoRA (BFL Canny/Depth, :mod:`pipelines.control_lora`) changes the base model: while one is
applied the transformer takes image and control latents concatenated, so the ``control-lora`` mode
(``FluxControlPipeline``) is the only one that can run, and it runs only while one is applied.

ControlNet mode takes its model from the call (``controlnet``, see :mod:`pipelines.controlnets`) or from the
wrapped pipeline's own ``controlnet`` component. The ControlNet runs outside the denoiser, once per step, with
lane 0's text conditioning; its residuals are replicated for every lane (``Family.batched_args``), so lanes
that share the text conditioning see exactly what separate pipeline calls would. Strategies that give lanes
their own text conditioning (LoRAs with text-encoder parts under composite, switch, ...) are refused with
ControlNet, and the deep-feature cache is not used (the residuals enter the blocks it would skip).

``strength`` (in (0, 1]) says how much of the noise schedule img2img and inpainting run: diffusers starts the
loop at step ``begin_index`` of the ``steps``-step schedule. Step-dependent strategies (switch, step windows,
caches) address the *full* schedule, so :func:`schedule_offset` turns the pipeline's loop index back into
the schedule's step.
"""

from __future__ import annotations

import inspect
from typing import Any

from .errors import ModelLoadError, StudioError
from .families import FLUX, SDXL, Family

TEXT2IMG, IMG2IMG, INPAINT, CONTROLNET = "text2img", "img2img", "inpaint", "controlnet"
CONTROLNET_IMG2IMG, CONTROLNET_INPAINT = "controlnet-img2img", "controlnet-inpaint"
CONTROLNET_MODES = (CONTROLNET, CONTROLNET_IMG2IMG, CONTROLNET_INPAINT)
CONTROL_LORA = "control-lora"  # FluxControlPipeline, with a control LoRA applied (pipelines.control_lora)
CONTROL_LORA_IMG2IMG, CONTROL_LORA_INPAINT = "control-lora-img2img", "control-lora-inpaint"
CONTROL_LORA_MODES = (CONTROL_LORA, CONTROL_LORA_IMG2IMG, CONTROL_LORA_INPAINT)
MODES = (TEXT2IMG, IMG2IMG, INPAINT, *CONTROLNET_MODES, *CONTROL_LORA_MODES)

# (family, mode) -> diffusers pipeline class name
PIPELINE_CLASSES: dict[tuple[str, str], str] = {
    ("sdxl", TEXT2IMG): "StableDiffusionXLPipeline",
    ("sdxl", IMG2IMG): "StableDiffusionXLImg2ImgPipeline",
    ("sdxl", INPAINT): "StableDiffusionXLInpaintPipeline",
    ("flux", TEXT2IMG): "FluxPipeline",
    ("flux", IMG2IMG): "FluxImg2ImgPipeline",
    ("flux", INPAINT): "FluxInpaintPipeline",
    ("sdxl", CONTROLNET): "StableDiffusionXLControlNetPipeline",
    ("flux", CONTROLNET): "FluxControlNetPipeline",
    ("sdxl", CONTROLNET_IMG2IMG): "StableDiffusionXLControlNetImg2ImgPipeline",
    ("flux", CONTROLNET_IMG2IMG): "FluxControlNetImg2ImgPipeline",
    ("sdxl", CONTROLNET_INPAINT): "StableDiffusionXLControlNetInpaintPipeline",
    ("flux", CONTROLNET_INPAINT): "FluxControlNetInpaintPipeline",
}
# the mode of a control LoRA: not a class from_pipe wraps (its transformer may be widened for good)
CONTROL_LORA_CLASSES: dict[tuple[str, str], str] = {("flux", CONTROL_LORA): "FluxControlPipeline",
                                                    ("flux", CONTROL_LORA_IMG2IMG): "FluxControlImg2ImgPipeline",
                                                    ("flux", CONTROL_LORA_INPAINT): "FluxControlInpaintPipeline"}
# pipelines whose denoiser serves one mode only (FLUX.1-Fill-dev's transformer also takes the masked image and
# the mask as input channels): wrapped with from_pipe, used as they are for that mode, refused for the others
DEDICATED: dict[str, tuple[str, str]] = {"FluxFillPipeline": ("flux", INPAINT)}
_FAMILIES = {"sdxl": SDXL, "flux": FLUX}

# the studio's names for the inputs that choose a mode (they travel in ``pipeline_kwargs``)
MODE_INPUTS = ("image", "mask_image", "strength", "control_image", "controlnet_conditioning_scale", "controlnet",
               "control_lora")


def supported_classes() -> list[str]:
    return sorted(set(PIPELINE_CLASSES.values()) | set(DEDICATED))


def dedicated_mode(pipe) -> str | None:
    """The one mode ``pipe``'s denoiser serves (FLUX Fill: inpainting), or ``None`` for the ordinary classes."""
    entry = DEDICATED.get(type(pipe).__name__)
    return entry[1] if entry and type(pipe).__module__.startswith("diffusers.") else None


def classify_pipeline(pipe) -> tuple[Family, str]:
    """The family and mode of a pipeline object; a :class:`ModelLoadError` for a class the studio cannot wrap.

    Only the exact classes of :data:`PIPELINE_CLASSES` are accepted: a subclass (a community pipeline) may
    run its own denoising loop around the denoiser or change the components, and the studio cannot check that.
    """
    name = type(pipe).__name__
    if dedicated_mode(pipe) is not None:
        family, mode = DEDICATED[name]
        return _FAMILIES[family], mode
    for (family, mode), class_name in PIPELINE_CLASSES.items():
        if name == class_name and type(pipe).__module__.startswith("diffusers."):
            return _FAMILIES[family], mode
    raise ModelLoadError(
        f"{name} is not a pipeline the studio can wrap; it composes LoRAs on " + ", ".join(supported_classes())
    )


def check_wrappable(pipe, family: Family) -> None:
    """Refuse a pipeline whose denoiser or text encoders already carry diffusers/PEFT LoRA layers: the
    studio composes adapters itself and could neither see nor remove those (``unload_lora_weights()`` or
    ``fuse_lora()`` + ``unload_lora_weights()`` first)."""
    for name in family.components():
        module = getattr(pipe, name, None)
        if module is None:
            continue
        tuned = [n for n, m in module.named_modules() if type(m).__module__.startswith("peft.tuners")]
        if tuned:
            raise ModelLoadError(
                f"{type(pipe).__name__}.{name} has diffusers/PEFT LoRA layers loaded ({tuned[0]}, ...); the studio "
                "composes LoRAs itself: call pipe.unload_lora_weights() (or fuse_lora() first to keep them baked in) "
                "and pass the LoRA files to compose()")


def check_dedicated(pipe, family: Family, mode: str) -> None:
    """Refuse ``mode`` on a pipeline whose denoiser serves another mode only (see :data:`DEDICATED`)."""
    only = dedicated_mode(pipe)
    if only is not None and mode != only:
        raise StudioError(f"{type(pipe).__name__}'s {family.denoiser} is made for {only} only (it takes the "
                          f"masked image and the mask as input): give image and mask_image, not {mode} inputs")


def mode_of(kwargs: dict[str, Any]) -> str:
    """The mode the inputs in ``kwargs`` choose (studio vocabulary, see the module docstring)."""
    if kwargs.get("control_lora"):  # a marker set by the studio's checked inputs (pipelines.mode_inputs)
        return {TEXT2IMG: CONTROL_LORA, IMG2IMG: CONTROL_LORA_IMG2IMG, INPAINT: CONTROL_LORA_INPAINT}[_image_mode(kwargs)]
    if kwargs.get("controlnet_conditioning_scale") is not None and kwargs.get("control_image") is None:
        raise StudioError("controlnet_conditioning_scale applies to ControlNet; give a control image with it")
    image_mode = _image_mode(kwargs)
    if kwargs.get("control_image") is not None:
        return {TEXT2IMG: CONTROLNET, IMG2IMG: CONTROLNET_IMG2IMG, INPAINT: CONTROLNET_INPAINT}[image_mode]
    return image_mode


def _image_mode(kwargs: dict[str, Any]) -> str:
    if kwargs.get("mask_image") is not None:
        if kwargs.get("image") is None:
            raise StudioError("a mask (mask_image) needs the image it masks (image)")
        return INPAINT
    if kwargs.get("image") is not None:
        return IMG2IMG
    if kwargs.get("strength") is not None:
        raise StudioError("strength applies to img2img and inpainting; give an input image (image) with it")
    return TEXT2IMG


def mode_pipeline(pipe, family: Family, mode: str, controlnet=None):
    """The stock pipeline of ``mode`` for ``family``, sharing ``pipe``'s components (``pipe`` itself if it is
    already of that class and, for ControlNet, holds ``controlnet``).

    Like diffusers' ``from_pipe``, but without its final ``.to(dtype)``, which would cast the shared modules
    of a half-precision pipeline to float32 (so it would change the caller's pipeline). The new object
    carries the pipeline configuration options its class accepts (``force_zeros_for_empty_prompt``,
    ``requires_aesthetics_score``, the watermarker setting) from ``pipe``.
    """
    import diffusers

    from .control_lora import applied_control_lora

    applied = applied_control_lora(pipe)
    if (applied is not None) != (mode in CONTROL_LORA_MODES):
        raise StudioError(f"the control LoRA {applied.source} is applied: its transformer takes control latents, "
                          f"so only the {'/'.join(CONTROL_LORA_MODES)} modes run; remove it (Studio.unload()) for "
                          f"{mode}" if applied is not None else
                          f"the {mode} mode needs a control LoRA applied (control_lora= / --control-lora)")
    if dedicated_mode(pipe) is not None:
        check_dedicated(pipe, family, mode)
        return pipe
    cls = getattr(diffusers, {**PIPELINE_CLASSES, **CONTROL_LORA_CLASSES}[(family.name, mode)])
    components = dict(pipe.components)
    if mode in CONTROLNET_MODES:
        controlnet = controlnet if controlnet is not None else components.get("controlnet")
        if controlnet is None:
            raise StudioError("a control image needs a ControlNet: pass controlnet= (--controlnet), or wrap a "
                              "ControlNet pipeline with Studio.from_pipe")
        components["controlnet"] = controlnet
    if type(pipe) is cls and (mode not in CONTROLNET_MODES or pipe.controlnet is components["controlnet"]):
        return pipe
    modules, options = cls._get_signature_keys(cls)
    missing = [m for m in modules if m not in components and m not in cls._optional_components]
    if missing:
        raise ModelLoadError(f"cannot build {cls.__name__} from {type(pipe).__name__}: it lacks {missing}")
    kwargs = {m: components.get(m) for m in modules}
    config = dict(pipe.config)
    for option in options:
        if option == "add_watermarker":
            kwargs[option] = getattr(pipe, "watermark", None) is not None
        elif option in config:
            kwargs[option] = config[option]
        elif f"_{option}" in config:  # kept by from_pipe for a class that did not take it
            kwargs[option] = config[f"_{option}"]
    built = cls(**kwargs)
    built.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {"disable": True}))
    return built


def _accepts(pipe, name: str) -> bool:
    return name in inspect.signature(type(pipe).__call__).parameters


def fit_call(target, call: dict[str, Any]) -> dict[str, Any]:
    """``call`` (the pipeline's usual arguments plus the mode inputs) for the mode's pipeline ``target``.

    Unset mode inputs are dropped, and the size where the mode's pipeline takes it from the input image (SDXL
    img2img; the studio has already resized the image to the requested size).
    """
    out = {k: v for k, v in call.items()
           if not (k in MODE_INPUTS and v is None) and k not in ("controlnet", "control_lora")}
    if "control_image" in out and "control_image" not in inspect.signature(type(target).__call__).parameters:
        out["image"] = out.pop("control_image")  # SDXL's ControlNet pipeline calls it image
    for size in ("width", "height"):
        if size in out and not _accepts(target, size):
            out.pop(size)
    return out


def default_strength(family: Family, mode: str, pipe=None) -> float | None:
    """The ``strength`` the diffusers pipeline that runs ``mode`` on ``pipe`` uses when none is given (``None``
    for text-to-image and ControlNet)."""
    if mode in (TEXT2IMG, CONTROLNET, CONTROL_LORA):
        return None  # no input image: the whole schedule runs
    import diffusers

    if pipe is not None and dedicated_mode(pipe) == mode:
        cls = type(pipe)
    else:
        cls = getattr(diffusers, {**PIPELINE_CLASSES, **CONTROL_LORA_CLASSES}[(family.name, mode)])
    return float(inspect.signature(cls.__call__).parameters["strength"].default)


def default_conditioning_scale(family: Family, mode: str) -> float:
    """The ``controlnet_conditioning_scale`` diffusers' ControlNet pipeline of ``mode`` uses when none is given
    (1.0, but 0.8 for SDXL ControlNet img2img)."""
    import diffusers

    cls = getattr(diffusers, PIPELINE_CLASSES[(family.name, mode)])
    return float(inspect.signature(cls.__call__).parameters["controlnet_conditioning_scale"].default)


def steps_run(family: Family, steps: int, strength: float | None) -> int:
    """How many of ``steps`` the loop runs at ``strength`` (diffusers' ``get_timesteps``: SDXL rounds the steps
    that run down, FLUX the steps skipped)."""
    if strength is None:
        return steps
    if family.name == "sdxl":
        return min(int(steps * strength), steps)
    return steps - int(max(steps - steps * strength, 0))


def schedule_offset(pipe) -> int:
    """The schedule step the pipeline's loop started at (img2img/inpainting skip the first ``(1-strength)``
    part of the schedule; diffusers records it as the scheduler's ``begin_index``). 0 for text-to-image."""
    scheduler = pipe.scheduler
    begin = getattr(scheduler, "begin_index", None)
    return int(begin or 0) // int(getattr(scheduler, "order", 1) or 1)
