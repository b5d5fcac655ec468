"""Every SDXL LoRA format changes the model exactly as its writer defines it.

References are independent of the studio: diffusers' own ``load_lora_weights`` (PEFT layers) for diffusers and
kohya files, and lycoris-lora's own applied network for LoCon/LoHa/LoKr/DoRA/full files.
"""

from __future__ import annotations

import re

import pytest
import torch
from conftest import unet_inputs
from safetensors.torch import load_file

import writers
from pipelines.tiny import build_tiny_sdxl
from studio import Studio

TOL = 2e-5


def studio_unet(studio: Studio, names: list[str], weights: list[float], **inputs):
    state = studio.composer.state
    state.set_active(names)
    state.set_gains(denoiser=state.gains_row(dict(zip(names, weights)))[None],
                    text=state.gains_row(dict(zip(names, weights)))[None])
    with torch.no_grad():
        return studio.pipe.unet(**inputs).sample


def text_embeddings(pipe, prompt="a corgi in a garden"):
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0], pipe.text_encoder_2(ids)[0]


def diffusers_reference(files, weights):
    ref = build_tiny_sdxl()
    names = [f"ref{i}" for i in range(len(files))]
    for name, f in zip(names, files):
        ref.load_lora_weights(str(f), adapter_name=name)
    ref.set_adapters(names, weights)
    return ref


@pytest.mark.parametrize("weight", [1.0, 0.6])
def test_peft_file_matches_diffusers(sdxl_te_loras, weight):
    files = sdxl_te_loras[:1]
    ref = diffusers_reference(files, [weight])
    studio = Studio("tiny-sdxl-random")
    names = studio.load(files)
    inputs = unet_inputs()
    with torch.no_grad():
        expected = ref.unet(**inputs).sample
        base = build_tiny_sdxl().unet(**inputs).sample
    got = studio_unet(studio, names, [weight], **inputs)
    assert (expected - base).abs().max() > 1e-2  # the LoRA really changes the output
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)
    for a, b in zip(text_embeddings(ref), text_embeddings(studio.pipe)):
        torch.testing.assert_close(b, a, atol=TOL, rtol=0)


def test_kohya_file_scale_is_alpha_over_rank(sdxl_te_loras, tmp_path):
    kohya = writers.kohya_from_peft(sdxl_te_loras[0], tmp_path / "kohya.safetensors", alpha_factor=0.5,
                                    metadata={"ss_base_model_version": "sdxl_base_v1-0", "ss_network_dim": "4"})
    studio = Studio("tiny-sdxl-random")
    (name,) = studio.load([kohya])
    tensors = load_file(str(kohya))
    checked = 0
    for key in studio.composer.layers:
        component, _, path = key.partition(".")
        prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}[component]
        kohya_name = prefix + path.replace(".", "_")
        down, up = tensors[f"{kohya_name}.lora_down.weight"], tensors[f"{kohya_name}.lora_up.weight"]
        alpha = float(tensors[f"{kohya_name}.alpha"])
        expected = (alpha / down.shape[0]) * (up @ down)
        torch.testing.assert_close(studio.composer.delta_weight(name, key), expected, atol=1e-6, rtol=0)
        checked += 1
    assert checked == len(tensors) // 3
    # end to end against diffusers' own kohya loader
    ref = diffusers_reference([kohya], [0.8])
    inputs = unet_inputs()
    with torch.no_grad():
        expected = ref.unet(**inputs).sample
    torch.testing.assert_close(studio_unet(studio, [name], [0.8], **inputs), expected, atol=TOL, rtol=0)


def _to_sgm(name: str) -> str:
    """diffusers -> SGM block names of the tiny SDXL UNet (layers_per_block=1), as sd-scripts writes them."""
    name = re.sub(r"lora_unet_down_blocks_1_attentions_0_", "lora_unet_input_blocks_3_1_", name)
    name = re.sub(r"lora_unet_down_blocks_2_attentions_0_", "lora_unet_input_blocks_5_1_", name)
    name = re.sub(r"lora_unet_mid_block_attentions_0_", "lora_unet_middle_block_1_", name)
    name = re.sub(r"lora_unet_up_blocks_0_attentions_1_", "lora_unet_output_blocks_1_1_", name)
    name = re.sub(r"lora_unet_up_blocks_1_attentions_0_", "lora_unet_output_blocks_2_1_", name)
    return name


def test_kohya_sgm_block_names(sdxl_loras, tmp_path):
    kohya = load_file(str(writers.kohya_from_peft(sdxl_loras[0], tmp_path / "k.safetensors")))
    kept = {k: v for k, v in kohya.items() if _to_sgm(k) != k}
    sgm = writers.write_state_dict(tmp_path / "sgm.safetensors", {_to_sgm(k): v for k, v in kept.items()})
    plain = writers.write_state_dict(tmp_path / "plain.safetensors", kept)
    studio = Studio("tiny-sdxl-random")
    a, b = studio.load([sgm, plain])
    assert studio.composer.adapters[a].layer_keys == studio.composer.adapters[b].layer_keys
    for key in studio.composer.adapters[a].layer_keys:
        torch.testing.assert_close(studio.composer.delta_weight(a, key), studio.composer.delta_weight(b, key))
    ref = diffusers_reference([sgm], [1.0])  # diffusers' SGM converter as the reference
    inputs = unet_inputs()
    with torch.no_grad():
        expected = ref.unet(**inputs).sample
    torch.testing.assert_close(studio_unet(studio, [a], [1.0], **inputs), expected, atol=TOL, rtol=0)


LYCORIS_CASES = {
    "locon": ("locon", {"conv_dim": 4, "conv_alpha": 1}),
    "loha": ("loha", {}),
    "loha-conv": ("loha", {"conv_dim": 2, "conv_alpha": 1}),
    "lokr": ("lokr", {"factor": 4}),
    "lokr-full": ("lokr", {"factor": 8, "full_matrix": True}),
    "dora": ("lora", {"dora_wd": True}),
    "dora-columns": ("lora", {"dora_wd": True, "wd_on_output": False}),
    "loha-dora": ("loha", {"dora_wd": True}),
    "full": ("full", {}),
}


@pytest.mark.parametrize("case", list(LYCORIS_CASES))
def test_lycoris_formats_match_lycoris(case, tmp_path):
    algo, kwargs = LYCORIS_CASES[case]
    ref = build_tiny_sdxl()
    path, net = writers.lycoris_network(ref, ref.unet, tmp_path / f"{case}.safetensors", algo, seed=5,
                                        preset=writers.LYCORIS_SDXL_PRESET,
                                        metadata={"ss_network_module": "lycoris.kohya"}, **kwargs)
    studio = Studio("tiny-sdxl-random")
    (name,) = studio.load([path])
    n_modules = len(net.unet_loras) + len(net.text_encoder_loras)
    assert len(studio.composer.adapters[name].layer_keys) == n_modules
    assert any(isinstance(m, torch.nn.Conv2d) for m in studio.composer.layers.values())
    inputs = unet_inputs()
    with torch.no_grad():
        expected = ref.unet(**inputs).sample
        base = build_tiny_sdxl().unet(**inputs).sample
    got = studio_unet(studio, [name], [1.0], **inputs)
    assert (expected - base).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, atol=5e-5, rtol=0)
    for a, b in zip(text_embeddings(ref), text_embeddings(studio.pipe)):
        torch.testing.assert_close(b, a, atol=5e-5, rtol=0)


def _loha(t, prefix):
    w1 = t[f"{prefix}.hada_w1_a"] @ t[f"{prefix}.hada_w1_b"]
    w2 = t[f"{prefix}.hada_w2_a"] @ t[f"{prefix}.hada_w2_b"]
    return w1 * w2 * float(t[f"{prefix}.alpha"]) / t[f"{prefix}.hada_w1_b"].shape[0]


def _lokr(t, prefix):
    w2 = t[f"{prefix}.lokr_w2"] if f"{prefix}.lokr_w2" in t else t[f"{prefix}.lokr_w2_a"] @ t[f"{prefix}.lokr_w2_b"]
    scale = 1.0 if f"{prefix}.lokr_w2" in t else float(t[f"{prefix}.alpha"]) / t[f"{prefix}.lokr_w2_b"].shape[0]
    return torch.kron(t[f"{prefix}.lokr_w1"], w2) * scale


@pytest.mark.parametrize("algo,formula,kwargs", [("loha", _loha, {}), ("lokr", _lokr, {"factor": 4})])
def test_lycoris_delta_equals_formula(algo, formula, kwargs, tmp_path):
    """Per linear layer, the studio's dense ΔW equals the LoHa / LoKr formula on the file's tensors."""
    ref = build_tiny_sdxl()
    path, _ = writers.lycoris_network(ref, ref.unet, tmp_path / f"{algo}.safetensors", algo, seed=9,
                                      preset=writers.LYCORIS_SDXL_PRESET, **kwargs)
    tensors = load_file(str(path))
    studio = Studio("tiny-sdxl-random")
    (name,) = studio.load([path])
    checked = 0
    for key, layer in studio.composer.layers.items():
        if not key.startswith("unet.") or layer.weight.dim() != 2:
            continue
        prefix = "lora_unet_" + key.removeprefix("unet.").replace(".", "_")
        torch.testing.assert_close(studio.composer.delta_weight(name, key), formula(tensors, prefix),
                                   atol=1e-6, rtol=1e-5)
        checked += 1
    assert checked > 50


def test_peft_dora_matches_peft(tmp_path):
    """A PEFT DoRA LoRA (``lora_magnitude_vector``) equals PEFT's own DoRA layers.

    (kohya ``dora_scale`` files are covered by the lycoris cases above; diffusers'
    ``convert_state_dict_to_kohya`` leaves DoRA keys unconverted, so it cannot write them.)
    """
    peft_file = writers.peft_sdxl(tmp_path / "dora", 41, rank=4, alpha=8, use_dora=True)
    writer = build_tiny_sdxl()
    writers.add_peft_adapter(writer.unet, writers.SDXL_UNET_TARGETS, 4, 8, 41, 0.05, use_dora=True)
    studio = Studio("tiny-sdxl-random")
    (name,) = studio.load([peft_file])
    inputs = unet_inputs()
    with torch.no_grad():
        expected = writer.unet(**inputs).sample
        base = build_tiny_sdxl().unet(**inputs).sample
    assert (expected - base).abs().max() > 1e-2
    torch.testing.assert_close(studio_unet(studio, [name], [1.0], **inputs), expected, atol=TOL, rtol=0)
