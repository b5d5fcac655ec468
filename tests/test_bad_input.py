"""Bad input gets a clear error naming the file and the problem, and nothing is half-applied."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

import writers
from pipelines.errors import IncompatibleLoraError, LoraFileError, ModelLoadError, StrategyError, StudioError
from studio import Studio


@pytest.fixture(scope="module")
def studio():
    return Studio("tiny-sdxl")


def test_corrupt_file(studio, tmp_path):
    bad = tmp_path / "noise.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"\x00" * 64)
    with pytest.raises(LoraFileError, match=r"noise\.safetensors: corrupt safetensors header"):
        studio.load([bad])


def test_truncated_file(studio, sdxl_loras, tmp_path):
    data = sdxl_loras[0].read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoraFileError, match=r"cut\.safetensors: truncated.*incomplete download"):
        studio.load([cut])


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch EXPLOITED",))


@pytest.mark.parametrize("name", ["evil.ckpt", "evil.pt", "evil.bin", "disguised.safetensors"])
def test_pickles_are_refused_unopened(studio, tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / name
    if name.endswith(".safetensors"):
        torch.save({"x": _Exploit()}, path)  # a torch zip archive wearing a safetensors name
    else:
        path.write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(LoraFileError, match="pickle|never unpickles"):
        studio.load([path])
    assert not (tmp_path / "EXPLOITED").exists()


def test_non_finite_tensors(studio, sdxl_loras, tmp_path):
    from safetensors.torch import load_file

    sd = load_file(str(sdxl_loras[0]))
    key = next(iter(sd))
    sd[key] = sd[key].clone()
    sd[key][0, 0] = float("nan")
    path = writers.write_state_dict(tmp_path / "nan.safetensors", sd)
    with pytest.raises(LoraFileError, match=f"nan.safetensors: tensor '{key}' holds NaN"):
        studio.load([path])


@pytest.mark.parametrize("spec", ["x.safetensors:nan", "x.safetensors:inf", "x.safetensors:heavy"])
def test_non_finite_weights(studio, spec):
    with pytest.raises(StudioError, match="weight must be a (finite )?number"):
        studio.compose("a corgi", [spec], steps=1)


def _sd15_style_lora(tmp_path, metadata):
    """A kohya SD 1.5 LoRA written by diffusers: a UNet with attention in the first down block + one CLIP."""
    from diffusers import UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=32, block_out_channels=(32, 64), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=16, attention_head_dim=4)
    unet.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_k"]), adapter_name="default")
    sd = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet, adapter_name="default").items()}
    return writers.write_state_dict(tmp_path / "sd15.safetensors", convert_state_dict_to_kohya(sd), metadata)


@pytest.mark.parametrize("metadata,evidence", [({"ss_base_model_version": "sd_v1"}, "metadata"), ({}, "key layout")])
def test_sd15_lora_on_sdxl(studio, tmp_path, metadata, evidence):
    path = _sd15_style_lora(tmp_path, metadata)
    with pytest.raises(IncompatibleLoraError, match=f"made for Stable Diffusion 1.x \\(according to its {evidence}\\), "
                                                    "but the loaded model is SDXL"):
        studio.load([path])


def test_sdxl_lora_on_flux(sdxl_te_loras):
    flux = Studio("tiny-flux")
    with pytest.raises(IncompatibleLoraError, match="made for SDXL .* the loaded model is FLUX.1"):
        flux.load([sdxl_te_loras[0]])


def test_file_matching_no_layer(studio, tmp_path):
    path = writers.write_state_dict(tmp_path / "stray.safetensors", {
        "lora_unet_not_a_layer_to_q.lora_down.weight": torch.zeros(2, 8),
        "lora_unet_not_a_layer_to_q.lora_up.weight": torch.zeros(8, 2),
    })
    with pytest.raises(IncompatibleLoraError, match="stray.safetensors: none of its 1 modules match a layer"):
        studio.load([path])


def test_shape_mismatch_names_the_layer(studio, tmp_path):
    path = writers.write_state_dict(tmp_path / "wide.safetensors", {
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(2, 768),
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(64, 2),
    })
    with pytest.raises(IncompatibleLoraError, match=r"attn2.to_k: LoRA input size \(768,\) vs layer \(64,\)"):
        studio.load([path])


def test_unsupported_lycoris_algorithm_is_named(studio, tmp_path):
    path = writers.write_state_dict(tmp_path / "oft.safetensors", {
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.oft_blocks": torch.zeros(4, 16, 16),
    })
    with pytest.raises(IncompatibleLoraError, match="OFT"):
        studio.load([path])


def test_a_bad_file_in_a_stack_changes_nothing(sdxl_loras, tmp_path):
    studio = Studio("tiny-sdxl")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    with pytest.raises(LoraFileError):
        studio.load([sdxl_loras[0], bad])
    assert studio.composer.adapters == {} and studio.composer.layers == {}


def test_unknown_strategy_in_compose(studio):
    with pytest.raises(StrategyError, match="unknown strategy 'average'"):
        studio.compose("a corgi", [], "average", steps=1)
    with pytest.raises(StrategyError, match="strategy 'composite' has no parameter 'tau'"):
        studio.compose("a corgi", [], "composite", strategy_params={"tau": 2}, steps=1)


def test_lora_outside_the_library_is_refused(sdxl_loras, tmp_path):
    library = tmp_path / "library"
    library.mkdir()
    (library / "inside.safetensors").write_bytes(sdxl_loras[0].read_bytes())
    studio = Studio("tiny-sdxl", lora_dir=library)
    assert studio.load(["inside"])  # a library name, extension optional
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(sdxl_loras[1].read_bytes())
    for name in ("../outside.safetensors", "../outside", str(outside), "../../etc/passwd"):
        with pytest.raises(LoraFileError, match="outside the LoRA library"):
            studio.load([name])
    (library / "link.safetensors").symlink_to(outside)
    with pytest.raises(LoraFileError, match="outside the LoRA library"):
        studio.load(["link.safetensors"])


def test_bad_models(tmp_path):
    with pytest.raises(ModelLoadError, match="pickle"):
        Studio(str(tmp_path / "model.ckpt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="without model_index.json"):
        Studio(str(tmp_path / "empty"))


def test_bad_step_window():
    from studio import Lora

    with pytest.raises(StudioError, match="0 <= start < end <= 1"):
        Lora("x.safetensors", start=0.8, end=0.2)
    assert math.isclose(Lora.parse("x.safetensors:0.5:start=0.1:end=0.9").end, 0.9)


def test_same_lora_twice_in_a_stack_is_refused(studio, sdxl_loras):
    with pytest.raises(StudioError, match="appears twice in the stack"):
        studio.compose("a corgi", [f"{sdxl_loras[0]}:1.0", f"{sdxl_loras[0]}:0.5"], steps=1)
