"""Automatic regions (``region=auto``) and the masks a regional render shows the user (``Result.region_masks``).

Masks come from the cross-attention of each LoRA's concept tokens (:mod:`pipelines.attention_maps`); the
references here are written out by hand: box masks, partitions of the grid, the plain diffusers passes of
``tests/test_regional.py``.
"""

from __future__ import annotations

import torch

from studio import Lora

PROMPT = "a corgi in a garden"


def test_regional_result_carries_its_lane_masks(studio_for, sdxl_loras, flux_loras):
    """``Result.region_masks``: lane label -> [h, w] on the denoiser's grid, what the reduce applied."""
    sdxl = studio_for("sdxl").compose(PROMPT, [Lora(sdxl_loras[0], 0.9, region="left", name="a"),
                                              Lora(sdxl_loras[1], 0.8, region="0.5,0,1,0.5", name="b"),
                                              Lora(sdxl_loras[2], 0.5, name="c")],
                                      "regional", steps=1, output_type="np")
    assert set(sdxl.region_masks) == {"a", "b"}
    left, top_right = torch.zeros(32, 32), torch.zeros(32, 32)
    left[:, :16], top_right[:16, 16:] = 1, 1
    assert torch.equal(sdxl.region_masks["a"], left) and torch.equal(sdxl.region_masks["b"], top_right)
    flux = studio_for("flux").compose(PROMPT, [Lora(flux_loras[0], 0.9, region="right", name="x"),
                                              Lora(flux_loras[1], 0.7, region="right", name="y")],
                                      "regional", steps=1, output_type="np",
                                      strategy_params={"feather": 2.0})
    (label,) = flux.region_masks
    mask = flux.region_masks[label]
    assert label == "x, y" and mask.shape == (16, 16) and mask.device.type == "cpu"  # 2x2-patch tokens
    assert 0 < float(mask[0, 7]) < 1 and float(mask[0, 15]) > 0.99 and float(mask[0, 0]) < 0.01  # feathered
    assert studio_for("flux").compose(PROMPT, [Lora(flux_loras[0], 0.9)], "merge", steps=1,
                                      output_type="np").region_masks == {}


def _unet_call(pipe, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(2, 4, 32, 32, generator=gen), timestep=torch.tensor(500.0),
                encoder_hidden_states=torch.randn(2, 77, 64, generator=gen),
                added_cond_kwargs={"text_embeds": torch.randn(2, 32, generator=gen),
                                   "time_ids": torch.randn(2, 6, generator=gen)}, return_dict=False)


def test_sdxl_capture_equals_diffusers_attention_scores_and_leaves_output_alone():
    """The captured map is the head- and layer-mean of the scores diffusers' own AttnProcessor computes
    (``attn.get_attention_scores``) at the 16x16 level; the UNet output is bit-identical; no hook stays."""
    from diffusers.models.attention_processor import AttnProcessor

    from pipelines.attention_maps import AttentionCapture
    from pipelines.tiny import build_tiny_sdxl

    pipe = build_tiny_sdxl()
    unet, call = pipe.unet, _unet_call(pipe)
    with torch.no_grad():
        plain = unet(**call)[0]
        capture = AttentionCapture("sdxl", (32, 32))
        with capture.recording(unet):
            captured = unet(**call)[0]
    assert torch.equal(plain, captured)
    assert not any(m._forward_hooks for m in unet.modules())
    (maps,) = capture.calls
    assert maps.shape == (2, 16, 16, 77) and torch.allclose(maps.sum(-1), torch.ones(2, 16, 16), atol=1e-5)
    scores = []
    for name, attn in unet.named_modules():
        if name.endswith("attn2"):
            attn.set_processor(AttnProcessor())
            original = attn.get_attention_scores

            def record(q, k, mask=None, original=original, heads=attn.heads):
                probs = original(q, k, mask)
                if probs.shape[1] == 256:  # the 16x16 level
                    scores.append(probs.unflatten(0, (-1, heads)).mean(1))
                return probs

            attn.get_attention_scores = record
    with torch.no_grad():
        unet(**call)
    assert len(scores) == 3  # the tiny UNet's cross-attention layers at 16x16 (one down, two up)
    expected = torch.stack(scores).mean(0).unflatten(1, (16, 16))
    torch.testing.assert_close(maps, expected, atol=1e-5, rtol=1e-4)


def test_flux_capture_equals_joint_attention_rows_and_leaves_output_alone(monkeypatch):
    """FLUX: the image rows' attention over the text keys, from the query/key diffusers' FluxAttnProcessor hands
    its attention function (after q/k norms and rotary embedding), renormalised over the text keys."""
    import diffusers.models.transformers.transformer_flux as flux_module

    from pipelines.attention_maps import AttentionCapture
    from pipelines.tiny import build_tiny_flux

    pipe = build_tiny_flux()
    transformer = pipe.transformer
    gen = torch.Generator().manual_seed(1)
    call = dict(hidden_states=torch.randn(2, 256, 16, generator=gen),
                encoder_hidden_states=torch.randn(2, 16, 32, generator=gen),
                pooled_projections=torch.randn(2, 32, generator=gen), timestep=torch.tensor([0.5, 0.5]),
                img_ids=torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(16.0), torch.arange(16.0),
                                                   indexing="ij"), -1).reshape(-1, 3),
                txt_ids=torch.zeros(16, 3), return_dict=False)
    if transformer.config.guidance_embeds:
        call["guidance"] = torch.tensor([3.5, 3.5])
    with torch.no_grad():
        plain = transformer(**call)[0]
        capture = AttentionCapture("flux", (32, 32))
        with capture.recording(transformer):
            captured = transformer(**call)[0]
    assert torch.equal(plain, captured) and not any(m._forward_hooks for m in transformer.modules())
    (maps,) = capture.calls
    assert maps.shape == (2, 16, 16, 16)
    rows = []
    original = flux_module.dispatch_attention_fn

    def record(query, key, value, **kwargs):
        if query.shape[1] == 16 + 256:  # joint (double-stream) attention: text first, then image
            logits = torch.einsum("bnhd,bthd->bhnt", query[:, 16:], key[:, :16]) / query.shape[-1] ** 0.5
            rows.append(logits.softmax(-1).mean(1))
        return original(query, key, value, **kwargs)

    monkeypatch.setattr(flux_module, "dispatch_attention_fn", record)
    with torch.no_grad():
        transformer(**call)
    expected = torch.stack(rows[:len(transformer.transformer_blocks)]).mean(0).unflatten(1, (16, 16))
    torch.testing.assert_close(maps, expected, atol=1e-5, rtol=1e-4)


def test_concept_token_positions_clip():
    from pipelines.attention_maps import concept_token_positions
    from pipelines.tiny import clip_tokenizer

    tok = clip_tokenizer()
    prompt = "a small red zorb, solid, and a blue quix, left"
    ids = tok(prompt)["input_ids"]
    zorb = concept_token_positions(tok, prompt, ["zorb"])
    assert zorb and all(tok.decode([ids[i]]).strip() in "zorb" for i in zorb)
    assert concept_token_positions(tok, prompt, ["quix", "blue"]) == sorted(
        concept_token_positions(tok, prompt, ["quix"]) + concept_token_positions(tok, prompt, ["blue"]))
    assert concept_token_positions(tok, prompt, ["dog"]) == []
