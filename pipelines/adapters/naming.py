"""Where does a LoRA key land? Mapping file-side module names onto the pipeline's modules.

Two mechanisms, both exact:

1. **Module table.** kohya/LyCORIS names are the module path with ``.`` replaced by ``_`` behind a prefix
   (``lora_unet_down_blocks_1_attentions_0_..._to_q``, ``lycoris_transformer_blocks_0_attn_to_q``,
   ``lora_te1_text_model_encoder_layers_0_self_attn_q_proj``). A table built from the live model's module
   names resolves them without guessing.
2. **diffusers' own converters, probed.** Names in other layouts (SDXL's SGM ``input_blocks_4_1_...``, FLUX's
   BFL ``double_blocks_0_img_attn_qkv`` with fused q/k/v and the swapped final-layer scale/shift) are mapped by
   running diffusers' converter on a *probe*: one rank-1 entry per file module whose ``lora_down`` carries the
   module's id and whose ``lora_up`` carries its output-row numbers. Whatever the converter renames, splits or
   permutes, the probe's outputs tell which target got which rows of which source module. The studio thus
   never re-implements a diffusers converter, and it handles adapter kinds diffusers cannot load (LoHa, LoKr,
   DoRA), since only the names go through diffusers.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from ..families import Family

_TABLES: "weakref.WeakKeyDictionary[nn.Module, dict[str, str]]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Target:
    component: str
    path: str
    rows: torch.Tensor | None = None  # output rows of the source module that land here (None: all, in order)

    @property
    def key(self) -> str:
        return f"{self.component}.{self.path}"


def adaptable_modules(module: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def module_table(component: nn.Module) -> dict[str, str]:
    """Underscored module name -> dotted path, for every Linear/Conv2d of ``component``."""
    table = _TABLES.get(component)
    if table is None:
        table, clashes = {}, set()
        for name in adaptable_modules(component):
            key = name.replace(".", "_")
            if key in table:
                clashes.add(key)
            table[key] = name
        for key in clashes:  # ambiguous underscore spellings resolve through the probe instead
            table.pop(key)
        _TABLES[component] = table
    return table


def normalize_component_path(component: nn.Module, path: str) -> str:
    """Accept ``text_model.``-prefixed names on text encoders that (in transformers 5) lost that wrapper."""
    if path.startswith("text_model.") and not hasattr(component, "text_model"):
        return path.removeprefix("text_model.")
    return path


def split_prefix(family: Family, name: str) -> tuple[str, str] | None:
    """``lora_te2_text_model_...`` -> (``text_encoder_2``, ``text_model_...``)."""
    for prefix in sorted(family.key_prefixes, key=len, reverse=True):
        if name.startswith(prefix):
            return family.key_prefixes[prefix], name[len(prefix) :]
    return None


def resolve_by_table(family: Family, pipe, name: str) -> Target | None:
    split = split_prefix(family, name)
    if split is None:
        return None
    component_name, rest = split
    component = getattr(pipe, component_name, None)
    if component is None:
        return None
    table = module_table(component)
    path = table.get(rest)
    if path is None and rest.startswith("text_model_") and not hasattr(component, "text_model"):
        path = table.get(rest.removeprefix("text_model_"))
    return None if path is None else Target(component_name, path)


def resolve_by_probe(family: Family, pipe, names: dict[str, int]) -> dict[str, list[Target]]:
    """Map kohya-style module ``names`` (with their output sizes) through diffusers' converter.

    Returns the targets of each name it could map; names the converter rejects or drops are absent.
    """
    if not names:
        return {}
    order = list(names)
    probe: dict[str, torch.Tensor] = {}
    for ident, name in enumerate(order, start=1):
        probe[f"{name}.lora_down.weight"] = torch.full((1, 1), float(ident))
        probe[f"{name}.lora_up.weight"] = torch.arange(names[name], dtype=torch.float32).reshape(-1, 1)
        probe[f"{name}.alpha"] = torch.tensor(1.0)
    try:
        converted = _convert_with_diffusers(family, pipe, probe)
    except Exception:
        return {}
    downs: dict[str, torch.Tensor] = {}
    ups: dict[str, torch.Tensor] = {}
    for key, value in converted.items():
        if key.endswith(".lora_A.weight"):
            downs[key.removesuffix(".lora_A.weight")] = value
        elif key.endswith(".lora_B.weight"):
            ups[key.removesuffix(".lora_B.weight")] = value
    result: dict[str, list[Target]] = {}
    valid: dict[str, set[str]] = {}
    for module_key, down in downs.items():
        if module_key not in ups or down.numel() == 0:
            continue
        ident = int(round(float(down.reshape(-1)[0])))
        if not 1 <= ident <= len(order):
            continue
        component_name, _, path = module_key.partition(".")
        component = getattr(pipe, component_name, None)
        if component is None:
            continue
        path = normalize_component_path(component, path)
        if component_name not in valid:
            valid[component_name] = set(module_table(component).values())
        if path not in valid[component_name]:
            continue  # the converter renamed it, but no such layer exists in this model
        rows = ups[module_key].reshape(-1).round().long()
        source_rows = names[order[ident - 1]]
        full = rows.numel() == source_rows and torch.equal(rows, torch.arange(source_rows))
        result.setdefault(order[ident - 1], []).append(Target(component_name, path, None if full else rows))
    return result


def _convert_with_diffusers(family: Family, pipe, probe: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run the family's diffusers converter and bring the result to PEFT key names."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    cls = family.pipeline_class
    if family.name == "sdxl":
        state_dict, _ = cls.lora_state_dict(dict(probe), unet_config=pipe.unet.config)
    else:
        state_dict = cls.lora_state_dict(dict(probe))
        if isinstance(state_dict, tuple):
            state_dict = state_dict[0]
    out: dict[str, torch.Tensor] = {}
    by_component: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        component, _, rest = key.partition(".")
        if component not in family.components():
            # diffusers' FLUX converter leaves the embedders and the output head without the
            # "transformer." prefix; un-prefixed keys belong to the denoiser
            component, rest = family.denoiser, key
        by_component.setdefault(component, {})[rest] = value
    for component, sd in by_component.items():
        if not any("lora_A" in k for k in sd):
            if component == family.denoiser:
                sd = convert_unet_state_dict_to_peft(sd)
            else:
                sd = convert_state_dict_to_peft(convert_state_dict_to_diffusers(sd))
        out.update({f"{component}.{k}": v for k, v in sd.items()})
    return out
