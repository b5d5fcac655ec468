"""The regional strategy and spatial lanes against plain diffusers passes with masks applied by hand (float32, CPU).

The reference runs, at every step, one plain diffusers/PEFT denoiser pass per region (``set_adapters`` with the
global LoRAs plus that region's, the prompt "global, region prompt" encoded with those adapters only) and one for
the base (global LoRAs, global prompt), and sums them with box masks written out here: ε = Σ_i M_i ⊙ ε_i.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fusion import make_strategy
from fusion.region_masks import lane_weights, rasterise
from pipelines.errors import StudioError
from pipelines.tiny import build_tiny_flux, build_tiny_sdxl
from reference import load_adapters, prompt_embedding_kwargs
from studio import Lora, Studio

ATOL = 2e-4
PROMPT, NEGATIVE = "a corgi in a garden", "blurry"


def _encode(pipe, family, prompt):
    with torch.no_grad():
        if family == "sdxl":
            pe, npe, ppe, nppe = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                                    do_classifier_free_guidance=True, negative_prompt=NEGATIVE)
            return {"encoder_hidden_states": torch.cat([npe, pe]), "text_embeds": torch.cat([nppe, ppe])}
        pe, ppe, _ = pipe.encode_prompt(prompt, prompt_2=None, device="cpu", num_images_per_prompt=1)
        return {"encoder_hidden_states": pe, "pooled_projections": ppe}


def masked_reference(family, files, lanes, *, steps, guidance, seed, size=64, step_weights=None, step_masks=None):
    """Plain diffusers render where each step is Σ_lane mask ⊙ ε(lane's adapters, lane's prompt).

    ``lanes``: ``[(adapter indices, weights, prompt, mask [h, w] on the latent grid)]``; the prompt is encoded with
    those adapters at those weights. ``step_weights(step, lane)``, if given, gives the denoiser's adapter weights
    at a step (step windows); ``step_masks(step, lane)``, if given, a weight that replaces the lane's mask at that
    step, or None to keep the mask (e.g. a warm-up that averages the lanes)."""
    pipe = build_tiny_sdxl() if family == "sdxl" else build_tiny_flux()
    names = load_adapters(pipe, files)

    def activate(indices, weights):
        if indices:
            pipe.set_adapters([names[i] for i in indices], list(weights))
        else:  # no adapter: one at weight 0 leaves the model (and its text encoders) as they are
            pipe.set_adapters([names[0]], [0.0])

    embeds = []
    for indices, weights, prompt, _ in lanes:
        activate(indices, weights)
        embeds.append(_encode(pipe, family, prompt))
    denoiser = pipe.unet if family == "sdxl" else pipe.transformer
    original = denoiser.forward

    step = {"i": 0}

    def masked(*args, **kwargs):
        out = 0
        for lane, ((indices, weights, _, mask), embed) in enumerate(zip(lanes, embeds)):
            activate(indices, weights if step_weights is None else step_weights(step["i"], lane))
            kw = dict(kwargs, encoder_hidden_states=embed["encoder_hidden_states"])
            if family == "sdxl":
                kw["added_cond_kwargs"] = {**kw["added_cond_kwargs"], "text_embeds": embed["text_embeds"]}
                m = mask[None, None]  # over [B, C, h, w]
            else:
                kw["pooled_projections"] = embed["pooled_projections"]
                m = mask.reshape(1, -1, 1)  # packed tokens, row-major over the 2x2 patch grid
            override = None if step_masks is None else step_masks(step["i"], lane)
            out = out + (m if override is None else override) * original(*args, **kw)[0]
        return (out,)

    denoiser.forward = masked
    first = embeds[0]
    call = dict(num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
                callback_on_step_end=lambda p, i, t, kw: step.update(i=i + 1) or {})
    call |= prompt_embedding_kwargs(family, first)
    with torch.no_grad():
        return pipe(**call).images[0]


def test_sdxl_regions_equal_masked_plain_passes(sdxl_te_loras, sdxl_loras):
    """Two regions (left half; top-right quadrant), a global LoRA (with a per-block weight) in every lane, the base
    lane in the rest."""
    files = [sdxl_te_loras[0], sdxl_te_loras[1], sdxl_loras[0]]
    h = w = 32  # 64 px through the tiny VAE (scale 2)
    left, top_right, base = torch.zeros(h, w), torch.zeros(h, w), torch.ones(h, w)
    left[:, :16] = 1
    top_right[:16, 16:] = 1
    base -= left + top_right
    g = {"unet": {"down": 0.6, "mid": 0.3, "up": 0.6}}  # the global LoRA at 0.6 with per-block weight mid=0.5
    lanes = [([2], [g], PROMPT, base),
             ([0, 2], [0.9, g], f"{PROMPT}, a red cube", left),
             ([1, 2], [0.8, g], f"{PROMPT}, a blue ball", top_right)]
    expected = masked_reference("sdxl", files, lanes, steps=3, guidance=5.0, seed=4)
    studio = Studio("tiny-sdxl-random")
    loras = [Lora(files[0], 0.9, region="left", prompt="a red cube"),
             Lora(files[1], 0.8, region="0.5,0,1,0.5", prompt="a blue ball"), Lora(files[2], 0.6, blocks={"mid": 0.5})]
    batches = []
    hook = studio.pipe.unet.conv_in.register_forward_pre_hook(lambda m, a: batches.append(a[0].shape[0]))
    result = studio.compose(PROMPT, loras, "regional", output_type="np", steps=3, seed=4, guidance=5.0,
                            negative_prompt=NEGATIVE)
    hook.remove()
    np.testing.assert_allclose(result.latents[0], expected, atol=ATOL, rtol=0)
    assert batches == [3 * 2] * 3  # three lanes (x2 for guidance) in one batched forward per step
    # in chunks of one lane the image is the same
    chunked = studio.compose(PROMPT, loras, "regional", output_type="np", steps=3, seed=4, guidance=5.0,
                             negative_prompt=NEGATIVE, max_lanes=1)
    np.testing.assert_allclose(chunked.latents[0], expected, atol=ATOL, rtol=0)
    assert [r["coverage"] for r in result.strategy_info["regions"]] == [0.5, 0.25]
    # the region prompts reach their lanes: without them the image changes
    plain = [Lora(files[0], 0.9, region="left"), Lora(files[1], 0.8, region="0.5,0,1,0.5"),
             Lora(files[2], 0.6, blocks={"mid": 0.5})]
    other = studio.compose(PROMPT, plain, "regional", output_type="np", steps=3, seed=4, guidance=5.0,
                           negative_prompt=NEGATIVE)
    assert np.abs(other.latents[0] - expected).max() > 10 * ATOL
    # recipes carry regions and region prompts, and reproduce the image
    recipe = result.recipes[0]
    assert [(entry.region, entry.prompt) for entry in recipe.loras] == [
        ("left", "a red cube"), ("0.5,0,1,0.5", "a blue ball"), (None, None)]
    assert "region" not in recipe.from_toml(recipe.to_toml()).loras[2].to_lora_kwargs() or \
        recipe.from_toml(recipe.to_toml()).loras[2].region is None
    assert recipe.from_toml(recipe.to_toml()).loras[0].prompt == "a red cube"


def test_flux_region_lane_and_base_lane_on_tokens(flux_loras):
    """FLUX: LoRA A global, LoRA B (with a text-encoder part) on the right half with its region prompt; masks on
    the 16x16 token grid."""
    files = flux_loras
    tokens = torch.zeros(16, 16)
    tokens[:, 8:] = 1
    lanes = [([0], [0.9], PROMPT, 1 - tokens), ([0, 1], [0.9, 0.7], f"{PROMPT}, a blue ball", tokens)]
    expected = masked_reference("flux", files, lanes, steps=3, guidance=3.5, seed=6)
    studio = Studio("tiny-flux-random")
    loras = [f"{files[0]}:0.9", f"{files[1]}:0.7:region=right:prompt=a blue ball"]
    got = studio.compose(PROMPT, loras, "regional", output_type="np", steps=3, seed=6, guidance=3.5).latents[0]
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
    # a step window: B (end=0.5) leaves its lane's denoiser from step 2 of 3 on; its region prompt, encoded with its
    # text-encoder part, stays
    windowed = [f"{files[0]}:0.9", f"{files[1]}:0.7:end=0.5:region=right:prompt=a blue ball"]
    expected_window = masked_reference("flux", files, lanes, steps=3, guidance=3.5, seed=6,
                                       step_weights=lambda i, lane: [0.9] if lane == 0 else [0.9, 0.7 if i < 2 else 0.0])
    got_window = studio.compose(PROMPT, windowed, "regional", output_type="np", steps=3, seed=6, guidance=3.5).latents[0]
    np.testing.assert_allclose(got_window, expected_window, atol=ATOL, rtol=0)
    assert np.abs(got_window - got).max() > 10 * ATOL
    # regional_until: after half the steps a merge of both LoRAs on the global prompt; differs from all-regional
    late = studio.compose(PROMPT, loras, "regional", strategy_params={"regional_until": 0.5}, output_type="np",
                          steps=3, seed=6, guidance=3.5).latents[0]
    assert np.abs(late - got).max() > 10 * ATOL


def test_lane_weights_sum_to_one_and_feather():
    masks = [rasterise("left", 12, 16), rasterise("0.25,0,1,0.5", 12, 16)]
    hard = lane_weights(masks)
    assert torch.allclose(hard.sum(0), torch.ones(12, 16))
    assert hard[1, 6, 0] == 1 and hard[0, 11, 15] == 1 and hard[1, 0, 5] == 0.5 and hard[2, 0, 5] == 0.5
    soft = lane_weights(masks, sigma=1.5)
    assert torch.allclose(soft.sum(0), torch.ones(12, 16), atol=1e-6)
    assert 0 < soft[1, 8, 8] < 1 and soft[1, 8, 0] > 0.99  # soft across the edge, flat far from it
    assert rasterise("middle-third", 3, 9)[:, 3:6].all() and rasterise("middle-third", 3, 9).sum() == 9


def test_bad_regions_fail_before_rendering(tmp_path, flux_loras):
    f = str(flux_loras[0])
    with pytest.raises(StudioError, match="outside the image"):
        Lora(f, region="0,0,1.5,1")
    with pytest.raises(StudioError, match="empty"):
        Lora(f, region="0.5,0,0.5,1")
    with pytest.raises(StudioError, match="whole image"):
        Lora(f, region="0,0,1,1")
    assert Lora.parse(f"{f}:0.5:region=AUTO").region == "auto"  # automatic regions: tests/test_auto_regions.py
    with pytest.raises(StudioError, match="not found"):
        Lora(f, region=str(tmp_path / "nope.png"))
    (tmp_path / "fake.png").write_bytes(b"not a png at all")
    with pytest.raises(StudioError, match="not a readable image"):
        Lora(f, region=str(tmp_path / "fake.png"))
    Image.new("L", (8, 8), 0).save(tmp_path / "black.png")
    with pytest.raises(StudioError, match="empty"):
        Lora(f, region=str(tmp_path / "black.png"))
    Image.new("L", (8, 8), 255).save(tmp_path / "white.png")
    with pytest.raises(StudioError, match="whole image"):
        Lora(f, region=str(tmp_path / "white.png"))
    mask = Image.new("L", (8, 8), 0)
    mask.paste(255, (0, 0, 4, 8))
    mask.save(tmp_path / "half.png")
    assert torch.equal(rasterise(str(tmp_path / "half.png"), 4, 4), rasterise("left", 4, 4))  # resized to the grid
    studio = Studio("tiny-flux-random")
    for strategy in ("merge", "composite", "switch"):
        with pytest.raises(StudioError, match="only the 'regional' strategy"):
            studio.compose(PROMPT, [f"{f}:0.5:region=left"], strategy, steps=2)
    # no region at all: regional says it rendered a merge, and did
    fallback = studio.compose(PROMPT, [f"{f}:0.5"], "regional", steps=2, output_type="np")
    assert "rendered as merge" in fallback.strategy_info["fallback"]
    merged = studio.compose(PROMPT, [f"{f}:0.5"], "merge", steps=2, output_type="np")
    np.testing.assert_array_equal(fallback.latents[0], merged.latents[0])
    with pytest.raises(StudioError, match="smaller than one cell"):
        studio.compose(PROMPT, [f"{f}:0.5:region=0,0,0.01,0.01"], "regional", steps=2)
    with pytest.raises(StudioError, match="unknown option 'regoin'"):
        Lora.parse(f"{f}:0.5:regoin=left")
    assert make_strategy("regional").params  # listed from the registry with its parameters


def test_cli_mask_region_and_png_recipe_reproduce(flux_loras, tmp_path):
    """`studio render --lora PATH:W:region=MASK.png:prompt=...`, then `render --recipe` of the PNG: same pixels,
    the mask file found through the recipe's folder policy (allowed with --allow-path)."""
    from typer.testing import CliRunner

    from studio.cli import app

    masks = tmp_path / "masks"
    masks.mkdir()
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    mask.save(masks / "middle.png")
    out, again = tmp_path / "out", tmp_path / "again"
    runner = CliRunner()
    args = ["render", PROMPT, "--lora", f"{flux_loras[0]}:0.9",
            "--lora", f"{flux_loras[1]}:0.7:region={masks / 'middle.png'}:prompt=a blue ball",
            "--strategy", "regional", "--param", "feather=1", "--steps", "2", "--seed", "3", "--out", str(out),
            "--model", "tiny-flux-random"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    (png,) = sorted(out.glob("*.png"))
    from studio import Recipe

    recipe = Recipe.from_png(png)
    assert recipe.loras[1].region == str(masks / "middle.png") and recipe.loras[1].prompt == "a blue ball"
    result = runner.invoke(app, ["render", "--recipe", str(png), "--out", str(again),
                                 "--allow-path", str(flux_loras[0].parent.parent)])
    assert result.exit_code != 0 and "middle.png" in result.output and "outside the folders" in result.output
    result = runner.invoke(app, ["render", "--recipe", str(png), "--out", str(again),
                                 "--allow-path", str(flux_loras[0].parent.parent), "--allow-path", str(masks)])
    assert result.exit_code == 0, result.output
    (png2,) = sorted(again.glob("*.png"))
    assert np.array_equal(np.asarray(Image.open(png2)), np.asarray(Image.open(png)))
    result = runner.invoke(app, ["render", PROMPT, "--lora", f"{flux_loras[0]}:0.9:region=left", "--strategy",
                                 "merge", "--steps", "1", "--out", str(out), "--model", "tiny-flux-random"])
    assert result.exit_code != 0 and "only the 'regional' strategy" in result.output


def test_grid_mask_regions_go_through_the_grid_path_policy(flux_loras, tmp_path):
    from studio.grid import GridError, build_stack
    from studio.path_policy import PathPolicy

    grid_dir, elsewhere = tmp_path / "grid", tmp_path / "elsewhere"
    grid_dir.mkdir(), elsewhere.mkdir()
    mask = Image.new("L", (8, 8), 0)
    mask.paste(255, (0, 0, 4, 8))
    mask.save(grid_dir / "left.png"), mask.save(elsewhere / "left.png")
    policy = PathPolicy(grid_dir, allowed=[flux_loras[0].parent])
    entry = f"{flux_loras[0]}:0.8:region=left.png:prompt=a cat"
    stack = build_stack("s", [entry], base_dir=grid_dir, lora_dir=None, origin=str(grid_dir / "g.toml"), policy=policy)
    (lora,) = stack.loras
    assert lora.region == str((grid_dir / "left.png").resolve()) and lora.prompt == "a cat" and lora.weight == 0.8
    with pytest.raises(GridError, match="region mask .*outside the folders"):
        build_stack("s", [f"{flux_loras[0]}:0.8:region={elsewhere / 'left.png'}"], base_dir=grid_dir, lora_dir=None,
                    origin=str(grid_dir / "g.toml"), policy=policy)


def test_spatial_plan_checks_and_token_layout():
    from pipelines.seam import StepPlan, _reduce

    gains = torch.eye(2)
    with pytest.raises(ValueError, match="sum to one"):
        StepPlan(gains=gains, weights=torch.full((2, 4, 4), 0.4))
    with pytest.raises(ValueError, match="bad plan"):
        StepPlan(gains=gains, weights=torch.ones(3, 4))
    left = torch.zeros(2, 4)
    left[0, :2], left[1, 2:] = 1, 1
    x = torch.arange(2 * 1 * 4 * 3, dtype=torch.float32).view(2, 4, 3)  # two lanes of one sample, [tokens, C]
    out = _reduce([x], 2, 1, left, tokens_first=True)
    assert torch.equal(out[0, :2], x[0, :2]) and torch.equal(out[0, 2:], x[1, 2:])
    with pytest.raises(ValueError, match="does not fit"):
        _reduce([x], 2, 1, torch.full((2, 5), 0.5), tokens_first=True)


def test_a_cut_off_region_prompt_is_reported(sdxl_loras):
    studio = Studio("tiny-sdxl-random")
    long_prompt = " ".join(["a very detailed painting"] * 20)  # > 77 CLIP tokens
    result = studio.compose(long_prompt, [f"{sdxl_loras[0]}:0.8:region=left:prompt=a red cube"], "regional",
                            steps=1, output_type="np")
    assert "cut off" in result.strategy_info["truncated"]
    short = studio.compose(PROMPT, [f"{sdxl_loras[0]}:0.8:region=left:prompt=a red cube"], "regional", steps=1,
                           output_type="np")
    assert "truncated" not in short.strategy_info


def test_the_demo_leaves_out_strategies_that_need_regions():
    """The demo's stacks carry no regions: `regional` would only repeat merge there, every other strategy runs."""
    from studio.strategies import REGISTRY
    from studio.world.demo import all_strategies

    names = all_strategies()
    assert "regional" not in names and "merge" in names and "composite" in names
    assert set(names) == {name for name, cls in REGISTRY.items() if not cls.uses_regions}
