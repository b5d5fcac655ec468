"""The composed adapter layer: restore bit for bit, per-sample gains, block weights, step windows, no re-injection."""

from __future__ import annotations

import numpy as np
import torch
from conftest import unet_inputs
from safetensors.torch import load_file

import writers
from pipelines.composed import ComposedLinear
from pipelines.tiny import build_tiny_sdxl
from reference import load_adapters
from studio import Studio


def test_unloading_everything_restores_base_bit_for_bit(sdxl_te_loras, sdxl_loras, tmp_path):
    ref_pipe = build_tiny_sdxl()
    loha, _ = writers.lycoris_network(ref_pipe, ref_pipe.unet, tmp_path / "loha.safetensors", "loha", seed=3,
                                      preset=writers.LYCORIS_SDXL_PRESET, dora_wd=True)
    base = build_tiny_sdxl()
    studio = Studio("tiny-sdxl-random")
    before = {k: type(m) for k, m in studio.pipe.unet.named_modules()}
    studio.compose("a corgi", [*sdxl_te_loras, sdxl_loras[0], loha], "composite", steps=2)
    assert any(isinstance(m, ComposedLinear) for m in studio.pipe.unet.modules())
    studio.unload()
    assert {k: type(m) for k, m in studio.pipe.unet.named_modules()} == before
    for component in ("unet", "text_encoder", "text_encoder_2"):
        ours = getattr(studio.pipe, component).state_dict()
        theirs = getattr(base, component).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    inputs = unet_inputs()
    with torch.no_grad():
        assert torch.equal(studio.pipe.unet(**inputs).sample, base.unet(**inputs).sample)


def test_state_dict_keys_unchanged_while_composed(sdxl_loras):
    studio = Studio("tiny-sdxl-random")
    keys = set(studio.pipe.unet.state_dict())
    studio.load(sdxl_loras)
    assert set(studio.pipe.unet.state_dict()) == keys


def test_changing_weights_and_active_set_needs_no_reinjection(sdxl_loras):
    studio = Studio("tiny-sdxl-random")
    names = studio.load(sdxl_loras)
    layers = dict(studio.composer.layers)
    studio.compose("a corgi", [f"{sdxl_loras[0]}:0.3"], "merge", steps=1)
    studio.compose("a corgi", [f"{sdxl_loras[2]}:0.9", f"{sdxl_loras[1]}:0.1"], "composite", steps=1)
    assert studio.composer.layers == layers  # the same module objects
    assert studio.composer.names() == names  # nothing re-parsed or re-attached


def test_per_sample_gains_equal_separate_runs(sdxl_loras):
    """One batch with a different adapter mix per sample equals the samples run one by one."""
    studio = Studio("tiny-sdxl-random")
    names = studio.load(sdxl_loras)
    state = studio.composer.state
    state.set_active(names)
    mixes = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.7, 0.3], [0.5, 0.5, 0.5]])
    inputs = unet_inputs(batch=3)
    state.set_gains(denoiser=mixes)
    with torch.no_grad():
        batched = studio.pipe.unet(**inputs).sample
    for i in range(3):
        state.set_gains(denoiser=mixes[i : i + 1])
        single = {k: (v[i : i + 1] if torch.is_tensor(v) else {kk: vv[i : i + 1] for kk, vv in v.items()})
                  for k, v in inputs.items()}
        with torch.no_grad():
            torch.testing.assert_close(batched[i : i + 1], studio.pipe.unet(**single).sample, atol=1e-5, rtol=0)


def test_block_weights_equal_dropping_those_blocks(sdxl_te_loras, tmp_path):
    """LoRA weight 0 on te1, te2, down.* and mid equals loading the file without those modules (diffusers)."""
    from safetensors import safe_open

    sd = load_file(str(sdxl_te_loras[0]))
    with safe_open(str(sdxl_te_loras[0]), "pt") as f:
        metadata = f.metadata()  # keeps diffusers' LoraConfig (alpha) for the reference loader
    kept = {k: v for k, v in sd.items() if k.startswith("unet.up_blocks.")}
    filtered = writers.write_state_dict(tmp_path / "up-only.safetensors", kept, metadata)
    ref = build_tiny_sdxl()
    load_adapters(ref, [filtered])
    with torch.no_grad():
        expected = ref("a corgi", num_inference_steps=3, guidance_scale=5.0, height=64, width=64,
                       generator=torch.Generator("cpu").manual_seed(2), output_type="np").images[0]
    studio = Studio("tiny-sdxl-random")
    lora = {"source": sdxl_te_loras[0], "blocks": {"te": 0, "down": 0, "mid": 0}}
    got = studio.compose("a corgi", [lora], "merge", steps=3, seed=2, output_type="np").latents[0]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    # a preset name works the same way
    preset = studio.compose("a corgi", [{"source": sdxl_te_loras[0], "blocks": "style: outer blocks"}], "merge",
                            steps=3, seed=2, output_type="np").latents[0]
    assert np.abs(preset - got).max() > 1e-3


def test_step_window_matches_enabling_the_lora_midway(sdxl_loras):
    """A LoRA with start=0.5 over 4 steps contributes to steps 2 and 3 only."""
    ref = build_tiny_sdxl()
    (name,) = load_adapters(ref, sdxl_loras[:1])
    ref.set_adapters([name], [0.0])

    def switch_on(pipe, i, t, kw):
        if i + 1 == 2:
            pipe.set_adapters([name], [0.8])
        return {}

    with torch.no_grad():
        expected = ref("a corgi", num_inference_steps=4, guidance_scale=5.0, height=64, width=64,
                       generator=torch.Generator("cpu").manual_seed(4), output_type="np",
                       callback_on_step_end=switch_on).images[0]
    studio = Studio("tiny-sdxl-random")
    got = studio.compose("a corgi", [f"{sdxl_loras[0]}:0.8:start=0.5"], "merge", steps=4, seed=4,
                         output_type="np").latents[0]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_merge_result_is_reproducible_with_plain_diffusers(sdxl_loras):
    """Seed s means torch.Generator(device).manual_seed(s): the PNG equals diffusers' own output."""
    studio = Studio("tiny-sdxl-random")
    result = studio.compose("a red fox", [f"{sdxl_loras[0]}:0.7"], "merge", steps=3, seed=42)
    ref = build_tiny_sdxl()
    (name,) = load_adapters(ref, sdxl_loras[:1])
    ref.set_adapters([name], [0.7])
    with torch.no_grad():
        image = ref("a red fox", num_inference_steps=3, guidance_scale=result.recipe.guidance, height=64, width=64,
                    generator=torch.Generator("cpu").manual_seed(42)).images[0]
    diff = np.abs(np.asarray(image, dtype=int) - np.asarray(result.image, dtype=int))
    assert diff.max() <= 1
