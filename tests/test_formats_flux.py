"""FLUX.1 LoRA formats: diffusers/PEFT and LyCORIS on the tiny FLUX model, and the BFL-layout formats
(kohya sd-scripts, XLabs) on a full-size FLUX.1 transformer built on the ``meta`` device.

diffusers' FLUX kohya converter hard-codes FLUX.1's sizes (19 + 38 blocks, 3072-wide q/k/v/mlp splits), so
BFL-layout files are checked at full size, where no memory is needed for the base weights; the reference is
diffusers' own conversion of the same file. No third-party writer of BFL-layout files exists offline, so those
files are built from the published key layout.
"""

from __future__ import annotations

import types

import pytest
import torch
from accelerate import init_empty_weights
from conftest import flux_inputs

import writers
from pipelines import FLUX
from pipelines.adapters import parse_lora
from pipelines.errors import IncompatibleLoraError
from pipelines.tiny import build_tiny_flux
from studio import Studio

TOL = 2e-5


def studio_transformer(studio, names, weights, **inputs):
    state = studio.composer.state
    state.set_active(names)
    row = state.gains_row(dict(zip(names, weights)))[None]
    state.set_gains(denoiser=row, text=row)
    with torch.no_grad():
        return studio.pipe.transformer(**inputs).sample


@pytest.mark.parametrize("weight", [1.0, 0.7])
def test_peft_flux_matches_diffusers(flux_loras, weight):
    ref = build_tiny_flux()
    ref.load_lora_weights(str(flux_loras[1]), adapter_name="ref")
    ref.set_adapters(["ref"], [weight])
    studio = Studio("tiny-flux-random")
    (name,) = studio.load([flux_loras[1]])
    assert studio.composer.adapters[name].has_text_parts
    inputs = flux_inputs()
    with torch.no_grad():
        expected = ref.transformer(**inputs).sample
        base = build_tiny_flux().transformer(**inputs).sample
    assert (expected - base).abs().max() > 1e-2
    torch.testing.assert_close(studio_transformer(studio, [name], [weight], **inputs), expected, atol=TOL, rtol=0)
    ids = ref.tokenizer(["a corgi"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(studio.pipe.text_encoder(ids)[0], ref.text_encoder(ids)[0], atol=TOL, rtol=0)


@pytest.mark.parametrize("algo,kwargs", [("lora", {}), ("loha", {}), ("lokr", {"factor": 4})])
def test_lycoris_on_flux_matches_lycoris(algo, kwargs, tmp_path):
    ref = build_tiny_flux()
    path, net = writers.lycoris_network(ref, ref.transformer, tmp_path / f"{algo}.safetensors", algo, seed=7,
                                        preset=writers.LYCORIS_FLUX_PRESET, **kwargs)
    studio = Studio("tiny-flux-random")
    (name,) = studio.load([path])
    assert len(studio.composer.adapters[name].layer_keys) == len(net.unet_loras) + len(net.text_encoder_loras)
    inputs = flux_inputs()
    with torch.no_grad():
        expected = ref.transformer(**inputs).sample
    torch.testing.assert_close(studio_transformer(studio, [name], [1.0], **inputs), expected, atol=5e-5, rtol=0)


# ------------------------------------------------------------------------------------- full-size, meta device
FLUX1_CONFIG = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                    guidance_embeds=True, axes_dims_rope=(16, 56, 56))


@pytest.fixture(scope="module")
def meta_flux():
    from diffusers import FluxTransformer2DModel

    with init_empty_weights():
        transformer = FluxTransformer2DModel(**FLUX1_CONFIG)
    return types.SimpleNamespace(transformer=transformer, text_encoder=None, text_encoder_2=None)


def _lora(out_f, in_f, rank, gen):
    return torch.randn(rank, in_f, generator=gen) * 0.01, torch.randn(out_f, rank, generator=gen) * 0.01


BFL_MODULES = {  # sd-scripts FLUX names -> (out, in) of the fused BFL layer
    "lora_unet_double_blocks_0_img_attn_qkv": (9216, 3072),
    "lora_unet_double_blocks_0_img_attn_proj": (3072, 3072),
    "lora_unet_double_blocks_0_img_mlp_0": (12288, 3072),
    "lora_unet_double_blocks_18_txt_attn_qkv": (9216, 3072),
    "lora_unet_double_blocks_18_txt_mlp_2": (3072, 12288),
    "lora_unet_single_blocks_0_linear1": (21504, 3072),
    "lora_unet_single_blocks_37_linear2": (3072, 15360),
    "lora_unet_final_layer_adaLN_modulation_1": (6144, 3072),
}


def test_kohya_bfl_layout_at_full_size_matches_diffusers(meta_flux, tmp_path):
    from diffusers import FluxPipeline

    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, (out_f, in_f) in BFL_MODULES.items():
        down, up = _lora(out_f, in_f, 4, gen)
        tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(2.0)}
    path = writers.write_state_dict(tmp_path / "bfl.safetensors", tensors)
    parsed = parse_lora(path, meta_flux, FLUX)
    reference, _ = FluxPipeline.lora_state_dict(str(path), return_alphas=True)
    # diffusers' converter leaves the output head un-prefixed; it belongs to the transformer
    reference = {k if k.startswith("transformer.") else f"transformer.{k}": v for k, v in reference.items()}
    ref_modules = {k.removesuffix(".lora_A.weight") for k in reference if k.endswith(".lora_A.weight")}
    assert set(parsed.deltas) == ref_modules
    assert len(ref_modules) == 3 + 1 + 1 + 3 + 1 + 4 + 1 + 1  # fused q/k/v and linear1 split into targets
    for key in ref_modules:
        expected = reference[f"{key}.lora_B.weight"] @ reference[f"{key}.lora_A.weight"]
        if key == "transformer.norm_out.linear":
            # diffusers ignores alpha on the final layer ("TODO: alphas" in its converter); kohya's
            # definition is alpha / rank for every module, which the studio applies
            expected = expected * 2.0 / 4
        torch.testing.assert_close(parsed.deltas[key].weight(), expected, atol=1e-9, rtol=1e-5)
    # the final layer's scale/shift halves are swapped between the BFL and diffusers layouts
    up = tensors["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"]
    down = tensors["lora_unet_final_layer_adaLN_modulation_1.lora_down.weight"]
    swapped = torch.cat([up[3072:], up[:3072]]) @ down * 0.5
    torch.testing.assert_close(parsed.deltas["transformer.norm_out.linear"].weight(), swapped, atol=1e-9, rtol=1e-5)


def test_loha_in_bfl_layout_is_split_exactly(meta_flux, tmp_path):
    """LoHa on a fused qkv layer (diffusers cannot load LoHa): rows land on to_q/to_k/to_v per the formula."""
    gen = torch.Generator().manual_seed(1)
    p = "lora_unet_double_blocks_3_img_attn_qkv"
    t = {f"{p}.hada_w1_a": torch.randn(9216, 2, generator=gen) * 0.1, f"{p}.hada_w1_b": torch.randn(2, 3072, generator=gen) * 0.1,
         f"{p}.hada_w2_a": torch.randn(9216, 2, generator=gen) * 0.1, f"{p}.hada_w2_b": torch.randn(2, 3072, generator=gen) * 0.1,
         f"{p}.alpha": torch.tensor(1.0)}
    parsed = parse_lora(writers.write_state_dict(tmp_path / "loha.safetensors", t), meta_flux, FLUX)
    full = (t[f"{p}.hada_w1_a"] @ t[f"{p}.hada_w1_b"]) * (t[f"{p}.hada_w2_a"] @ t[f"{p}.hada_w2_b"]) * 0.5
    for i, target in enumerate(("to_q", "to_k", "to_v")):
        got = parsed.deltas[f"transformer.transformer_blocks.3.attn.{target}"].weight()
        torch.testing.assert_close(got, full[i * 3072:(i + 1) * 3072], atol=1e-9, rtol=1e-5)


def test_xlabs_layout_matches_diffusers(meta_flux, tmp_path):
    from diffusers import FluxPipeline

    gen = torch.Generator().manual_seed(2)
    tensors = {}
    for block in (0, 5):
        for proj in ("proj_lora1", "proj_lora2", "qkv_lora1", "qkv_lora2"):
            out_f = 9216 if proj.startswith("qkv") else 3072
            down, up = _lora(out_f, 3072, 4, gen)
            tensors |= {f"double_blocks.{block}.processor.{proj}.down.weight": down,
                        f"double_blocks.{block}.processor.{proj}.up.weight": up}
    path = writers.write_state_dict(tmp_path / "xlabs.safetensors", tensors)
    parsed = parse_lora(path, meta_flux, FLUX)
    assert parsed.info.format == "xlabs"
    reference, _ = FluxPipeline.lora_state_dict(str(path), return_alphas=True)
    keys = {k.removesuffix(".lora_A.weight") for k in reference if k.endswith(".lora_A.weight")}
    assert set(parsed.deltas) == keys and len(keys) == 2 * (1 + 3 + 1 + 3)
    for key in keys:
        expected = reference[f"{key}.lora_B.weight"] @ reference[f"{key}.lora_A.weight"]
        torch.testing.assert_close(parsed.deltas[key].weight(), expected, atol=1e-9, rtol=1e-5)


def test_bfl_control_lora_is_read_and_refused_clearly(meta_flux, tmp_path):
    """FLUX Canny/Depth control LoRAs widen the input embedder; a text-to-image FluxPipeline cannot take them."""
    gen = torch.Generator().manual_seed(3)
    down, up = _lora(3072, 128, 4, gen)
    tensors = {"img_in.lora_A.weight": down, "img_in.lora_B.weight": up,
               "double_blocks.0.img_attn.norm.query_norm.scale": torch.ones(128)}
    path = writers.write_state_dict(tmp_path / "canny.safetensors", tensors)
    with pytest.raises(IncompatibleLoraError, match="control LoRA"):
        parse_lora(path, meta_flux, FLUX)
