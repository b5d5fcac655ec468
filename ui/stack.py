"""The LoRA stack being edited in the app: plain data kept in a per-session ``gr.State``.

An entry names its LoRA by library id only (never a path); :func:`to_loras` resolves the ids through the
:class:`studio.library.Library` when a job starts, so a crafted id is refused there.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Any, Mapping

from studio import Lora, StudioError
from studio.library import Library

ALL_BLOCKS = "all"
CUSTOM_BLOCKS = "custom"

_uids = itertools.count(1)


@dataclass(frozen=True)
class StackEntry:
    """One row of the stack editor."""

    lora_id: str
    label: str
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    preset: str = ALL_BLOCKS          # a block preset of the model family, or CUSTOM_BLOCKS
    custom_blocks: str = ""           # "down=0,mid=1" when preset is CUSTOM_BLOCKS
    enabled: bool = True
    uid: int = 0
    # region (ui.regions): "none", a preset box, "box" (region_box), "mask" (region_mask, a saved PNG) or "auto"
    region_kind: str = "none"
    region_box: str = ""              # "x0,y0,x1,y1" when region_kind is "box"
    region_mask: str = ""             # the app's saved mask file when region_kind is "mask"
    region_prompt: str = ""           # the region's own prompt ("" = none)

    @property
    def blocks(self) -> str | None:
        """The block spec handed to :class:`studio.Lora` (``None`` means every block at the LoRA's weight)."""
        if self.preset == CUSTOM_BLOCKS:
            return self.custom_blocks.strip() or None
        return None if self.preset == ALL_BLOCKS else self.preset

    @property
    def region(self) -> str | None:
        """The region handed to :class:`studio.Lora` (``None``: the whole image); a box or mask that is not set
        yet is refused here, naming the LoRA, so nothing renders with a half-made region."""
        kind = self.region_kind or "none"
        if kind == "none":
            return None
        if kind == "box":
            if not self.region_box.strip():
                raise StudioError(f"{self.label}: type the region's box as fractions x0,y0,x1,y1 (e.g. 0,0,0.5,1), "
                                  "or choose another region")
            return self.region_box.strip()
        if kind == "mask":
            if not self.region_mask:
                raise StudioError(f"{self.label}: its region is a mask, but none is drawn yet: paint the region on "
                                  "the row's canvas or upload a mask image (white = inside)")
            return self.region_mask
        return kind

    @property
    def has_region(self) -> bool:
        """Whether the entry has a region or a region prompt (only strategies with ``uses_regions`` read them)."""
        return (self.region_kind or "none") != "none" or bool(self.region_prompt.strip())


def new_entry(lora_id: str, label: str, **fields: Any) -> StackEntry:
    return StackEntry(lora_id=lora_id, label=label, uid=next(_uids), **fields)


def find(stack: list[StackEntry], uid: int) -> int:
    for i, entry in enumerate(stack):
        if entry.uid == uid:
            return i
    raise StudioError("that LoRA is no longer in the stack")


def update(stack: list[StackEntry], uid: int, **fields: Any) -> list[StackEntry]:
    i = find(stack, uid)
    out = list(stack)
    out[i] = replace(stack[i], **fields)
    return out


def remove(stack: list[StackEntry], uid: int) -> list[StackEntry]:
    i = find(stack, uid)
    return stack[:i] + stack[i + 1:]


def move(stack: list[StackEntry], uid: int, offset: int) -> list[StackEntry]:
    """Move an entry up (``offset=-1``) or down (``+1``); order matters for switch-like strategies."""
    i = find(stack, uid)
    j = min(max(i + offset, 0), len(stack) - 1)
    out = list(stack)
    out.insert(j, out.pop(i))
    return out


def to_loras(stack: list[StackEntry], library: Library, *, regions: bool = True) -> list[Lora]:
    """The enabled entries as :class:`studio.Lora` objects with files resolved through ``library``; with
    ``regions=False`` without their regions and region prompts (for a strategy that does not read them)."""
    loras = []
    for entry in stack:
        if not entry.enabled:
            continue
        path = library.path(entry.lora_id)
        region = dict(region=entry.region, prompt=entry.region_prompt.strip() or None) if regions else {}
        loras.append(Lora(source=path, weight=entry.weight, blocks=entry.blocks, start=entry.start, end=entry.end,
                          **region))
    return loras


def blocks_fields(blocks: str | Mapping[str, float] | None, presets: Mapping[str, Any]) -> dict[str, str]:
    """``preset``/``custom_blocks`` fields for a recipe's ``blocks`` value."""
    if not blocks:
        return {"preset": ALL_BLOCKS, "custom_blocks": ""}
    if isinstance(blocks, str) and blocks in presets:
        return {"preset": blocks, "custom_blocks": ""}
    if isinstance(blocks, Mapping):
        blocks = ",".join(f"{k}={float(v):g}" for k, v in blocks.items())
    return {"preset": CUSTOM_BLOCKS, "custom_blocks": str(blocks)}
