"""``Studio.from_pipe``: a pipeline the user built is wrapped as it is, renders in every mode, and after
``unload()`` is bit for bit what it was (weights, module objects, forwards, hooks, scheduler)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffusers
from pipelines.errors import ModelLoadError, StudioError
from pipelines.modes import mode_pipeline
from pipelines.tiny import build_tiny_flux, build_tiny_sdxl
from reference import load_adapters
from studio import Studio
from test_modes import ATOL, PROMPT, input_image, input_mask

BUILDERS = {"sdxl": build_tiny_sdxl, "flux": build_tiny_flux}


def snapshot(pipe) -> dict:
    """Everything ``unload`` must give back: per component the module objects by name, their parameters and
    buffers (cloned), instance-level forwards and hooks; the scheduler object and its config."""
    shot = {"scheduler": (pipe.scheduler, dict(pipe.scheduler.config)), "components": {}}
    for name, component in pipe.components.items():
        if not isinstance(component, torch.nn.Module):
            continue
        shot["components"][name] = {
            "modules": [(path, id(m), type(m)) for path, m in component.named_modules()],
            "state": {k: v.detach().clone() for k, v in component.state_dict().items()},
            "patched": [path for path, m in component.named_modules() if "forward" in m.__dict__],
            "hooks": [(path, tuple(m._forward_hooks.values()), tuple(m._forward_pre_hooks.values()))
                      for path, m in component.named_modules() if m._forward_hooks or m._forward_pre_hooks],
            "dtype": {k: v.dtype for k, v in component.state_dict().items()},
        }
    return shot


def assert_same(pipe, before: dict) -> None:
    after = snapshot(pipe)
    assert after["scheduler"][0] is before["scheduler"][0]
    assert after["scheduler"][1] == before["scheduler"][1]
    for name, old in before["components"].items():
        new = after["components"][name]
        assert new["modules"] == old["modules"], f"{name}: modules differ"
        assert new["patched"] == old["patched"] == [], f"{name}: forward left patched"
        assert new["hooks"] == old["hooks"], f"{name}: hooks left behind"
        assert new["dtype"] == old["dtype"]
        assert new["state"].keys() == old["state"].keys()
        for key, value in old["state"].items():
            assert torch.equal(new["state"][key], value), f"{name}.{key} changed"


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_unload_gives_the_users_pipeline_back_bit_for_bit(family, sdxl_te_loras, flux_loras):
    pipe = BUILDERS[family]()
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():  # used once by its owner: transformers installs its own output hooks on a first run
        pipe(PROMPT, num_inference_steps=1, height=64, width=64, output_type="np")
    before = snapshot(pipe)
    studio = Studio.from_pipe(pipe)
    assert studio.pipe is pipe and studio.family.name == family
    files = sdxl_te_loras if family == "sdxl" else flux_loras
    loras = [f"{files[0]}:0.8", f"{files[1]}:0.6"]
    common = dict(steps=2, width=64, height=64, output_type="np")
    studio.compose(PROMPT, loras, "composite", **common)
    studio.compose(PROMPT, loras, "merge", image=input_image(), strength=0.6, **common)
    studio.compose(PROMPT, loras, "cat", image=input_image(), mask_image=input_mask(), strength=0.9,
                   scheduler="DPMSolverMultistepScheduler" if family == "sdxl" else None, **common)
    assert studio.composer.layers  # the LoRAs really were attached to the user's modules
    studio.unload()
    assert_same(pipe, before)


def test_mode_pipelines_share_the_users_modules_and_nothing_is_reloaded(monkeypatch, sdxl_loras):
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline.from_pipe(build_tiny_sdxl())  # the user's own img2img pipe
    pipe.set_progress_bar_config(disable=True)
    loaded = []

    def refuse(*args, **kwargs):
        loaded.append(args)
        raise AssertionError("the studio must not load weights for a pipeline it was given")

    for cls in (diffusers.DiffusionPipeline, diffusers.ModelMixin):
        monkeypatch.setattr(cls, "from_pretrained", classmethod(refuse))
    studio = Studio.from_pipe(pipe, model="my-sdxl")
    for mode in ("text2img", "img2img", "inpaint"):
        built = mode_pipeline(pipe, studio.family, mode)
        assert all(getattr(built, n) is getattr(pipe, n) for n in ("unet", "vae", "text_encoder", "text_encoder_2",
                                                                 "scheduler", "tokenizer"))
    assert mode_pipeline(pipe, studio.family, "img2img") is pipe
    result = studio.compose(PROMPT, [f"{sdxl_loras[0]}:0.7"], steps=2, width=64, height=64, output_type="np")
    assert result.latents[0].shape == (64, 64, 3) and result.recipe.model == "my-sdxl" and result.recipe.mode is None
    assert not loaded


def test_mode_pipelines_keep_a_half_precision_pipeline_as_it_is():
    """diffusers' from_pipe ends with ``.to(dtype)`` (float32 by default), which would cast the shared modules of
    a bf16 pipeline; the studio's mode pipelines do not."""
    pipe = build_tiny_sdxl().to(dtype=torch.bfloat16)
    studio = Studio.from_pipe(pipe)
    for mode in ("img2img", "inpaint"):
        mode_pipeline(pipe, studio.family, mode)
    assert {p.dtype for c in ("unet", "vae", "text_encoder") for p in getattr(pipe, c).parameters()} == {torch.bfloat16}


def test_from_pipe_with_the_users_scheduler_equals_plain_diffusers(sdxl_loras):
    """A user's pipeline with its own scheduler: studio merge = that pipeline with load_lora_weights +
    set_adapters, and the same image as a studio that loaded the model itself gets with that scheduler."""
    files, weights = sdxl_loras[:2], [0.9, 0.5]
    call = dict(num_inference_steps=3, guidance_scale=5.0, height=64, width=64, output_type="np")
    ref = build_tiny_sdxl()
    ref.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(ref.scheduler.config)
    ref.set_adapters(load_adapters(ref, files), weights)
    with torch.no_grad():
        expected = ref(PROMPT, generator=torch.Generator("cpu").manual_seed(4), **call).images[0]
    pipe = build_tiny_sdxl()
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    studio = Studio.from_pipe(pipe)
    got = studio.compose(PROMPT, [f"{f}:{w}" for f, w in zip(files, weights)], "merge", steps=3, seed=4,
                         guidance=5.0, width=64, height=64, output_type="np").latents[0]
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
    loaded = Studio("tiny-sdxl-random").compose(PROMPT, [f"{f}:{w}" for f, w in zip(files, weights)], "merge",
                                                steps=3, seed=4, guidance=5.0, width=64, height=64, output_type="np",
                                                scheduler="DPMSolverMultistepScheduler").latents[0]
    np.testing.assert_allclose(got, loaded, atol=1e-6, rtol=0)


def test_pipelines_the_studio_cannot_wrap_are_refused(sdxl_loras):
    class CommunitySDXL(diffusers.StableDiffusionXLPipeline):  # may run its own loop: not wrapped
        pass

    base = build_tiny_sdxl()
    with pytest.raises(ModelLoadError, match="CommunitySDXL is not a pipeline the studio can wrap.*"
                                             "StableDiffusionXLInpaintPipeline"):
        Studio.from_pipe(CommunitySDXL(**base.components))
    with pytest.raises(ModelLoadError, match="dict is not a pipeline the studio can wrap"):
        Studio.from_pipe({"unet": base.unet})
    with pytest.raises(StudioError, match="from_pipe uses the pipeline as it is; set device, dtype"):
        Studio.from_pipe(base, device="cpu", dtype="bf16")
    before = snapshot(base)
    base.load_lora_weights(str(sdxl_loras[0]), adapter_name="theirs")
    with pytest.raises(ModelLoadError, match="has diffusers/PEFT LoRA layers loaded.*unload_lora_weights"):
        Studio.from_pipe(base)
    base.unload_lora_weights()
    Studio.from_pipe(base).unload()
    assert_same(base, before)


def test_flux_fill_pipeline(flux_loras):
    """FLUX.1-Fill's transformer serves inpainting only; wrapped with from_pipe, merge equals the plain Fill
    pipeline with set_adapters, composite the average of plain passes, other modes are refused, and unload gives
    the pipeline back."""
    from pipelines.tiny import build_tiny_flux_fill
    from reference import run_lanes

    weights = [0.8, 0.6]
    inputs = {"image": input_image(3), "mask_image": input_mask()}
    call = dict(num_inference_steps=3, guidance_scale=3.5, height=64, width=64, output_type="np")
    ref = build_tiny_flux_fill()
    ref.set_progress_bar_config(disable=True)
    names = load_adapters(ref, flux_loras)
    ref.set_adapters(names, weights)
    with torch.no_grad():
        expected = ref(PROMPT, generator=torch.Generator("cpu").manual_seed(2), **inputs, **call).images[0]
    averaged = run_lanes(ref, "flux", lambda s: [(0, 0.5), (1, 0.5)], names=names, weights=weights, prompt=PROMPT,
                         negative_prompt="", steps=3, guidance=3.5, seed=2, pipeline_kwargs=inputs)
    pipe = build_tiny_flux_fill()
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        pipe(PROMPT, num_inference_steps=1, height=64, width=64, output_type="np", **inputs)
    before = snapshot(pipe)
    studio = Studio.from_pipe(pipe)
    loras = [f"{f}:{w}" for f, w in zip(flux_loras, weights)]
    common = dict(steps=3, seed=2, guidance=3.5, width=64, height=64, output_type="np")
    merged = studio.compose(PROMPT, loras, "merge", **inputs, **common)
    np.testing.assert_allclose(merged.latents[0], expected, atol=ATOL, rtol=0)
    assert (merged.recipe.mode, merged.recipe.strength) == ("inpaint", 1.0)  # FluxFillPipeline's default strength
    composite = studio.compose(PROMPT, loras, "composite", **inputs, **common)
    np.testing.assert_allclose(composite.latents[0], averaged, atol=ATOL, rtol=0)
    studio.unload()
    calls = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a: calls.append(1))
    for refused in ({}, {"image": input_image(3)}):
        with pytest.raises(StudioError, match="FluxFillPipeline's transformer is made for inpaint only"):
            studio.compose(PROMPT, loras, "merge", **refused, **common)
    hook.remove()
    assert not calls and not studio.composer.adapters  # refused before loading or rendering
    studio.unload()
    assert_same(pipe, before)
