"""Hostile and damaged LoRA files (issue 15): each reproducer gets a clear error naming the file and the problem,
the work a file may cause is bounded before it is done, and nothing stays attached: the no-LoRA image after every
failure is bit-identical to the one before.

The files are the shipped tiny-world LoRAs (kohya LoRA, PEFT, LyCORIS LoHa and LoKr) edited the way a broken tool
or an attacker would.
"""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import lora_mutations as mut
from pipelines.errors import IncompatibleLoraError, LoraFileError, StudioError
from pipelines.adapters.metadata import describe
from studio import Lora, Studio

ROOT = Path(__file__).resolve().parent.parent
WORLD = ROOT / "assets" / "loras" / "tiny-sdxl"
KOHYA = WORLD / "subject-zorb.safetensors"       # lora_down / lora_up / alpha
PEFT = WORLD / "subject-quix.safetensors"        # lora_A / lora_B
LOHA = WORLD / "style-striped.safetensors"
LOKR = WORLD / "background-bricks.safetensors"


@pytest.fixture(scope="module")
def studio():
    return Studio("tiny-sdxl")


@pytest.fixture(scope="module")
def no_lora_image(studio):
    return _image(studio)


def _image(studio) -> np.ndarray:
    return np.asarray(studio.compose("a zorb", [], seed=3, steps=2).image)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _edit(tmp_path, source: Path, name: str, edit) -> Path:
    tensors, meta = mut.tensors_of(source.read_bytes())
    edit(tensors, meta)
    return _write(tmp_path / name, mut.save(tensors, meta))


def _refused(studio, no_lora_image, files, error, match):
    """Loading ``files`` raises ``error`` matching ``match``; afterwards nothing is attached and the no-LoRA
    image is bit-identical."""
    with pytest.raises(error, match=match):
        studio.load(files)
    assert studio.composer.adapters == {} and studio.composer.layers == {}
    assert np.array_equal(_image(studio), no_lora_image)


# ------------------------------------------------------------------------------------------ container
def test_a_header_of_nested_brackets_is_refused_not_a_recursion_error(studio, no_lora_image, tmp_path):
    path = _write(tmp_path / "deep.safetensors", mut.pack("[" * 100_000, b""))
    _refused(studio, no_lora_image, [path], LoraFileError, r"deep\.safetensors: corrupt safetensors header \(JSON nested")


@pytest.mark.parametrize("offsets, message", [
    (["0", "8"], "invalid data_offsets"),
    ([8, 0], "run backwards"),
    ([0, 2**62], "truncated: tensor"),
])
def test_bad_data_offsets(studio, no_lora_image, tmp_path, offsets, message):
    header, body = mut.split(KOHYA.read_bytes())
    key = mut._entries(header)[1]
    header[key]["data_offsets"] = offsets
    path = _write(tmp_path / "offsets.safetensors", mut.pack(header, body))
    _refused(studio, no_lora_image, [path], LoraFileError, rf"offsets\.safetensors: .*{message}")


def test_overlapping_tensors_are_refused(studio, no_lora_image, tmp_path):
    header, body = mut.split(KOHYA.read_bytes())
    first, second = mut._entries(header)[1:3]
    header[second]["data_offsets"] = header[first]["data_offsets"]
    header[second]["shape"], header[second]["dtype"] = header[first]["shape"], header[first]["dtype"]
    path = _write(tmp_path / "overlap.safetensors", mut.pack(header, body))
    _refused(studio, no_lora_image, [path], LoraFileError, "overlap in the data section")


def test_a_header_longer_than_the_cap_is_refused_unread(studio, no_lora_image, tmp_path):
    path = _write(tmp_path / "long.safetensors", struct.pack("<Q", 2**40) + b"{}")
    _refused(studio, no_lora_image, [path], LoraFileError, "more than the .* bytes a header may have")


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.bool, torch.int16])
def test_non_floating_tensors_are_refused_with_the_dtype_named(studio, no_lora_image, tmp_path, dtype):
    def edit(t, meta):
        key = next(k for k in t if k.endswith("lora_up.weight"))
        t[key] = (t[key].float() * 100).to(dtype)

    path = _edit(tmp_path, KOHYA, "ints.safetensors", edit)
    name = {torch.float8_e4m3fn: "F8_E4M3", torch.bool: "BOOL", torch.int16: "I16"}[dtype]
    _refused(studio, no_lora_image, [path], LoraFileError, f"lora_up.weight' is {name}; LoRA weights must be floating")


def test_float16_relabelled_int16_is_refused(studio, no_lora_image, tmp_path):
    header, body = mut.split(KOHYA.read_bytes())
    key = next(k for k in mut._entries(header) if k.endswith("lora_down.weight"))
    header[key]["dtype"] = "I16"
    path = _write(tmp_path / "relabel.safetensors", mut.pack(header, body))
    _refused(studio, no_lora_image, [path], LoraFileError, "is I16; LoRA weights must be floating point")


# ------------------------------------------------------------------------------------------ values
@pytest.mark.parametrize("how", ["fp16max", "1e30"])
def test_values_no_trained_lora_has_are_refused(studio, no_lora_image, tmp_path, how):
    def edit(t, meta):
        key = next(k for k in t if k.endswith("lora_up.weight"))
        t[key] = torch.full_like(t[key].float(), 65504.0) if how == "fp16max" else t[key].float() * 1e30

    path = _edit(tmp_path, KOHYA, "loud.safetensors", edit)
    _refused(studio, no_lora_image, [path], LoraFileError, r"loud\.safetensors: tensor .* holds values up to")


# ------------------------------------------------------------------------------------------ structure
def test_lora_B_one_column_wider_than_lora_A_is_refused_at_validation(studio, no_lora_image, tmp_path):
    def edit(t, meta):
        key = next(k for k in t if k.endswith("lora_B.weight") and "unet" in k and t[k].dim() == 2)
        t[key] = torch.cat([t[key], torch.zeros(t[key].shape[0], 1, dtype=t[key].dtype)], dim=1)

    path = _edit(tmp_path, PEFT, "wide.safetensors", edit)
    _refused(studio, no_lora_image, [path], IncompatibleLoraError, r"wide\.safetensors: .*lora_B has rank \d+ but lora_A")
    # a retry after the failure works like a first try: the good file loads and renders
    assert studio.load([PEFT]) and studio.compose("a zorb", [PEFT], seed=3, steps=2).images
    studio.unload()


def test_lora_A_without_lora_B_is_refused(studio, no_lora_image, tmp_path):
    def edit(t, meta):
        del t[next(k for k in t if k.endswith("lora_B.weight") and "unet" in k)]

    path = _edit(tmp_path, PEFT, "orphan.safetensors", edit)
    _refused(studio, no_lora_image, [path], IncompatibleLoraError, r"orphan\.safetensors: .*lora_A but no lora_B")


@pytest.mark.parametrize("suffix, message", [
    ("lora_up.weight", "'lora_up.weight' is missing"),
    ("lora_down.weight", "'lora_down.weight' is missing"),
])
def test_kohya_factor_without_its_partner_is_refused(studio, no_lora_image, tmp_path, suffix, message):
    def edit(t, meta):
        del t[next(k for k in t if k.endswith(suffix))]

    path = _edit(tmp_path, KOHYA, "half.safetensors", edit)
    _refused(studio, no_lora_image, [path], IncompatibleLoraError, f"half.safetensors: module .*{message}")


def test_a_lokr_with_a_missing_factor_is_refused(studio, no_lora_image, tmp_path):
    def edit(t, meta):
        del t[next(k for k in t if k.endswith(".lokr_w1"))]

    path = _edit(tmp_path, LOKR, "lokr.safetensors", edit)
    _refused(studio, no_lora_image, [path], IncompatibleLoraError, "Kronecker factor 1 is missing")


def test_a_huge_lokr_product_is_refused_by_its_size_before_computing(studio, no_lora_image, tmp_path):
    """The issue's 58 KB file: lokr_w1 and lokr_w2 both 120x120 on one conv (a 14400 x 14400 delta)."""
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    path = _write(tmp_path / "bomb.safetensors", mut.save({
        f"{conv}.lokr_w1": torch.randn(120, 120, dtype=torch.float16) * 0.01,
        f"{conv}.lokr_w2": torch.randn(120, 120, dtype=torch.float16) * 0.01,
    }, {}))
    assert path.stat().st_size < 60_000
    _refused(studio, no_lora_image, [path], IncompatibleLoraError,
             r"bomb\.safetensors: module .*14400 x 14400 delta, larger than any layer of this model")


@pytest.mark.parametrize("value, message", [
    (torch.ones(4), r"'alpha' must be a single number, got a tensor of shape \(4,\)"),
    (torch.ones(0), r"'alpha' must be a single number"),
])
def test_alpha_that_is_not_one_number(studio, no_lora_image, tmp_path, value, message):
    def edit(t, meta):
        t[next(k for k in t if k.endswith(".alpha"))] = value

    path = _edit(tmp_path, KOHYA, "alpha.safetensors", edit)
    _refused(studio, no_lora_image, [path], IncompatibleLoraError, message)


@pytest.mark.parametrize("replacement, message", [
    ("zero-rows", "empty axis"),
    ("scalar", "must be a 2-D or 4-D tensor"),
    ("vector", "must be a 2-D or 4-D tensor"),
])
def test_empty_scalar_or_1d_factors(studio, no_lora_image, tmp_path, replacement, message):
    def edit(t, meta):
        key = next(k for k in t if k.endswith("lora_down.weight"))
        t[key] = {"zero-rows": torch.zeros(0, t[key].shape[1]), "scalar": torch.tensor(0.1),
                  "vector": t[key].reshape(-1).clone()}[replacement]

    path = _edit(tmp_path, KOHYA, "shape.safetensors", edit)
    _refused(studio, no_lora_image, [path], IncompatibleLoraError, message)


def test_unknown_keys_are_refused_not_dropped(studio, no_lora_image, tmp_path):
    def edit(t, meta):
        key = next(k for k in t if k.endswith("lora_up.weight"))
        t[key.replace("lora_up.weight", "lora_upp.weight")] = t.pop(key)

    path = _edit(tmp_path, KOHYA, "renamed.safetensors", edit)
    _refused(studio, no_lora_image, [path], IncompatibleLoraError, "keys the studio does not know .*lora_upp.weight")


def test_a_module_naming_no_layer_loads_with_a_warning_naming_it(studio, tmp_path):
    def edit(t, meta):
        for key in [k for k in t if k.startswith("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.")]:
            t[key.replace("attn1_to_q", "attn1_to_qq")] = t.pop(key)

    path = _edit(tmp_path, KOHYA, "moved.safetensors", edit)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        studio.load([path])
    studio.unload()
    assert any("1 module(s) match no layer" in str(w.message) and "attn1_to_qq" in str(w.message) for w in caught)


def test_metadata_junk_does_not_break_describe_or_load(studio, tmp_path):
    header, body = mut.split(KOHYA.read_bytes())
    header["__metadata__"].update({"ss_tag_frequency": json.dumps({"set": {"zorb": "many", "x": [1]}}),
                                   "ss_network_dim": "²", "ss_network_alpha": "nan"})
    path = _write(tmp_path / "meta.safetensors", mut.pack(header, body))
    info = describe(path)
    assert info.alpha is None
    assert studio.load([path])
    studio.unload()


# ------------------------------------------------------------------------------------------ transactions
def test_a_second_lora_with_a_wrong_dora_scale_leaves_the_first_unattached(studio, no_lora_image, tmp_path):
    def edit(t, meta):
        module = next(k for k in t if k.endswith("lora_down.weight")).rsplit(".", 2)[0]
        t[f"{module}.dora_scale"] = torch.ones(3, dtype=torch.float16)

    path = _edit(tmp_path, KOHYA, "dora.safetensors", edit)
    _refused(studio, no_lora_image, [PEFT, path], IncompatibleLoraError, r"dora\.safetensors: .*dora_scale has 3 values")


def test_a_failure_in_the_first_forward_detaches_every_adapter_of_the_call(studio, no_lora_image, monkeypatch):
    import studio.api as api

    real = api.run_pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure in the first forward")

    monkeypatch.setattr(api, "run_pipeline", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        studio.compose("a zorb", [KOHYA, LOHA], seed=3, steps=2)
    monkeypatch.setattr(api, "run_pipeline", real)
    assert studio.composer.adapters == {} and studio.composer.layers == {}
    assert np.array_equal(_image(studio), no_lora_image)


def test_a_state_dict_with_integer_weights_is_refused(studio):
    with pytest.raises(LoraFileError, match="<state dict>: tensor 'x.lora_up.weight' is torch.int64"):
        studio.load([Lora({"x.lora_up.weight": torch.ones(4, 2, dtype=torch.long),
                           "x.lora_down.weight": torch.ones(2, 4)})])
    assert studio.composer.adapters == {}


def test_every_error_is_a_studio_error(studio, tmp_path):
    """The bullets above in one sweep over the mutation families: no raw exception escapes."""
    data = KOHYA.read_bytes()
    for i, family in enumerate(mut.FAMILIES):
        content, _ = mut.make_case(data, family, seed=100 + i)
        path = _write(tmp_path / f"{family.name}.safetensors", content)
        try:
            studio.load([path])
        except StudioError:
            pass
        studio.unload()


def test_the_layer_norm_for_the_strength_check_is_cached_until_the_layer_changes():
    """Each file of a stack is checked against the same layers: ‖W‖_F is computed once per layer, and again only
    after the layer's weight is edited in place or swapped (reference: the norm computed directly)."""
    from pipelines.adapters import parse

    layer = torch.nn.Linear(8, 4)
    direct = layer.weight.detach().double().pow(2).sum().sqrt().item()
    calls = []
    original = torch.linalg.vector_norm

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(parse.torch.linalg, "vector_norm", counting)
        first = parse._weight_norm(layer)
        assert parse._weight_norm(layer) == first and len(calls) == 1
        assert first == pytest.approx(direct)
        with torch.no_grad():
            layer.weight.mul_(3.0)
        assert parse._weight_norm(layer) == pytest.approx(3 * first, rel=1e-6) and len(calls) == 2
        layer.weight = torch.nn.Parameter(torch.zeros(4, 8))
        assert parse._weight_norm(layer) == pytest.approx(1e-3 * 32 ** 0.5) and len(calls) == 3
