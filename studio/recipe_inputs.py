"""The mode and input images of a recipe (img2img, inpainting): checked on reading, recorded on rendering,
found and verified again on reproducing.

A recipe names each input image by its file and SHA-256 (``inputs = {image = {source, sha256}, ...}``, see
:mod:`pipelines.mode_inputs`). Reproducing reads the same files, or the files the caller passes instead, and
refuses clearly when one is missing, is not allowed by the path policy, or has other content than the recipe
recorded: an image rendered from different pixels is not a reproduction.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from pipelines.errors import RecipeError
from pipelines.controlnets import IN_MEMORY as CONTROLNET_IN_MEMORY
from pipelines.controlnets import OWN
from pipelines.mode_inputs import IN_MEMORY, ModeInputs, check_conditioning_scale, check_strength, control_role
from pipelines.modes import CONTROL_LORA, CONTROL_LORA_IMG2IMG, CONTROL_LORA_INPAINT, CONTROL_LORA_MODES, \
    CONTROLNET, CONTROLNET_IMG2IMG, CONTROLNET_INPAINT, CONTROLNET_MODES, IMG2IMG, INPAINT, MODES, TEXT2IMG

ROLES = {"image": "--image", "mask_image": "--mask", "control_image": "--control-image"}
_NEEDS = {TEXT2IMG: (), IMG2IMG: ("image",), INPAINT: ("image", "mask_image"), CONTROLNET: ("control_image",),
          CONTROLNET_IMG2IMG: ("image", "control_image"), CONTROLNET_INPAINT: ("image", "mask_image", "control_image"),
          CONTROL_LORA: ("control_image",), CONTROL_LORA_IMG2IMG: ("image", "control_image"),
          CONTROL_LORA_INPAINT: ("image", "mask_image", "control_image")}
_HEX = re.compile(r"[0-9a-f]{64}")
_EXTRA_CONTROL = re.compile(r"control_image_([2-9])")  # multi-ControlNet: the 2nd ... 8th control image
MAX_CONTROLNETS = 8


def _flag(role: str) -> str:
    """The CLI flag that passes ``role`` again (the n-th ``--control-image`` for ``control_image_n``)."""
    match = _EXTRA_CONTROL.fullmatch(role)
    return f"--control-image (#{match.group(1)})" if match else ROLES[role]


def _controlnet_count(recipe) -> int:
    return len(recipe.controlnet) if isinstance(recipe.controlnet, list) else 1


def check_mode_fields(recipe) -> None:
    """Types and consistency of ``mode``, ``strength`` and ``inputs``; ``ValueError`` naming the field."""
    if recipe.mode is None and recipe.strength is None and not recipe.inputs and recipe.controlnet is None \
            and recipe.controlnet_conditioning_scale is None and recipe.control_lora is None:
        return
    mode = recipe.mode or TEXT2IMG
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {str(mode)[:40]!r}")
    inputs = recipe.inputs or {}
    if not isinstance(inputs, dict):
        raise ValueError("inputs must be a table of image roles (image, mask_image)")
    unknown = sorted(r for r in inputs if r not in ROLES and not _EXTRA_CONTROL.fullmatch(str(r)))
    if unknown:
        raise ValueError(f"inputs has unknown roles {unknown}; known: {', '.join(ROLES)}")
    for role, entry in inputs.items():
        if not isinstance(entry, dict) or set(entry) != {"source", "sha256"}:
            raise ValueError(f"inputs.{role} must be a table with 'source' and 'sha256'")
        if not isinstance(entry["source"], str) or not entry["source"] or len(entry["source"]) > 4096:
            raise ValueError(f"inputs.{role}.source must be a file path or '{IN_MEMORY}'")
        if not isinstance(entry["sha256"], str) or not _HEX.fullmatch(entry["sha256"]):
            raise ValueError(f"inputs.{role}.sha256 must be 64 lowercase hex digits")
    needs = list(_NEEDS[mode])
    if mode in CONTROLNET_MODES and isinstance(recipe.controlnet, list):  # one control image per ControlNet
        needs += [control_role(i) for i in range(1, min(len(recipe.controlnet), MAX_CONTROLNETS))]
    if sorted(inputs) != sorted(needs):
        raise ValueError(f"mode {mode} needs the inputs {needs or 'none'}, the recipe has {sorted(inputs) or 'none'}")
    _check_control_lora_field(recipe, mode)
    if mode in (TEXT2IMG, CONTROLNET, CONTROL_LORA):
        if recipe.strength is not None:
            raise ValueError(f"strength applies to img2img and inpainting, not {mode}")
    elif recipe.strength is not None:
        recipe.strength = check_strength(recipe.strength)
    if mode not in CONTROLNET_MODES:
        if recipe.controlnet is not None or recipe.controlnet_conditioning_scale is not None:
            raise ValueError(f"controlnet settings apply to the controlnet mode, not {mode}")
        return
    sources = recipe.controlnet if isinstance(recipe.controlnet, list) else [recipe.controlnet]
    if not 1 <= len(sources) <= MAX_CONTROLNETS or any(
            not isinstance(s, str) or not s or len(s) > 4096 for s in sources):
        raise ValueError("a controlnet recipe needs 'controlnet': a folder, a Hub id, "
                         f"'{OWN}' or '{CONTROLNET_IN_MEMORY}' (multi-ControlNet: a list of up to {MAX_CONTROLNETS})")
    scale = recipe.controlnet_conditioning_scale
    if isinstance(recipe.controlnet, list):
        if not isinstance(scale, list) or len(scale) != len(sources):
            raise ValueError(f"a multi-ControlNet recipe needs controlnet_conditioning_scale: a list of "
                             f"{len(sources)} numbers, one per ControlNet")
        recipe.controlnet_conditioning_scale = [check_conditioning_scale(v) for v in scale]
    elif scale is not None:
        recipe.controlnet_conditioning_scale = check_conditioning_scale(scale)


def _check_control_lora_field(recipe, mode: str) -> None:
    """``control_lora = {source, sha256, weight}`` exactly in the control-lora mode."""
    entry = recipe.control_lora
    if mode not in CONTROL_LORA_MODES:
        if entry is not None:
            raise ValueError(f"control_lora applies to the {'/'.join(CONTROL_LORA_MODES)} modes, not {mode}")
        return
    if not isinstance(entry, dict) or set(entry) != {"source", "sha256", "weight"}:
        raise ValueError("a control-lora recipe needs control_lora = {source, sha256, weight}")
    if not isinstance(entry["source"], str) or not entry["source"] or len(entry["source"]) > 4096:
        raise ValueError("control_lora.source must be the control LoRA's file path")
    if not isinstance(entry["sha256"], str) or not _HEX.fullmatch(entry["sha256"]):
        raise ValueError("control_lora.sha256 must be 64 lowercase hex digits")
    weight = entry["weight"]
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not -10.0 <= float(weight) <= 10.0:
        raise ValueError(f"control_lora.weight must be a number from -10 to 10, got {str(weight)[:40]!r}")
    recipe.control_lora = {**entry, "weight": float(weight)}
    if recipe.controlnet is not None or recipe.controlnet_conditioning_scale is not None:
        raise ValueError(f"controlnet settings apply to the controlnet mode, not {mode}")


def record_mode(recipe, inputs: ModeInputs) -> None:
    """Write the mode, strength and input images of one render into its recipe (text-to-image: nothing)."""
    if inputs.mode == TEXT2IMG:
        return
    recipe.mode = inputs.mode
    recipe.strength = inputs.strength
    recipe.inputs = {role: {"source": item.source, "sha256": item.sha256} for role, item in inputs.images.items()}
    if inputs.mode in CONTROLNET_MODES:
        recipe.controlnet = inputs.controlnet_source
        recipe.controlnet_conditioning_scale = inputs.controlnet_scale
    if inputs.mode in CONTROL_LORA_MODES:
        recipe.control_lora = dict(inputs.control_lora)


def _digests(value: Any) -> set[str]:
    """The hashes under which ``value`` (a file or a PIL image) may have been recorded."""
    from pipelines.mode_inputs import read_image

    image, _, digest = read_image(value, "image")
    pixels = hashlib.sha256(f"{image.mode}:{image.size}:".encode() + image.tobytes()).hexdigest()
    return {digest, pixels}


def recipe_inputs(recipe, given: dict[str, Any] | None = None, policy=None, origin: str = "recipe") -> dict[str, Any]:
    """The input images to reproduce ``recipe``: ``given[role]`` (a file or PIL image) where passed, else the
    recorded file; each must have the recorded SHA-256. ``policy`` (a :class:`studio.path_policy.PathPolicy`)
    must permit a recorded file. Raises :class:`RecipeError` naming the role, the file and the fix."""
    given = {k: v for k, v in (given or {}).items() if v is not None}
    if isinstance(given.get("control_image"), (list, tuple)):  # multi-ControlNet: one per role, in order
        for i, value in enumerate(given.pop("control_image")):
            if value is not None:
                given[control_role(i)] = value
    out: dict[str, Any] = {}
    for role, entry in (recipe.inputs or {}).items():
        flag = _flag(role)
        value = given.get(role)
        if value is None:
            source = entry["source"]
            if source == IN_MEMORY:
                raise RecipeError(f"{origin}: the {role.replace('_', ' ')} was an in-memory image "
                                  f"(sha256 {entry['sha256'][:12]}...); pass it again ({role}= / {flag})")
            path = Path(source).expanduser()
            if not path.is_file():
                raise RecipeError(f"{origin}: the {role.replace('_', ' ')} {source} is missing; pass the same "
                                  f"file with {flag} (sha256 {entry['sha256'][:12]}...)")
            if policy is not None and not policy.permits(path):
                raise RecipeError(f"{origin}: the {role.replace('_', ' ')} {source} is outside the folders the "
                                  f"recipe may read; pass it with {flag} or --allow-path its folder")
            value = path
        if entry["sha256"] not in _digests(value):
            shown = value if isinstance(value, (str, Path)) else "the given image"
            raise RecipeError(f"{origin}: {shown} is not the {role.replace('_', ' ')} the recipe was made from "
                              f"(sha256 {entry['sha256'][:12]}... recorded); reproducing needs the same file")
        out[role] = value
    extra = sorted(set(given) - set(out))
    if extra:
        raise RecipeError(f"{origin}: the recipe is {recipe.mode or TEXT2IMG} and takes no {', '.join(extra)}")
    if isinstance(recipe.controlnet, list) and recipe.mode in CONTROLNET_MODES:
        out["control_image"] = [out.pop(control_role(i)) for i in range(len(recipe.controlnet))]
    return out


def recipe_controlnet(recipe, given: Any = None, policy=None, origin: str = "recipe") -> Any:
    """The ControlNet to reproduce a controlnet recipe: ``given`` (a model or folder) where passed, the wrapped
    pipeline's own for ``<pipeline>`` (``None``), else the recorded folder or Hub id (a local folder must be
    allowed by ``policy``). An in-memory ControlNet must be passed again."""
    if isinstance(recipe.controlnet, list):  # multi-ControlNet: each recorded source, or the given list
        if given is not None and (not isinstance(given, (list, tuple)) or len(given) != len(recipe.controlnet)):
            raise RecipeError(f"{origin}: the recipe has {len(recipe.controlnet)} ControlNets; pass as many")
        if all(s == OWN for s in recipe.controlnet) and given is None:
            return None
        return [_one_controlnet(source, None if given is None else given[i], policy, origin)
                for i, source in enumerate(recipe.controlnet)]
    return _one_controlnet(recipe.controlnet, given, policy, origin)


def _one_controlnet(source: str, given: Any, policy, origin: str) -> Any:
    if given is not None:
        return given
    if source == OWN:
        return None
    if source == CONTROLNET_IN_MEMORY:
        raise RecipeError(f"{origin}: the ControlNet was an in-memory model; pass it again (controlnet= / --controlnet)")
    path = Path(source).expanduser()
    if path.exists() and policy is not None and not policy.permits(path):
        raise RecipeError(f"{origin}: the ControlNet {source} is outside the folders the recipe may read; pass it "
                          "with --controlnet or --allow-path its folder")
    return source


def recipe_control_lora(recipe, given: Any = None, policy=None, origin: str = "recipe") -> str | None:
    """``"file:weight"`` of the control LoRA that reproduces a control-lora recipe: ``given`` (a file) where passed,
    else the recorded file (allowed by ``policy``); either must have the recorded SHA-256. ``None`` for the other
    modes."""
    from pipelines.adapters.parse import file_sha256

    entry = recipe.control_lora
    if entry is None:
        if given is not None:
            raise RecipeError(f"{origin}: the recipe is {recipe.mode or TEXT2IMG} and takes no control LoRA")
        return None
    path = Path(given if given is not None else entry["source"]).expanduser()
    if given is None and policy is not None and not policy.permits(path):
        raise RecipeError(f"{origin}: the control LoRA {entry['source']} is outside the folders the recipe may read; "
                          "pass it with --control-lora or --allow-path its folder")
    if not path.is_file():
        raise RecipeError(f"{origin}: the control LoRA {path} is missing; pass the same file with --control-lora "
                          f"(sha256 {entry['sha256'][:12]}...)")
    if file_sha256(path) != entry["sha256"]:
        raise RecipeError(f"{origin}: {path} is not the control LoRA the recipe was made with (sha256 "
                          f"{entry['sha256'][:12]}... recorded); reproducing needs the same file")
    return f"{path}:{entry['weight']}"
