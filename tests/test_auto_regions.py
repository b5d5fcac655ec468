"""Automatic regions (``region=auto``) and the masks a regional render shows the user (``Result.region_masks``).

Masks come from the cross-attention of each LoRA's concept tokens (:mod:`pipelines.attention_maps`); the
references here are written out by hand: box masks, partitions of the grid, the plain diffusers passes of
``tests/test_regional.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
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


def test_auto_masks_partition_by_hand():
    """Each position goes to the concept whose min-max-normalised map is largest there, if above the threshold;
    with the base lane the lane weights sum to one."""
    from fusion.region_masks import auto_masks, lane_weights

    a = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0]])  # normalised: 0, 1/3, 2/3, 1 per row
    b = torch.tensor([[3.0, 2.0, 0.5, 0.0], [6.0, 4.0, 1.0, 0.0]])  # normalised: 1, 2/3, 1/6, 0 (min 0, max 6)
    masks = auto_masks(torch.stack([a, b]), (2, 4), threshold=0.3)
    expected_a = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.float32)
    expected_b = torch.tensor([[0, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.float32)  # b at (0,0) is 0.5: below a? no
    # by hand: b normalised = [[.5, 1/3, 1/12, 0], [1, 2/3, 1/6, 0]]; a = [[0, 1/3, 2/3, 1]] in both rows
    expected_b[0, 0] = 1.0  # 0.5 > 0 and > 0.3
    expected_b[0, 1] = 0.0  # a tie 1/3 = 1/3 goes to the first concept (argmax), and 1/3 > 0.3
    expected_a[0, 1] = 1.0
    torch.testing.assert_close(masks, torch.stack([expected_a, expected_b]))
    assert float(masks.sum(0).max()) <= 1.0  # at most one concept per position
    high = auto_masks(torch.stack([a, b]), (2, 4), threshold=0.9)  # only the peaks survive
    assert int(high.sum()) == 3 and float(high.sum(0).max()) <= 1.0
    weights = lane_weights(list(high))
    assert torch.allclose(weights.sum(0), torch.ones(2, 4)) and torch.equal(weights[0], 1 - high.sum(0))


def world_prompt(family: str, background: str = "light") -> str:
    """The two-subject prompt as the family's subject LoRAs are called (bound to class words)."""
    from studio.world.concepts import Scene, pair_caption

    return pair_caption(Scene("zorb", "red", "solid", background, "small", "left"),
                        Scene("quix", "blue", "solid", background, "small", "right"), family)


def _world(family, name):
    from pipelines.assets import assets_root

    return str(assets_root() / "loras" / f"tiny-{family}" / f"{name}.safetensors")


@pytest.fixture(scope="module")
def world():
    """``world(family)``: one Studio on the trained tiny world per family, shared by this module's tests."""
    from studio import Studio

    made = {}

    def get(family: str) -> "Studio":
        if family not in made:
            made[family] = Studio(f"tiny-{family}")
        return made[family]

    return get


def test_regional_auto_masks_render_and_recipe(world):
    """region=auto on both subject LoRAs of the trained tiny world: disjoint 0/1 masks on the grid, the same image
    as regional:auto=true over boxes, the region string round-trips through the recipe; no hook stays."""
    from studio import Recipe

    for family in ("sdxl", "flux"):
        studio = world(family)
        auto = [Lora(_world(family, "subject-zorb"), region="auto", name="zorb"),
                Lora(_world(family, "subject-quix"), region="auto", name="quix")]
        result = studio.compose(world_prompt(family), auto, "regional", seed=0, steps=6, output_type="np")
        masks = torch.stack([result.region_masks["zorb"], result.region_masks["quix"]])
        assert set(masks.unique().tolist()) <= {0.0, 1.0} and float(masks.sum(0).max()) <= 1.0
        assert all(0 < float(m.mean()) < 1 for m in masks)
        assert [r["region"] for r in result.strategy_info["regions"]] == ["auto", "auto"]
        boxes = [Lora(_world(family, "subject-zorb"), region="left", name="zorb"),
                 Lora(_world(family, "subject-quix"), region="right", name="quix")]
        via_param = studio.compose(world_prompt(family), boxes, "regional", strategy_params={"auto": True}, seed=0, steps=6,
                                   output_type="np")
        assert (result.latents[0] == via_param.latents[0]).all()
        # lanes in chunks of one: the capture joins the chunks' rows, same masks, same image
        chunked = studio.compose(world_prompt(family), auto, "regional", seed=0, steps=6, output_type="np", max_lanes=1)
        assert torch.equal(chunked.region_masks["zorb"], result.region_masks["zorb"])
        np.testing.assert_allclose(chunked.latents[0], result.latents[0], atol=1e-5, rtol=0)
        assert not any(m._forward_hooks for m in getattr(studio.pipe, studio.family.denoiser).modules())
        recipe = Recipe.from_toml(result.recipes[0].to_toml())
        assert [entry.region for entry in recipe.loras] == ["auto", "auto"]


def test_auto_without_a_concept_fails_before_rendering(sdxl_loras, studio_for):
    """A LoRA with no trigger words (diffusers/PEFT files declare none) and no region prompt cannot get an automatic
    mask: a clear error before the first step; with a region prompt it works."""
    from pipelines.errors import StrategyError

    studio = studio_for("sdxl")
    steps, before = [], set(studio.composer.adapters)
    with pytest.raises(StrategyError, match="declares no trigger words and it has no region prompt"):
        studio.compose(PROMPT, [Lora(sdxl_loras[0], region="auto"), Lora(sdxl_loras[1], region="left")],
                       "regional", steps=2, callback=lambda *a: steps.append(a))
    assert steps == [] and set(studio.composer.adapters) == before  # nothing rendered, nothing left attached
    ok = studio.compose(PROMPT, [Lora(sdxl_loras[0], region="auto", prompt="a corgi", name="c"),
                                 Lora(sdxl_loras[1], region="left", name="d")], "regional", steps=2, output_type="np")
    assert len(ok.region_masks) == 2 and ok.strategy_info["regions"][1]["region"] == "auto"


def test_failing_render_during_capture_leaves_nothing_attached(world):
    """An error inside a warm-up step (while the capture hooks are on) leaves no hook and the stock forward."""
    studio = world("sdxl")
    unet = studio.pipe.unet
    forward_before = unet.forward

    def boom(module, args):
        raise RuntimeError("boom")

    handle = unet.conv_out.register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            studio.compose(world_prompt("sdxl"), [Lora(_world("sdxl", "subject-zorb"), region="auto", name="z")],
                           "regional", steps=3)
    finally:
        handle.remove()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in unet.modules())
    assert unet.forward == forward_before and "forward" not in unet.__dict__


def test_auto_masks_under_img2img_start_at_the_strength_step(world):
    """img2img runs the schedule from the strength's step: the warm-up counts from there, then masks are made."""
    from PIL import Image

    studio = world("sdxl")
    image = Image.new("RGB", (64, 64), (200, 200, 200))
    auto = [Lora(_world("sdxl", "subject-zorb"), region="auto", name="zorb"),
            Lora(_world("sdxl", "subject-quix"), region="auto", name="quix")]
    for strategy, loras in (("regional", auto), ("clora", [Lora(_world("sdxl", "subject-zorb"), name="zorb"),
                                                          Lora(_world("sdxl", "subject-quix"), name="quix")])):
        result = studio.compose(world_prompt("sdxl"), loras, strategy, image=image, strength=0.6, steps=10, output_type="np")
        assert set(result.region_masks) == {"zorb", "quix"}, strategy
