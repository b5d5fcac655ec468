"""FLUX control LoRAs (BFL Canny/Depth and files like them) through diffusers' FluxControlPipeline.

The diffusers-layout files are written by third-party code only: a tiny ``FluxTransformer2DModel`` with the
studio's tiny FLUX config but twice the input channels (what a control LoRA is trained on: image latents and
control latents concatenated), PEFT's ``add_adapter`` on ``x_embedder`` and the attention/MLP layers (random
factors, as in ``writers.py``), optionally ``norm_q``/``norm_k`` scales, saved with diffusers'
``FluxControlPipeline.save_lora_weights``. The reference is the plain diffusers path: ``FluxControlPipeline``
with ``load_lora_weights`` (control LoRA first: diffusers widens ``x_embedder`` and writes the norms) and
``set_adapters``. BFL's own layout is converted by diffusers' converter at FLUX.1's full size (meta device) and
must give what the same LoRA gives in diffusers' layout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import writers
from PIL import Image

from fusion import REGISTRY
from pipelines.adapters import parse_lora
from pipelines.control_lora import applied_control_lora, read_control_lora
from pipelines.errors import IncompatibleLoraError, StudioError
from pipelines.families import FLUX
from pipelines.tiny import build_tiny_flux
from reference import load_adapters, run_lanes
from studio import Recipe, Studio
from test_from_pipe import assert_same, snapshot
from test_modes import ATOL, PROMPT, input_image

HOW = "apply it as the control LoRA \\(control_lora= / --control-lora\\)"


def write_control_lora(folder: Path, *, norms: bool, seed: int = 11, heads: int | None = None,
                       width_factor: int = 2) -> Path:
    """A diffusers-layout FLUX control LoRA for the tiny FLUX model (see the module docstring); ``heads`` and
    ``width_factor`` make one for another base."""
    from diffusers import FluxControlPipeline, FluxTransformer2DModel

    config = {k: v for k, v in build_tiny_flux().transformer.config.items() if not k.startswith("_")}
    config["out_channels"] = config["out_channels"] or config["in_channels"]
    config["in_channels"] = width_factor * config["in_channels"]
    if heads:
        config["num_attention_heads"] = heads
    torch.manual_seed(seed)
    wide = FluxTransformer2DModel(**config)
    layers, lora_config = writers.add_peft_adapter(wide, ["x_embedder", *writers.FLUX_TARGETS], 4, 4, seed, 0.05)
    if norms:
        gen = torch.Generator().manual_seed(seed)
        for name in ("transformer_blocks.0.attn.norm_q", "single_transformer_blocks.1.attn.norm_k"):
            dim = wide.get_submodule(name).weight.shape[0]
            layers[f"{name}.weight"] = 1 + 0.3 * torch.randn(dim, generator=gen)
    folder.mkdir(parents=True, exist_ok=True)
    FluxControlPipeline.save_lora_weights(str(folder), weight_name="control.safetensors", transformer_lora_layers=layers,
                                          transformer_lora_adapter_metadata=lora_config.to_dict())
    return folder / "control.safetensors"


def write_embedder_lora(folder: Path, seed: int) -> Path:
    """An ordinary FLUX LoRA that also changes ``x_embedder`` (diffusers pads it when a control LoRA widened it)."""
    from diffusers import FluxPipeline

    layers, config = writers.add_peft_adapter(build_tiny_flux().transformer, ["x_embedder", *writers.FLUX_TARGETS],
                                              4, 8, seed, 0.05)
    folder.mkdir(parents=True, exist_ok=True)
    FluxPipeline.save_lora_weights(str(folder), weight_name="lora.safetensors", transformer_lora_layers=layers,
                                   transformer_lora_adapter_metadata=config.to_dict())
    return folder / "lora.safetensors"


@pytest.fixture(scope="module")
def control_loras(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("control-loras")
    return {"norms": write_control_lora(folder / "with-norms", norms=True),
            "plain": write_control_lora(folder / "embedder-only", norms=False, seed=12),
            "user": write_embedder_lora(folder / "user-embedder", seed=13)}


@pytest.fixture(scope="module")
def studio() -> Studio:
    return Studio("tiny-flux-random")


def plain_control_pipeline():
    from diffusers import FluxControlPipeline

    base = build_tiny_flux()
    keys = FluxControlPipeline._get_signature_keys(FluxControlPipeline)[0]
    pipe = FluxControlPipeline(**{k: v for k, v in base.components.items() if k in keys})
    pipe.set_progress_bar_config(disable=True)
    return pipe


COMMON = dict(steps=3, seed=3, guidance=3.5, width=64, height=64, output_type="np")


def plain_call(pipe, control, **kw):
    with torch.no_grad():
        return pipe(PROMPT, control_image=control, num_inference_steps=3, guidance_scale=3.5, height=64, width=64,
                    generator=torch.Generator("cpu").manual_seed(3), output_type="np", **kw).images[0]


def test_written_files_are_control_loras_for_diffusers(control_loras):
    """The fixture files are what FluxControlPipeline loads as control LoRAs (its input layer is widened)."""
    pipe = plain_control_pipeline()
    width = pipe.transformer.x_embedder.in_features
    pipe.load_lora_weights(str(control_loras["norms"]))
    embedder = pipe.transformer.x_embedder
    assert getattr(embedder, "base_layer", embedder).in_features == 2 * width == pipe.transformer.config.in_channels
    assert np.isfinite(plain_call(pipe, input_image(1))).all()


def test_merge_with_control_lora_equals_plain_flux_control_pipeline(studio, control_loras, flux_loras):
    """User LoRAs (one with text-encoder parts, one on x_embedder too) + control LoRA at 0.8, merged: the plain
    FluxControlPipeline with load_lora_weights of all three and set_adapters."""
    control = input_image(5)
    users, weights = [flux_loras[1], control_loras["user"]], [0.7, 0.9]
    ref = plain_control_pipeline()
    names = load_adapters(ref, [control_loras["norms"], *users], ["control", "u0", "u1"])
    ref.set_adapters(names, [0.8, *weights])
    expected = plain_call(ref, control)
    loras = [f"{f}:{w}" for f, w in zip(users, weights)]
    result = studio.compose(PROMPT, loras, "merge", control_lora=f"{control_loras['norms']}:0.8",
                            control_image=control, **COMMON)
    np.testing.assert_allclose(result.latents[0], expected, atol=ATOL, rtol=0)
    assert result.recipe.mode == "control-lora" and result.recipe.control_lora["weight"] == 0.8
    assert result.recipe.control_lora["source"] == str(control_loras["norms"].resolve())
    # the control LoRA, its scale and the control image each matter
    for change in (dict(control_lora=f"{control_loras['norms']}:0.3"), dict(control_image=input_image(6))):
        other = studio.compose(PROMPT, loras, "merge", **{"control_lora": f"{control_loras['norms']}:0.8",
                                                          "control_image": control, **change}, **COMMON)
        assert np.abs(other.latents[0] - expected).max() > 10 * ATOL


def test_composite_with_control_lora_equals_averaged_plain_passes(studio, control_loras, flux_loras):
    """Every lane runs on the control-LoRA model: N plain FluxControlPipeline passes (control adapter active in
    each, the lane's LoRA and text conditioning alone) averaged per step."""
    control = input_image(8)
    files, weights = flux_loras, [0.9, 0.7]
    ref = plain_control_pipeline()
    names = load_adapters(ref, [control_loras["plain"], *files], ["control", "u0", "u1"])[1:]
    set_adapters = ref.set_adapters
    ref.set_adapters = lambda active, scales: set_adapters([*active, "control"], [*scales, 1.0])
    expected = run_lanes(ref, "flux", lambda s: [(0, 0.5), (1, 0.5)], names=names, weights=weights, prompt=PROMPT,
                         negative_prompt="", steps=3, guidance=3.5, seed=9, pipeline_kwargs={"control_image": control})
    result = studio.compose(PROMPT, [f"{f}:{w}" for f, w in zip(files, weights)], "composite", steps=3, seed=9,
                            guidance=3.5, width=64, height=64, output_type="np", control_lora=control_loras["plain"],
                            control_image=control)
    np.testing.assert_allclose(result.latents[0], expected, atol=ATOL, rtol=0)


def test_unload_restores_the_transformer_bit_for_bit(control_loras, flux_loras):
    """from_pipe + control LoRA + LoRAs, then text-to-image (control LoRA taken off), control again, unload: the
    user's pipeline as before, x_embedder's module, shape and parameters and the norm scales included."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline(**build_tiny_flux().components)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        pipe(PROMPT, num_inference_steps=1, height=64, width=64, output_type="np")
    before = snapshot(pipe)
    transformer = pipe.transformer
    embedder, weight = transformer.x_embedder, transformer.x_embedder.weight
    norm = transformer.transformer_blocks[0].attn.norm_q.weight
    base = Studio.from_pipe(pipe).compose(PROMPT, [], "merge", **COMMON).latents[0]
    studio = Studio.from_pipe(pipe)
    loras = [f"{flux_loras[0]}:0.8", f"{control_loras['user']}:0.5"]
    studio.compose(PROMPT, loras, "merge", control_lora=control_loras["norms"], control_image=input_image(1), **COMMON)
    assert transformer.x_embedder.original is embedder  # the user's x_embedder LoRA composes on the widened layer
    assert embedder.in_features == 32 == transformer.config.in_channels and embedder.weight.shape == (32, 32)
    assert not torch.equal(transformer.transformer_blocks[0].attn.norm_q.weight, norm)
    studio.compose(PROMPT, loras, "merge", **COMMON)  # text-to-image: the control LoRA comes off first
    assert applied_control_lora(pipe) is None and embedder.weight is weight and embedder.in_features == 16
    studio.compose(PROMPT, loras, "composite", control_lora=control_loras["norms"], control_image=input_image(1),
                   **COMMON)
    studio.unload()
    assert_same(pipe, before)
    assert embedder.weight is weight and transformer.transformer_blocks[0].attn.norm_q.weight is norm
    assert transformer.config.in_channels == 16 and embedder.in_features == 16
    np.testing.assert_array_equal(Studio.from_pipe(pipe).compose(PROMPT, [], "merge", **COMMON).latents[0], base)


def test_control_lora_recipe_round_trip_and_cli(control_loras, flux_loras, tmp_path):
    from typer.testing import CliRunner

    from studio.cli import app

    input_image(4).save(tmp_path / "edges.png")
    runner = CliRunner()
    args = ["render", PROMPT, "--model", "tiny-flux-random", "--steps", "2", "--lora", f"{flux_loras[0]}:0.8",
            "--strategy", "composite", "--control-lora", f"{control_loras['norms']}:0.7", "--control-image",
            str(tmp_path / "edges.png"), "--out", str(tmp_path / "a")]
    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    [png] = sorted((tmp_path / "a").glob("*.png"))
    recipe = Recipe.load(png)
    assert recipe.mode == "control-lora" and recipe.control_lora["weight"] == 0.7
    assert recipe.inputs["control_image"]["source"] == str((tmp_path / "edges.png").resolve())
    allow = ["--allow-path", str(tmp_path), "--allow-path", str(flux_loras[0].parent), "--allow-path",
             str(control_loras["norms"].parent)]
    again = runner.invoke(app, ["render", "--recipe", str(png), *allow, "--out", str(tmp_path / "b")])
    assert again.exit_code == 0, again.output
    [png2] = sorted((tmp_path / "b").glob("*.png"))
    np.testing.assert_array_equal(np.asarray(Image.open(png2).convert("RGB")),
                                  np.asarray(Image.open(png).convert("RGB")))
    # the recorded control LoRA must be allowed and unchanged
    denied = runner.invoke(app, ["render", "--recipe", str(png), *allow[:4], "--out", str(tmp_path / "c")])
    assert denied.exit_code != 0 and "control LoRA" in denied.output and "outside the folders" in denied.output
    other = runner.invoke(app, ["render", "--recipe", str(png), *allow, "--control-lora",
                                str(control_loras["plain"]), "--out", str(tmp_path / "c")])
    assert other.exit_code != 0 and "is not the control LoRA the recipe was made with" in other.output


def test_bad_control_loras_are_refused_and_nothing_stays_applied(studio, control_loras, flux_loras, tmp_path):
    transformer = studio.pipe.transformer
    studio.unload()
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(control_loras["norms"].read_bytes()[:-100])
    from safetensors.torch import load_file, save_file

    tampered = load_file(control_loras["norms"])  # one layer's up factor scaled: a change far beyond the layer's
    tampered["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"] *= 2e4
    save_file(tampered, tmp_path / "tampered.safetensors")
    edges = input_image(1)
    cases = [
        (dict(control_lora=write_control_lora(tmp_path / "wide", norms=False, heads=3), control_image=edges),
         "of its layers do not fit this FLUX model .*another base.*LoRA 48x48 vs layer 32x32"),
        (dict(control_lora=write_control_lora(tmp_path / "x3", norms=False, width_factor=3), control_image=edges),
         "x_embedder takes 48 input channels; a control LoRA for this model takes 32"),
        (dict(control_lora=truncated, control_image=edges), "truncated|shorter|size"),
        (dict(control_lora=tmp_path / "tampered.safetensors", control_image=edges),
         "transformer_blocks.0.attn.to_q: its change has norm .* times the layer's own weight"),
        (dict(control_lora=flux_loras[0], control_image=edges), "is not a control LoRA: .*pass it with the other LoRAs"),
        (dict(control_lora=control_loras["norms"]), "a control LoRA needs a control image"),
        (dict(control_lora=control_loras["norms"], control_image=input_image(1), controlnet="some/controlnet"),
         "controlnet cannot be combined"),
        (dict(control_lora=control_loras["norms"], control_image=input_image(1), mask_image=input_image(2)),
         "a mask .* needs the image it masks"),
        (dict(control_lora=f"{control_loras['norms']}:0.5:start=0.5", control_image=input_image(1)),
         "give a file and a weight only"),
    ]
    calls = []
    hook = transformer.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        for kwargs, message in cases:
            with pytest.raises(StudioError, match=message):
                studio.compose(PROMPT, [f"{flux_loras[0]}:0.8"], "merge", steps=2, **kwargs)
            assert applied_control_lora(studio.pipe) is None and not studio.composer.adapters
        # a failure after the control LoRA was applied (an ordinary LoRA file that does not fit) rolls it back
        with pytest.raises(StudioError, match="control LoRA in diffusers' layout"):
            studio.compose(PROMPT, [control_loras["plain"]], "merge", steps=2, control_lora=control_loras["norms"],
                           control_image=input_image(1))
        assert applied_control_lora(studio.pipe) is None
        assert not calls
    finally:
        hook.remove()
    after = transformer.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before) and transformer.x_embedder.in_features == 16
    # an SDXL model has no control LoRAs; a compiled transformer would keep its input width
    with pytest.raises(StudioError, match="made for FLUX.1"):
        Studio("tiny-sdxl-random").compose(PROMPT, [], steps=2, control_lora=control_loras["norms"],
                                           control_image=input_image(1))
    with pytest.raises(StudioError, match="not supported with compile="):
        Studio("tiny-flux-random", compile="eager").compose(PROMPT, [], steps=2, control_lora=control_loras["norms"],
                                                            control_image=input_image(1))


@pytest.mark.parametrize("kind, names", [("norms", "normalisation scales (transformer."),
                                         ("plain", "its x_embedder takes 32 input channels, the model's 16")])
def test_control_lora_given_as_ordinary_lora_is_refused(studio, control_loras, flux_loras, kind, names):
    transformer = studio.pipe.transformer
    attached = set(studio.composer.adapters)  # LoRAs stay attached between renders; none may be added here
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    with pytest.raises(IncompatibleLoraError, match="control LoRA in diffusers' layout") as info:
        studio.compose("a corgi", [flux_loras[0], control_loras[kind]], "merge", steps=2)
    message = str(info.value)
    assert str(control_loras[kind]) in message and names in message and "--control-lora" in message
    assert set(studio.composer.adapters) == attached
    after = transformer.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert transformer.x_embedder.in_features == 16 and transformer.config.in_channels == 16
    # also while a control LoRA is applied (the model's x_embedder is wide then; the base width decides)
    with pytest.raises(IncompatibleLoraError, match="its x_embedder takes 32 input channels, the model's 16"):
        studio.compose("a corgi", [control_loras["plain"]], "merge", steps=2, control_lora=control_loras["norms"],
                       control_image=input_image(1))


def _bfl_control_lora(gen, rank: int = 2) -> dict[str, torch.Tensor]:
    """A control LoRA in BFL's key layout at FLUX.1-dev's size (19 double, 38 single blocks, 3072 wide)."""
    def pair(name, out_f, in_f):
        return {f"{name}.lora_A.weight": torch.randn(rank, in_f, generator=gen) * 0.01,
                f"{name}.lora_B.weight": torch.randn(out_f, rank, generator=gen) * 0.01}

    d, t = 3072, {}
    for name, out_f, in_f in (("img_in", d, 128), ("txt_in", d, 4096), ("time_in.in_layer", d, 256),
                              ("time_in.out_layer", d, d), ("vector_in.in_layer", d, 768),
                              ("vector_in.out_layer", d, d), ("guidance_in.in_layer", d, 256),
                              ("guidance_in.out_layer", d, d), ("final_layer.linear", 64, d),
                              ("final_layer.adaLN_modulation.1", 2 * d, d)):
        t |= pair(name, out_f, in_f)
    for i in range(19):
        for side in ("img", "txt"):
            t |= pair(f"double_blocks.{i}.{side}_mod.lin", 6 * d, d) | pair(f"double_blocks.{i}.{side}_attn.qkv", 3 * d, d)
            t |= pair(f"double_blocks.{i}.{side}_attn.proj", d, d) | pair(f"double_blocks.{i}.{side}_mlp.0", 4 * d, d)
            t |= pair(f"double_blocks.{i}.{side}_mlp.2", d, 4 * d)
            for norm in ("query_norm", "key_norm"):
                t[f"double_blocks.{i}.{side}_attn.norm.{norm}.scale"] = 1 + 0.1 * torch.randn(128, generator=gen)
    for i in range(38):
        t |= pair(f"single_blocks.{i}.modulation.lin", 3 * d, d) | pair(f"single_blocks.{i}.linear1", 7 * d, d)
        t |= pair(f"single_blocks.{i}.linear2", d, 5 * d)
        for norm in ("query_norm", "key_norm"):
            t[f"single_blocks.{i}.norm.{norm}.scale"] = 1 + 0.1 * torch.randn(128, generator=gen)
    return t


def test_bfl_layout_at_full_size_reads_as_its_diffusers_layout(tmp_path):
    """BFL's layout (FLUX.1-Canny-dev-lora's keys), converted by diffusers, and the same LoRA saved in diffusers'
    layout by FluxControlPipeline.save_lora_weights read the same: every layer's ΔW and every norm scale, with
    x_embedder 128 wide on FLUX.1-dev's 64; given as an ordinary LoRA it is refused naming --control-lora."""
    from diffusers import FluxControlPipeline
    from test_formats_flux import FLUX1_CONFIG, init_empty_weights

    from diffusers import FluxTransformer2DModel
    import types

    with init_empty_weights():
        meta = types.SimpleNamespace(transformer=FluxTransformer2DModel(**FLUX1_CONFIG), text_encoder=None,
                                     text_encoder_2=None)
    bfl = writers.write_state_dict(tmp_path / "canny.safetensors", _bfl_control_lora(torch.Generator().manual_seed(3)))
    converted = FluxControlPipeline.lora_state_dict(str(bfl))
    layers = {k.removeprefix("transformer."): v for k, v in converted.items()}
    FluxControlPipeline.save_lora_weights(str(tmp_path / "diffusers"), transformer_lora_layers=layers,
                                          weight_name="canny.safetensors")
    from_bfl = read_control_lora(bfl, meta, FLUX)
    from_diffusers = read_control_lora(tmp_path / "diffusers" / "canny.safetensors", meta, FLUX)
    assert (from_bfl.input_width, from_bfl.base_width) == (128, 64)
    modules = {k.removeprefix("transformer.").split(".lora_")[0] for k in converted if ".lora_" in k}
    assert set(from_bfl.deltas) == set(from_diffusers.deltas) == modules and len(modules) > 19 * 12 + 38 * 6
    assert set(from_bfl.norms) == set(from_diffusers.norms) and len(from_bfl.norms) == 19 * 4 + 38 * 2
    for key in ("x_embedder", "transformer_blocks.4.attn.to_k", "single_transformer_blocks.7.proj_mlp"):
        torch.testing.assert_close(from_bfl.deltas[key].weight(), from_diffusers.deltas[key].weight())
    torch.testing.assert_close(from_bfl.deltas["x_embedder"].weight(),
                               converted["transformer.x_embedder.lora_B.weight"]
                               @ converted["transformer.x_embedder.lora_A.weight"])
    with pytest.raises(IncompatibleLoraError, match=f"control LoRA in BFL's layout.*{HOW}"):
        parse_lora(bfl, meta, FLUX)


def test_bf16_model_keeps_its_dtype_and_4bit_layers_are_refused(control_loras, flux_loras):
    """bf16: the new weights are stored in the layer's dtype and taking the control LoRA off restores them bit for
    bit. A transformer with a 4-bit layer (QuantLinear, pipelines.quant) is refused before anything changes."""
    from pipelines.quant.linear import QuantLinear

    studio = Studio("tiny-flux-random", dtype="bf16")
    transformer = studio.pipe.transformer
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    got = studio.compose(PROMPT, [f"{flux_loras[0]}:0.8"], "composite", steps=2, width=64, height=64,
                         output_type="np", control_lora=control_loras["norms"], control_image=input_image(1))
    assert np.isfinite(got.latents[0]).all()
    assert {p.dtype for p in transformer.parameters()} == {torch.bfloat16} and transformer.x_embedder.in_features == 32
    studio.unload()
    after = transformer.state_dict()
    assert all(torch.equal(after[k], before[k]) and after[k].dtype == before[k].dtype for k in before)
    # one layer of a transformer made 4-bit (an empty QuantLinear of the same shape)
    studio = Studio("tiny-flux-random")
    transformer = studio.pipe.transformer
    layer = transformer.transformer_blocks[0].ff.net[2]
    transformer.transformer_blocks[0].ff.net[2] = QuantLinear(layer.in_features, layer.out_features, fmt="int4",
                                                              group_size=16, rank=4)
    with pytest.raises(IncompatibleLoraError, match="this model is 4-bit \\(transformer_blocks.0.ff.net.2 is a "
                                                    "QuantLinear\\)"):
        studio.compose(PROMPT, [], steps=2, control_lora=control_loras["norms"], control_image=input_image(1))
    assert applied_control_lora(studio.pipe) is None and transformer.x_embedder.in_features == 16


@pytest.mark.parametrize("strategy", sorted(REGISTRY))
def test_every_strategy_renders_on_the_control_lora_model(strategy, studio, control_loras, flux_loras):
    """Every registered strategy runs with a control LoRA applied: lanes, caches, gates, regions (none here: the
    strategies that read them say so and fall back), derived weight-space adapters over a LoRA whose x_embedder
    factor was padded to the widened layer."""
    loras = [f"{flux_loras[0]}:0.8", f"{control_loras['user']}:0.6"]
    result = studio.compose(PROMPT, loras, strategy, steps=3, seed=1, width=64, height=64, output_type="np",
                            control_lora=control_loras["norms"], control_image=input_image(2))
    assert result.recipe.mode == "control-lora" and np.isfinite(result.latents[0]).all()


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_control_lora_img2img_and_inpaint_equal_plain_pipelines(mode, studio, control_loras, flux_loras):
    """With an input image (and mask): FluxControlImg2ImgPipeline / FluxControlInpaintPipeline, merge = plain."""
    import diffusers
    from test_modes import input_mask

    cls = {"img2img": diffusers.FluxControlImg2ImgPipeline, "inpaint": diffusers.FluxControlInpaintPipeline}[mode]
    ref = cls(**{k: v for k, v in build_tiny_flux().components.items() if k in cls._get_signature_keys(cls)[0]})
    ref.set_progress_bar_config(disable=True)
    ref.set_adapters(load_adapters(ref, [control_loras["norms"], flux_loras[0]], ["control", "u0"]), [0.9, 0.8])
    inputs = {"image": input_image(3), "strength": 0.7, **({"mask_image": input_mask()} if mode == "inpaint" else {})}
    expected = plain_call(ref, input_image(5), **inputs)
    result = studio.compose(PROMPT, [f"{flux_loras[0]}:0.8"], "merge", control_lora=f"{control_loras['norms']}:0.9",
                            control_image=input_image(5), **inputs, **COMMON)
    np.testing.assert_allclose(result.latents[0], expected, atol=ATOL, rtol=0)
    assert (result.recipe.mode, result.recipe.strength) == (f"control-lora-{mode}", 0.7)
    assert sorted(result.recipe.inputs) == sorted(["control_image", *(k for k in inputs if k != "strength")])
    # the recipe reads back and reproduces
    again = studio.reproduce(Recipe.from_toml(result.recipe.to_toml()), image=inputs["image"],
                             control_image=input_image(5), output_type="np",
                             **({"mask_image": inputs["mask_image"]} if mode == "inpaint" else {}))
    np.testing.assert_array_equal(again.latents[0], result.latents[0])
