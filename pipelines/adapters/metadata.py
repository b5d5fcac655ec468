"""What a LoRA file says about itself: name, format, base model, rank, trigger words.

Read from the safetensors header only (key names, shapes and ``__metadata__``), so listing a library of
hundreds of files is fast. kohya writes ``ss_*`` keys (``ss_output_name``, ``ss_base_model_version``,
``ss_network_dim``, ``ss_tag_frequency``, ...), the Stability "modelspec" writes ``modelspec.*`` keys
(``modelspec.title``, ``modelspec.architecture``, ``modelspec.trigger_phrase``).
"""

from __future__ import annotations

import collections
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..safetensors_io import check_safetensors_file
from .not_adapters import GATES_FORMAT, NOT_ADAPTERS  # noqa: F401  (files a library lists as no LoRA)

BASE_NAMES = {
    "sd1": "Stable Diffusion 1.x",
    "sd2": "Stable Diffusion 2.x",
    "sdxl": "SDXL",
    "sd3": "Stable Diffusion 3",
    "flux": "FLUX.1",
}


@dataclass
class LoraInfo:
    path: str | None
    name: str
    format: str
    base: str | None
    base_evidence: str
    rank: int | None
    alpha: float | None
    triggers: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    size_bytes: int = 0

    @property
    def base_name(self) -> str:
        return BASE_NAMES.get(self.base or "", "unknown")


def detect_format(keys: list[str]) -> str:
    """A short label for the file layout (used for routing and shown in the library)."""
    joined = "\n".join(keys)
    if ".lora.delta_r.weight" in joined:
        return "qr-lora"
    if ".lora.q.weight" in joined and ".lora.base_r.weight" in joined:
        return "qr-bases"  # the shared Q and R of QR-LoRA adapters, not an adapter itself
    if "query_norm.scale" in joined and "lora_A" in joined:
        return "bfl-control"
    if ".shira_indices" in joined or ".sparse_delta.indices" in joined:
        return "shira"  # sparse high-rank adapters (kinds.shira), PEFT's SHiRA layout or plain sparse deltas
    if ".processor.proj_lora" in joined or ".processor.qkv_lora" in joined:
        return "xlabs"
    if ".lora_A." in joined or ".lora_B." in joined or joined.endswith(".lora_A.weight"):
        return "peft"
    if re.search(r"(_lora\.(down|up)\.weight|\.lora\.(down|up)\.weight|lora_linear_layer)", joined):
        return "diffusers-old"
    suffixes = {k.split(".", 1)[1] for k in keys if "." in k}
    has_dora = any(s == "dora_scale" for s in suffixes)
    if any(s.startswith("hada_") for s in suffixes):
        kind = "loha"
    elif any(s.startswith("lokr_") for s in suffixes):
        kind = "lokr"
    elif "diff" in suffixes:
        kind = "full"
    elif "lora_down.weight" in suffixes:
        kind = "lora"
    else:
        return "unknown"
    if kind == "lora" and not has_dora:
        return "lycoris-locon" if any(k.startswith("lycoris_") for k in keys) else "kohya"
    return f"lycoris-{kind}" + ("+dora" if has_dora else "")


def _base_from_metadata(metadata: dict[str, str]) -> str | None:
    version = metadata.get("ss_base_model_version", "").lower()
    arch = metadata.get("modelspec.architecture", "").lower()
    qr_base = metadata.get("qr_lora.base_model", "").lower()  # QR-LoRA files name their base model
    for text in (arch, version, qr_base):
        if not text:
            continue
        if "flux" in text:
            return "flux"
        if "xl" in text:
            return "sdxl"
        if "v3" in text or text.startswith("sd3") or "stable-diffusion-3" in text:
            return "sd3"
        if "v2" in text or text.startswith("sd_v2"):
            return "sd2"
        if "v1" in text or text.startswith("sd_v1"):
            return "sd1"
    if metadata.get("ss_v2", "").lower() == "true":
        return "sd2"
    return None


def _base_from_keys(shapes: dict[str, tuple[int, ...]]) -> str | None:
    keys = list(shapes)
    joined = "\n".join(keys)
    if re.search(r"double_blocks|single_blocks|single_transformer_blocks|lora_transformer_single", joined):
        return "flux"
    if "joint_blocks" in joined or "context_block" in joined:
        return "sd3"
    if re.search(r"lora_te2_|text_encoder_2\.|conditioner_embedders|label_emb|add_embedding", joined):
        return "sdxl"
    has_single_te = re.search(r"(^|\n)lora_te_", joined) is not None
    first_level_attention = re.search(r"down_blocks[._]0[._]attentions|input_blocks[._]1[._]1[._]", joined)
    if has_single_te or first_level_attention:
        # SD 2.x's OpenCLIP text encoder has 23 layers and 1024-wide cross-attention; SD 1.x has 12 / 768.
        deep_te = re.search(r"encoder_layers_(1[2-9]|2\d)_", joined) is not None
        wide_context = any(
            "attn2_to_k" in k and ("lora_down" in k or "lora_A" in k) and shape[-1] == 1024
            for k, shape in shapes.items()
        )
        return "sd2" if deep_te or wide_context else "sd1"
    return None


def guess_base(shapes: dict[str, tuple[int, ...]], metadata: dict[str, str]) -> tuple[str | None, str]:
    """(base, evidence): metadata wins over key layout; ``None`` when neither says."""
    base = _base_from_metadata(metadata)
    if base:
        return base, "metadata"
    base = _base_from_keys(shapes)
    return (base, "key layout") if base else (None, "unknown")


def _tag_count(value) -> int:
    """A tag's count from ``ss_tag_frequency`` (hand-edited files hold strings or junk there: those count 0)."""
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return 0


def trigger_words(metadata: dict[str, str], limit: int = 8) -> list[str]:
    """The file's declared ``modelspec.trigger_phrase``; only when it declares none, the most frequent training
    tags of ``ss_tag_frequency`` (those also hold generic caption words, such as a category, that are no
    trigger: the tiny world's "zorb" LoRA was tagged "zorb" and "subject")."""
    words: list[str] = []
    phrase = metadata.get("modelspec.trigger_phrase", "").strip()
    if phrase:
        words += [w.strip() for w in phrase.split(",") if w.strip()]
    raw = metadata.get("ss_tag_frequency")
    if raw and not words:
        try:
            freq = json.loads(raw)
        except (json.JSONDecodeError, RecursionError):  # untrusted text: broken, or nested too deeply
            freq = {}
        counts: collections.Counter = collections.Counter()
        for tags in freq.values() if isinstance(freq, dict) else ():
            if isinstance(tags, dict):
                counts.update({str(t).strip(): _tag_count(n) for t, n in tags.items() if str(t).strip()})
        for tag, _ in counts.most_common():
            if tag not in words:
                words.append(tag)
            if len(words) >= limit:
                break
    return words[:limit]


def _rank_and_alpha(shapes: dict[str, tuple[int, ...]], metadata: dict[str, str]) -> tuple[int | None, float | None]:
    ranks = collections.Counter()
    for key, shape in shapes.items():
        if key.endswith(("lora_down.weight", "lora_A.weight", "hada_w1_b", "lokr_w2_b", "lokr_w1_b",
                         "lora.delta_r.weight")) and shape:
            ranks[shape[0]] += 1
    rank = ranks.most_common(1)[0][0] if ranks else None
    dim = metadata.get("ss_network_dim", "")
    if rank is None and re.fullmatch(r"[0-9]{1,7}", dim):  # ASCII digits only: "²".isdigit() is True
        rank = int(dim)
    alpha = None
    try:
        alpha = float(metadata["ss_network_alpha"]) if "ss_network_alpha" in metadata else None
    except ValueError:
        alpha = None
    if alpha is not None and not math.isfinite(alpha):
        alpha = None
    return rank, alpha


def describe_header(
    path: str | None, shapes: dict[str, tuple[int, ...]], metadata: dict[str, str], size_bytes: int = 0
) -> LoraInfo:
    base, evidence = guess_base(shapes, metadata)
    rank, alpha = _rank_and_alpha(shapes, metadata)
    stem = Path(path).stem if path else "lora"
    name = metadata.get("ss_output_name") or metadata.get("modelspec.title") or stem
    kind = GATES_FORMAT if metadata.get("format") == GATES_FORMAT else detect_format(list(shapes))
    return LoraInfo(
        path=path,
        name=name,
        format="gates" if kind == GATES_FORMAT else kind,
        base=base,
        base_evidence=evidence,
        rank=rank,
        alpha=alpha,
        triggers=trigger_words(metadata),
        metadata=metadata,
        size_bytes=size_bytes,
    )


def describe(path: str | Path) -> LoraInfo:
    """Describe a LoRA file from its header (no tensor is read)."""
    header = check_safetensors_file(path)
    metadata = {str(k): str(v) for k, v in (header.get("__metadata__") or {}).items()}
    shapes = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    return describe_header(str(path), shapes, metadata, Path(path).stat().st_size)
