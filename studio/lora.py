"""`Lora`: one entry of a stack, and where its file comes from.

``Lora(source, weight=1.0, name=None, blocks=None, start=0.0, end=1.0)``; ``source`` is a ``.safetensors``
path, a name inside the configured LoRA library, a Hub id (``owner/repo`` or ``owner/repo/file.safetensors``)
or an in-memory state dict. Everywhere a LoRA is accepted, the string shorthand works too::

    "style.safetensors"                         weight 1
    "style.safetensors:0.8"                     weight 0.8
    "style.safetensors:0.8:start=0.2:end=0.9"   active for 20-90 % of the denoising steps
    "style.safetensors:0.6:blocks=down=0,mid=1" per-block weights (or a preset name, see families.py)
    "cat.safetensors:0.9:region=left:prompt=a black cat"
                                                for the ``regional`` strategy: the LoRA's region (a preset,
                                                fractions x0,y0,x1,y1 or a mask image file) and region prompt
                                                (the shorthand's prompt may not contain ':')
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from pipelines.errors import LoraFileError, StudioError

if TYPE_CHECKING:
    import torch


@dataclass
class Lora:
    source: str | Path | dict[str, torch.Tensor]
    weight: float = 1.0
    name: str | None = None
    blocks: Mapping[str, float] | str | None = None
    start: float = 0.0
    end: float = 1.0
    region: str | None = None
    prompt: str | None = None
    metadata: dict[str, str] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        for attr in ("weight", "start", "end"):
            value = getattr(self, attr)
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise StudioError(f"LoRA {self.label}: {attr} must be a number, got {value!r}") from None
            if not math.isfinite(value):
                raise StudioError(f"LoRA {self.label}: {attr} must be a finite number, got {value!r}")
            setattr(self, attr, value)
        if not (0.0 <= self.start < self.end <= 1.0):
            raise StudioError(f"LoRA {self.label}: step window must satisfy 0 <= start < end <= 1")
        if not isinstance(self.source, (str, Path, dict)):
            raise StudioError(f"LoRA source must be a path, a name or a state dict, got {type(self.source).__name__}")
        from .settings import check_blocks

        check_blocks(self.blocks, f"LoRA {self.label}")
        if self.region is not None:
            from fusion.region_masks import check_region

            self.region = check_region(self.region, f"LoRA {self.label}")  # StrategyError is a StudioError
        if self.prompt is not None:
            if not isinstance(self.prompt, str):
                raise StudioError(f"LoRA {self.label}: prompt must be text, got {type(self.prompt).__name__}")
            if len(self.prompt) > 20_000:
                raise StudioError(f"LoRA {self.label}: prompt has {len(self.prompt)} characters; at most 20000")
            self.prompt = self.prompt.strip() or None

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if isinstance(self.source, dict):
            return "<state dict>"
        return Path(str(self.source)).stem

    @classmethod
    def parse(cls, spec: "str | Lora | Mapping[str, Any]") -> "Lora":
        """Accept a ``Lora``, a dict of its fields, or the ``path[:weight][:key=value...]`` shorthand."""
        if isinstance(spec, Lora):
            return spec
        if isinstance(spec, Mapping):
            unknown = sorted(str(k) for k in set(spec) - set(cls.__dataclass_fields__))
            if unknown:
                raise StudioError(f"a LoRA table has unknown keys {unknown[:4]} (valid: source, weight, name, blocks, "
                                  "start, end, region, prompt; a state dict goes in Lora(source=...))")
            if "source" not in spec:
                raise StudioError("a LoRA table needs a 'source'")
            return cls(**dict(spec))
        if not isinstance(spec, (str, Path)):
            raise StudioError(f"cannot read a LoRA from {type(spec).__name__}")
        text = str(spec)
        fields = text.split(":")
        # keep Windows drive letters ("C:\\loras\\x.safetensors") in the path
        if len(fields) > 1 and re.fullmatch(r"[A-Za-z]", fields[0]) and fields[1].startswith(("\\", "/")):
            fields = [fields[0] + ":" + fields[1], *fields[2:]]
        path, rest = fields[0], fields[1:]
        kwargs: dict[str, Any] = {}
        for item in rest:
            if "=" in item:
                key, value = item.split("=", 1)
                key = key.strip()
                if key not in ("start", "end", "blocks", "name", "weight", "region", "prompt"):
                    raise StudioError(f"LoRA spec '{text}': unknown option '{key}' (start, end, blocks, name, weight, "
                                      "region, prompt)")
                kwargs[key] = value
            elif "weight" not in kwargs:
                kwargs["weight"] = item
            else:
                raise StudioError(f"LoRA spec '{text}': cannot read '{item}'")
        return cls(source=path, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source": str(self.source) if not isinstance(self.source, dict) else "<state dict>",
                               "weight": self.weight}
        if self.name:
            out["name"] = self.name
        if self.blocks:
            out["blocks"] = dict(self.blocks) if not isinstance(self.blocks, str) else self.blocks
        if self.start != 0.0:
            out["start"] = self.start
        if self.end != 1.0:
            out["end"] = self.end
        if self.region is not None:
            out["region"] = self.region
        if self.prompt is not None:
            out["prompt"] = self.prompt
        return out


def within(root: Path, candidate: Path) -> bool:
    try:
        candidate.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def resolve_source(source: str | Path, lora_dir: str | Path | None = None) -> Path:
    """A local file for ``source``: a path, a library name, or a file downloaded from the Hub.

    With ``lora_dir`` set, relative names resolve inside it and may not escape it (``../`` or symlinks).
    """
    text = str(source)
    if lora_dir is not None:
        root = Path(lora_dir).expanduser()
        candidates = [Path(text)] if Path(text).is_absolute() else [root / text, root / f"{text}.safetensors"]
        for candidate in candidates:
            if candidate.exists():
                if not within(root, candidate):
                    raise LoraFileError(text, f"is outside the LoRA library {root}")
                return candidate.resolve()
        if any(not within(root, c) for c in candidates):
            raise LoraFileError(text, f"is outside the LoRA library {root}")
        if not re.fullmatch(r"[\w.-]+/[\w.-]+(/[\w./-]+\.safetensors)?", text):
            raise LoraFileError(text, f"not found in the LoRA library {root}")
    path = Path(text).expanduser()
    if path.exists():
        return path
    looks_local = path.is_absolute() or text.startswith((".", "~")) or "\\" in text
    if not looks_local and (
        re.fullmatch(r"[\w.-]+/[\w.-]+(/[\w./-]+\.safetensors)?", text) and not text.endswith(".safetensors")
        or (text.count("/") >= 2 and text.endswith(".safetensors") and not path.parent.exists())
    ):
        return _download(text)
    where = "no such folder" if not path.parent.exists() else "no such file in that folder"
    raise LoraFileError(text, f"file not found ({where}: {path.parent})" if looks_local else "file not found")


def _download(hub_id: str) -> Path:
    from huggingface_hub import hf_hub_download

    parts = hub_id.split("/")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:]) or "pytorch_lora_weights.safetensors"
    try:
        return Path(hf_hub_download(repo, filename))
    except Exception as e:  # offline, missing repo or file
        raise LoraFileError(hub_id, f"is not a local file, and fetching it as Hugging Face Hub id {repo!r} (file "
                                    f"{filename!r}) failed ({e.__class__.__name__}: {e})") from None
