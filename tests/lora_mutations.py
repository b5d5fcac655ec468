"""Hostile and damaged LoRA files made from good ones, and how a load of each is classified.

Used by ``tests/test_hostile_fuzz.py`` (a small seeded sample) and ``benchmarks/fuzz_loader.py`` (a large
seeded corpus). Each *family* damages a file the way an attacker or a broken tool would: at the container level
(truncation, header length, nested brackets, offsets, dtypes, shapes, metadata) or at the tensor level (a factor
removed, renamed or added, values scaled to float16's maximum or ×10³⁰, NaN, a rank that disagrees, empty or
scalar tensors, a vector alpha, a wrong-length ``dora_scale``, integer tensors, a LoKr whose Kronecker product is
huge). Each family says what a correct loader must do with it:

* ``refuse``: the file is broken or cannot be a trained LoRA: a clean :class:`StudioError` is required;
* ``no-silent-drop``: part of the file would be lost: a clean error, or a load that warns what was dropped;
* ``any``: the mutation may leave a valid file (e.g. a byte flipped inside a metadata string): loading it is
  fine, but never a raw exception, a hang, or a load that silently drops part of the file.

:func:`classify` loads one file into a studio and returns the outcome class; the studio must hold no adapter
afterwards (a failed load must leave nothing attached).
"""

from __future__ import annotations

import json
import random
import struct
import time
import warnings
from dataclasses import dataclass

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

# ------------------------------------------------------------------------------------------ container helpers


def split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def pack(header: dict | str, body: bytes) -> bytes:
    text = header if isinstance(header, str) else json.dumps(header, separators=(",", ":"))
    raw = text.encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def tensors_of(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    header, _ = split(data)
    return dict(st_load(data)), dict(header.get("__metadata__") or {})


def save(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    return st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata or None)


def _entries(header: dict) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


def _matrices(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k for k, v in tensors.items() if v.dim() >= 2)


# ------------------------------------------------------------------------------------------ families
# each: (data, rng) -> (new bytes, short description)


def truncate(data, rng):
    cut = rng.randrange(1, len(data))
    return data[:cut], f"cut at byte {cut} of {len(data)}"


def header_length(data, rng):
    value = rng.choice([0, 1, 7, len(data), len(data) * 4, 2**40, 2**64 - 1])
    return struct.pack("<Q", value) + data[8:], f"header length field = {value}"


def header_bytes(data, rng):
    (n,) = struct.unpack("<Q", data[:8])
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        i = 8 + rng.randrange(n)
        out[i] = rng.choice(b'{}[]":,0123456789aeE-. \x00\xff')
    return bytes(out), "bytes of the JSON header overwritten"


def nested_brackets(data, rng):
    depth = rng.choice([10_000, 100_000])
    opener = rng.choice(["[", '{"a":'])
    return pack(opener * depth, b""), f"a header of {depth} nested '{opener}'"


def offsets_type(data, rng):
    header, body = split(data)
    key = rng.choice(_entries(header))
    start, end = header[key]["data_offsets"]
    header[key]["data_offsets"] = rng.choice([[str(start), str(end)], [start], [float(start), float(end)], None,
                                              [start, end, end], {"start": start}, [True, end]])
    return pack(header, body), f"data_offsets of '{key}' of the wrong type"


def offsets_range(data, rng):
    header, body = split(data)
    keys = _entries(header)
    key = rng.choice(keys)
    start, end = header[key]["data_offsets"]
    other = header[rng.choice(keys)]["data_offsets"]
    header[key]["data_offsets"] = rng.choice([[-1, end], [end, start], [start, len(body) + 64], [0, 2**62],
                                              list(other) if other != [start, end] else [end, start]])
    return pack(header, body), f"data_offsets of '{key}' out of range, reversed or overlapping"


def dtype_relabel(data, rng):
    header, body = split(data)
    key = rng.choice(_entries(header))
    new = rng.choice(["I16", "U16", "BOOL", "F8_E4M3", "F8_E5M2", "I8", "I32", "I64", "F32", "BF16", "XYZ", 5])
    header[key]["dtype"] = new
    return pack(header, body), f"'{key}' relabelled {new}"


def shape_edit(data, rng):
    header, body = split(data)
    key = rng.choice(_entries(header))
    shape = header[key]["shape"]
    options = [list(reversed(shape)), shape + [1] if shape else [2], [0] + shape[1:] if shape else [0], ["2", "3"],
               [-1, 4], [s * 2 for s in shape] if shape else [3], [2**40, 2**40]]
    options = [o for o in options if o != shape]  # every option breaks the file (a square's reverse would not)
    header[key]["shape"] = rng.choice(options)
    return pack(header, body), f"shape of '{key}' changed to {header[key]['shape']}"


def metadata_junk(data, rng):
    header, body = split(data)
    meta = dict(header.get("__metadata__") or {})
    choice = rng.randrange(9)
    if choice == 0:
        meta["ss_tag_frequency"] = json.dumps({"set": {"zorb": "many", "x": [1], "y": None}})
    elif choice == 1:
        meta["ss_network_dim"] = "²"
    elif choice == 2:
        meta["ss_tag_frequency"] = "[" * 50_000
    elif choice == 3:
        meta = {"ss_network_dim": 5, "x": {"nested": True}}
    elif choice == 4:
        meta["lora_adapter_metadata"] = rng.choice(["[1, 2]", "{not json", '{"unet.r": "abc"}', "[" * 20_000])
    elif choice == 5:
        meta["ss_base_model_version"] = rng.choice(["sd_v1", "flux1", "sd3", "sd_v2"])
    elif choice == 6:
        meta["ss_network_alpha"] = rng.choice(["nan", "inf", "x", "1e999"])
    elif choice == 7:
        meta["modelspec.trigger_phrase"] = "a, " * 20_000
    else:
        meta["qr_lora.bases"] = rng.choice(["../../etc/passwd", "/etc/shadow", "x.safetensors"])
    header["__metadata__"] = meta
    return pack(header, body), f"metadata mutation #{choice}"


def _retensor(fn):
    """A family that edits the tensors (re-serialised with the safetensors writer)."""

    def family(data, rng):
        tensors, meta = tensors_of(data)
        description = fn(tensors, meta, rng)
        return save(tensors, meta), description

    family.__name__ = fn.__name__
    return family


@_retensor
def drop_factor(t, meta, rng):
    key = rng.choice([k for k in t if not k.endswith(".alpha")])
    del t[key]
    return f"'{key}' removed"


@_retensor
def rename_key(t, meta, rng):
    key = rng.choice(sorted(t))
    new = rng.choice([key + "_x", key.replace(".", ".renamed_", 1), "x" + key, key.replace("lora", "lorb", 1)])
    if new == key:
        new = key + "_x"
    t[new] = t.pop(key)
    return f"'{key}' renamed '{new}'"


@_retensor
def add_key(t, meta, rng):
    module = rng.choice(sorted(t)).split(".")[0]
    new = rng.choice([f"{module}.bogus", f"{module}.lora_mid_x.weight", "lora_unet_nowhere.lora_down.weight",
                      f"{module}.hada_w1_a" if "lora_down" in " ".join(t) else f"{module}.lora_down.weight"])
    t[new] = torch.randn(4, 4, dtype=torch.float16) * 0.01
    return f"'{new}' added"


@_retensor
def huge_values(t, meta, rng):
    key = rng.choice(_matrices(t))
    how = rng.choice(["fp16max", "1e30", "1e5", "1e8"])
    value = t[key].float()
    if how == "fp16max":
        value = torch.full_like(value, 65504.0)
    else:
        value = value * float(how) + (float(how) if value.abs().max() == 0 else 0.0)
    t[key] = value.to(torch.float32)
    return f"'{key}' scaled ({how})"


@_retensor
def non_finite(t, meta, rng):
    key = rng.choice(sorted(t))
    value = t[key].clone().float()
    value.view(-1)[rng.randrange(value.numel())] = rng.choice([float("nan"), float("inf"), float("-inf")])
    t[key] = value
    return f"'{key}' holds a NaN or an infinity"


@_retensor
def wrong_rank(t, meta, rng):
    key = rng.choice(_matrices(t))
    value = t[key]
    axis = rng.randrange(value.dim())
    pad = torch.zeros(*[1 if d == axis else s for d, s in enumerate(value.shape)], dtype=value.dtype)
    t[key] = torch.cat([value, pad], dim=axis)
    return f"'{key}' one wider along axis {axis}"


@_retensor
def empty_axis(t, meta, rng):
    key = rng.choice(_matrices(t))
    shape = list(t[key].shape)
    shape[rng.randrange(len(shape))] = 0
    t[key] = torch.zeros(shape, dtype=t[key].dtype)
    return f"'{key}' with an empty axis {shape}"


@_retensor
def scalar_or_vector(t, meta, rng):
    key = rng.choice(_matrices(t))
    t[key] = rng.choice([torch.tensor(0.5), t[key].reshape(-1)[:7].clone(), t[key].reshape(-1).clone()])
    return f"'{key}' replaced by a {t[key].dim()}-D tensor"


@_retensor
def alpha_vector(t, meta, rng):
    alphas = [k for k in t if k.endswith(".alpha")]
    if not alphas:  # PEFT files keep alpha in metadata: give one module a vector "alpha" key instead
        module = rng.choice(sorted(t)).rsplit(".lora_", 1)[0]
        t[f"{module}.alpha"] = torch.ones(4)
        return f"'{module}.alpha' added as a vector"
    key = rng.choice(alphas)
    t[key] = rng.choice([torch.ones(4), torch.ones(0), torch.ones(2, 2)])
    return f"'{key}' replaced by shape {tuple(t[key].shape)}"


@_retensor
def integer_weights(t, meta, rng):
    key = rng.choice(_matrices(t))
    t[key] = rng.choice([(t[key].float() * 100).to(torch.int16), t[key] > 0, t[key].to(torch.int8),
                         t[key].float().to(torch.float8_e4m3fn)])
    return f"'{key}' stored as {t[key].dtype}"


@_retensor
def transpose_factor(t, meta, rng):
    key = rng.choice([k for k in _matrices(t) if t[k].dim() == 2 and t[k].shape[0] != t[k].shape[1]] or _matrices(t))
    t[key] = t[key].transpose(0, 1).contiguous() if t[key].dim() == 2 else t[key].flip(0)
    return f"'{key}' transposed"


@_retensor
def lokr_huge(t, meta, rng):
    module = rng.choice(sorted({k.split(".")[0] for k in t}))
    side = rng.choice([120, 256])
    for key in [k for k in t if k.startswith(module + ".")]:
        del t[key]
    t[f"{module}.lokr_w1"] = torch.randn(side, side, dtype=torch.float16) * 0.01
    t[f"{module}.lokr_w2"] = torch.randn(side, side, dtype=torch.float16) * 0.01
    if rng.random() < 0.5:
        t[f"{module}.lokr_w2"] = torch.randn(side, side, 3, 3, dtype=torch.float16) * 0.01
    return f"'{module}' replaced by a LoKr of two {side}x{side} factors"


@_retensor
def dora_wrong_length(t, meta, rng):
    module = rng.choice(sorted({k.split(".")[0] for k in t if not k.startswith(("text_encoder", "unet", "transformer"))}
                               or {k.rsplit(".lora_", 1)[0] for k in t}))
    length = rng.choice([1, 3, 1000])
    t[f"{module}.dora_scale"] = torch.ones(length, dtype=torch.float16)
    return f"'{module}.dora_scale' of length {length}"


@dataclass(frozen=True)
class Family:
    name: str
    make: object
    expect: str  # "refuse", "no-silent-drop" or "any"


FAMILIES = (
    Family("truncate", truncate, "refuse"),
    Family("header-length", header_length, "refuse"),
    Family("header-bytes", header_bytes, "any"),
    Family("nested-brackets", nested_brackets, "refuse"),
    Family("offsets-type", offsets_type, "refuse"),
    Family("offsets-range", offsets_range, "refuse"),
    Family("dtype-relabel", dtype_relabel, "any"),
    Family("shape-edit", shape_edit, "refuse"),
    Family("metadata-junk", metadata_junk, "any"),
    Family("drop-factor", drop_factor, "no-silent-drop"),
    Family("rename-key", rename_key, "no-silent-drop"),
    Family("add-key", add_key, "no-silent-drop"),
    Family("huge-values", huge_values, "refuse"),
    Family("non-finite", non_finite, "refuse"),
    Family("wrong-rank", wrong_rank, "refuse"),
    Family("empty-axis", empty_axis, "refuse"),
    Family("scalar-or-vector", scalar_or_vector, "refuse"),
    Family("alpha-vector", alpha_vector, "refuse"),
    Family("integer-weights", integer_weights, "refuse"),
    Family("transpose-factor", transpose_factor, "refuse"),
    Family("lokr-huge", lokr_huge, "refuse"),
    Family("dora-wrong-length", dora_wrong_length, "refuse"),
)


def make_case(data: bytes, family: Family, seed: int) -> tuple[bytes, str]:
    return family.make(data, random.Random(seed))


# ------------------------------------------------------------------------------------------ classification
CLEAN_ERROR = "clean error"
OTHER_EXCEPTION = "other exception"
HANG = "hang (> 5 s)"
LOADED_WARNED = "loaded, with a warning of what was dropped"
LOADED_COMPLETE = "loaded complete (mutation left a valid file)"
SILENT_PARTIAL = "silently accepted: part of the file dropped"
SILENT_BAD = "silently accepted: should have been refused"
STALE = "adapters left attached after a failure"


@dataclass
class Outcome:
    kind: str
    seconds: float
    message: str = ""


def layer_count(studio, path) -> int:
    """How many layers a (good) file's load touches: a load of a mutation that touches fewer dropped part."""
    parsed = studio.inspect(path)
    return len(parsed.deltas)


def classify(studio, path, expect: str, baseline_layers: int, hang_s: float = 5.0) -> Outcome:
    """Load ``path`` into ``studio`` (holding no adapter), detach it again, and name what happened."""
    from pipelines.errors import StudioError

    assert not studio.composer.adapters
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            names = studio.load([path])
        except StudioError as e:
            kind, message = CLEAN_ERROR, str(e)
            names = None
        except Exception as e:  # noqa: BLE001 - the point is to count them
            kind, message = OTHER_EXCEPTION, f"{type(e).__name__}: {e}"
            names = None
    seconds = time.perf_counter() - t0
    if names is None:
        if studio.composer.adapters or studio.composer.layers:
            kind = STALE
            studio.unload()
        return Outcome(HANG if seconds > hang_s else kind, seconds, message[:300])
    parsed = studio.loaded()[names[0]]
    warned = bool(parsed.skipped) or any("dropped" in str(w.message) or "skipped" in str(w.message) for w in caught)
    touched = len(parsed.deltas)
    studio.unload()
    if seconds > hang_s:
        return Outcome(HANG, seconds)
    if warned:
        return Outcome(LOADED_WARNED, seconds, f"{len(parsed.skipped)} module(s) skipped")
    if touched < baseline_layers:
        return Outcome(SILENT_PARTIAL, seconds, f"{touched} of {baseline_layers} layers")
    if expect == "refuse":
        return Outcome(SILENT_BAD, seconds)
    return Outcome(LOADED_COMPLETE, seconds)


BAD = (OTHER_EXCEPTION, HANG, SILENT_PARTIAL, SILENT_BAD, STALE)
