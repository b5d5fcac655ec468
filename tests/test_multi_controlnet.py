"""Multi-ControlNet: lists of control images, ControlNets and scales (diffusers' ``MultiControlNetModel`` /
``FluxMultiControlNetModel``, built by the stock pipelines from a list). Two tiny ControlNets per family (seeded
differently); merge equals the stock ControlNet pipeline given the same two ControlNets with ``load_lora_weights`` +
``set_adapters``; composite equals N plain passes averaged; recipes (API and CLI) reproduce; mismatched lists and a
ControlNet for another base are refused naming the position."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from PIL import Image
from pipelines.errors import StudioError
from pipelines.tiny import build_tiny_flux, build_tiny_flux_controlnet, build_tiny_sdxl, build_tiny_sdxl_controlnet
from reference import load_adapters, run_lanes
from studio import Recipe, Studio
from test_controlnet import CONTROL_ARG, PIPES, guidance
from test_modes import ATOL, PROMPT, input_image


@pytest.fixture(scope="module")
def pairs():
    return {"sdxl": [build_tiny_sdxl_controlnet(build_tiny_sdxl().unet, seed=s) for s in (1, 2)],
            "flux": [build_tiny_flux_controlnet(build_tiny_flux().transformer, seed=s) for s in (1, 2)]}


@pytest.fixture(scope="module")
def studios():
    return {family: Studio(f"tiny-{family}-random") for family in ("sdxl", "flux")}


def plain(family: str, controlnets):
    base = build_tiny_sdxl() if family == "sdxl" else build_tiny_flux()
    pipe = PIPES[family](**base.components, controlnet=list(controlnets))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_merge_with_two_controlnets_equals_plain_multi_controlnet_pipeline(family, pairs, studios, sdxl_loras,
                                                                           flux_loras):
    files, weights = (sdxl_loras[:2] if family == "sdxl" else flux_loras), [0.8, 0.6]
    controls, scales = [input_image(7), input_image(8)], [0.7, 0.4]
    ref = plain(family, pairs[family])
    ref.set_adapters(load_adapters(ref, files), weights)
    with torch.no_grad():
        expected = ref(PROMPT, num_inference_steps=3, guidance_scale=guidance(family), height=64, width=64,
                       controlnet_conditioning_scale=scales, **{CONTROL_ARG[family]: controls},
                       generator=torch.Generator("cpu").manual_seed(3), output_type="np").images[0]
    loras = [f"{f}:{w}" for f, w in zip(files, weights)]
    common = dict(steps=3, seed=3, guidance=guidance(family), width=64, height=64, output_type="np")
    result = studios[family].compose(PROMPT, loras, "merge", control_image=controls, controlnet=pairs[family],
                                     controlnet_conditioning_scale=scales, **common)
    np.testing.assert_allclose(result.latents[0], expected, atol=ATOL, rtol=0)
    recipe = result.recipe
    assert (recipe.mode, recipe.controlnet, recipe.controlnet_conditioning_scale) == (
        "controlnet", ["<ControlNet>", "<ControlNet>"], scales)
    assert sorted(recipe.inputs) == ["control_image", "control_image_2"]
    # the second ControlNet matters: with only the first the image differs
    one = studios[family].compose(PROMPT, loras, "merge", control_image=controls[0], controlnet=pairs[family][0],
                                  controlnet_conditioning_scale=0.7, **common).latents[0]
    assert np.abs(one - expected).max() > 10 * ATOL


def test_composite_with_two_controlnets_equals_averaged_plain_passes(pairs, studios, sdxl_loras):
    files, weights = sdxl_loras[:2], [0.9, 0.7]
    controls = [input_image(8), input_image(9)]
    ref = plain("sdxl", pairs["sdxl"])
    names = load_adapters(ref, files)
    expected = run_lanes(ref, "sdxl", lambda s: [(0, 0.5), (1, 0.5)], names=names, weights=weights, prompt=PROMPT,
                         negative_prompt="blurry", steps=3, guidance=5.0, seed=9,
                         pipeline_kwargs={"image": controls, "controlnet_conditioning_scale": [1.0, 0.5]})
    result = studios["sdxl"].compose(PROMPT, [f"{f}:{w}" for f, w in zip(files, weights)], "composite", steps=3,
                                     seed=9, guidance=5.0, negative_prompt="blurry", width=64, height=64,
                                     output_type="np", control_image=controls, controlnet=pairs["sdxl"],
                                     controlnet_conditioning_scale=[1.0, 0.5])
    np.testing.assert_allclose(result.latents[0], expected, atol=ATOL, rtol=0)


def test_multi_controlnet_recipe_round_trip_api_and_cli(pairs, sdxl_loras, tmp_path):
    from typer.testing import CliRunner

    from studio.cli import app

    for i, net in enumerate(pairs["sdxl"]):
        net.save_pretrained(tmp_path / f"cn{i}")
        input_image(7 + i).save(tmp_path / f"control{i}.png")
    runner = CliRunner()
    args = ["render", PROMPT, "--model", "tiny-sdxl-random", "--steps", "2", "--lora", f"{sdxl_loras[0]}:0.8",
            "--control-image", str(tmp_path / "control0.png"), "--controlnet", str(tmp_path / "cn0"),
            "--control-image", str(tmp_path / "control1.png"), "--controlnet", str(tmp_path / "cn1"),
            "--controlnet-scale", "0.6", "--out", str(tmp_path / "a")]
    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    [png] = sorted((tmp_path / "a").glob("*.png"))
    recipe = Recipe.load(png)
    assert recipe.controlnet == [str((tmp_path / f"cn{i}").resolve()) for i in range(2)]
    assert recipe.controlnet_conditioning_scale == [0.6, 0.6] and sorted(recipe.inputs) == ["control_image",
                                                                                            "control_image_2"]
    again = runner.invoke(app, ["render", "--recipe", str(png), "--allow-path", str(tmp_path), "--allow-path",
                                str(sdxl_loras[0].parent), "--out", str(tmp_path / "b")])
    assert again.exit_code == 0, again.output
    [png2] = sorted((tmp_path / "b").glob("*.png"))
    np.testing.assert_array_equal(np.asarray(Image.open(png2).convert("RGB")), np.asarray(Image.open(png).convert("RGB")))
    # the TOML form round-trips, and a recipe whose lists disagree is refused
    assert Recipe.from_toml(recipe.to_toml()) == recipe
    broken = recipe.to_dict() | {"controlnet_conditioning_scale": [0.6]}
    with pytest.raises(StudioError, match="a list of 2 numbers, one per ControlNet"):
        Recipe.from_dict(broken)
    # reproducing with the control images moved: passed again, in order (the order matters)
    for i in range(2):
        (tmp_path / f"control{i}.png").rename(tmp_path / f"moved{i}.png")
    studio = Studio("tiny-sdxl-random")
    with pytest.raises(StudioError, match="control image 2 .*is missing; pass the same file with --control-image \\(#2\\)"):
        studio.reproduce(recipe, control_image=[tmp_path / "moved0.png"])
    with pytest.raises(StudioError, match="is not the control image the recipe was made from"):
        studio.reproduce(recipe, control_image=[tmp_path / "moved1.png", tmp_path / "moved0.png"])
    moved = studio.reproduce(recipe, control_image=[tmp_path / f"moved{i}.png" for i in range(2)])
    np.testing.assert_array_equal(np.asarray(moved.image), np.asarray(Image.open(png).convert("RGB")))


def test_bad_multi_controlnet_inputs_are_refused_before_rendering(pairs, studios, sdxl_loras):
    studio = studios["sdxl"]
    calls = []
    hook = studio.pipe.unet.register_forward_pre_hook(lambda m, a: calls.append(1))
    two = [input_image(7), input_image(8)]
    cases = [
        (dict(control_image=two, controlnet=pairs["sdxl"][:1] * 3), "2 control images but 3 ControlNets"),
        (dict(control_image=two, controlnet=pairs["sdxl"][0]), "2 control images need 2 ControlNets"),
        (dict(control_image=two, controlnet=pairs["sdxl"], controlnet_conditioning_scale=[1.0, 0.5, 0.2]),
         "2 control images but 3 conditioning scales"),
        (dict(control_image=two, controlnet=[pairs["sdxl"][0], pairs["flux"][0]]),
         "ControlNet #2: controlnet: a SDXL ControlNet must be a diffusers ControlNetModel, got FluxControlNetModel"),
        (dict(control_image=input_image(7), controlnet=pairs["sdxl"]), "several ControlNets .* need as many control"),
    ]
    try:
        for kwargs, message in cases:
            with pytest.raises(StudioError, match=message):
                studio.compose(PROMPT, [f"{sdxl_loras[0]}:0.8"], steps=2, **kwargs)
        assert not calls
    finally:
        hook.remove()


def test_users_multi_controlnet_pipeline_through_from_pipe(pairs, sdxl_loras):
    """A user's pipeline built with two ControlNets: its own MultiControlNetModel, one control image each."""
    pipe = plain("sdxl", pairs["sdxl"])
    assert type(pipe.controlnet).__name__ == "MultiControlNetModel"
    studio = Studio.from_pipe(pipe)
    got = studio.compose(PROMPT, [f"{sdxl_loras[0]}:0.8"], steps=2, width=64, height=64, output_type="np",
                         control_image=[input_image(7), input_image(8)], controlnet_conditioning_scale=[0.5, 0.5])
    assert got.recipe.controlnet == ["<pipeline>", "<pipeline>"] and np.isfinite(got.latents[0]).all()
    with pytest.raises(StudioError, match="own ControlNet holds 2 ControlNets; give as many control images"):
        studio.compose(PROMPT, [], steps=2, width=64, height=64, control_image=input_image(7))
    studio.unload()
