"""SHiRA (sparse high-rank adapters) read from files PEFT's own SHiRA tuner wrote on the tiny models.

The composed layer applies them as a sparse product with live per-sample gains: it equals PEFT's forward, equals
the dense delta, stacks with ordinary LoRAs, fuses several SHiRAs as a sparse sum (with their support overlap
reported), and refuses damaged files with the layer and the problem named.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import unet_inputs
from peft import ShiraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import save_file

from fusion import make_strategy, merge_stack
from pipelines.adapters.kinds.shira import SparseDelta
from pipelines.composed import ComposedLinear, prepare_delta
from pipelines.errors import IncompatibleLoraError, LoraFileError
from pipelines.mix_state import MixState
from pipelines.tiny import build_tiny_flux, build_tiny_sdxl
from studio import Studio
from studio.merging import format_strategy_info

SDXL_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out"]


def write_shira(root: torch.nn.Module, path, seed: int, *, targets=SDXL_TARGETS, r: int = 2, std: float = 0.05,
                prefix: str = "unet.") -> torch.nn.Module:
    """A SHiRA adapter made by PEFT's tuner on ``root`` (left applied: the reference), its values randomised, and
    saved as PEFT's ``get_peft_model_state_dict`` returns it under ``prefix`` (``unet.``/``transformer.`` as
    diffusers prefixes adapter state dicts, ``base_model.model.`` as PEFT's ``save_pretrained`` does)."""
    config = ShiraConfig(r=r, target_modules=targets, init_weights=False, random_seed=seed)
    model = inject_adapter_in_model(config, root, adapter_name="default")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "shira_weight" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
    state = get_peft_model_state_dict(model, adapter_name="default")
    assert any(k.endswith("shira_indices") for k in state) and any(k.endswith("shira_weight") for k in state)
    save_file({prefix + k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})
    return model


@pytest.fixture(scope="module")
def sdxl_studio():
    return Studio("tiny-sdxl-random")


@pytest.fixture(scope="module")
def shira_files(tmp_path_factory):
    """Two SHiRAs on tiny SDXL (the diffusers-prefixed and the PEFT save_pretrained layouts) and PEFT's pipes."""
    folder = tmp_path_factory.mktemp("shira")
    refs, files = [], []
    for seed, prefix in ((1, "unet."), (2, "base_model.model.")):
        ref = build_tiny_sdxl()
        write_shira(ref.unet, folder / f"shira-{seed}.safetensors", seed, prefix=prefix)
        refs.append(ref)
        files.append(folder / f"shira-{seed}.safetensors")
    return files, refs


def test_shira_equals_pefts_own_forward(sdxl_studio, shira_files):
    files, refs = shira_files
    inputs = unet_inputs()
    for path, ref in zip(files, refs):
        names = sdxl_studio.load([path])
        state = sdxl_studio.composer.state
        state.set_active(names)
        state.set_gains(denoiser=torch.ones(1, 1))
        with torch.no_grad():
            ours = sdxl_studio.pipe.unet(**inputs).sample
            theirs = ref.unet(**inputs).sample  # PEFT's SHiRA layers, adapter active at scale 1
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        parsed = sdxl_studio.loaded()[names[0]]
        assert all(isinstance(d, SparseDelta) for d in sdxl_studio.composer.adapters[names[0]].parsed.deltas.values())
        assert parsed.source == str(path)
        sdxl_studio.unload()


def test_sparse_path_equals_the_dense_delta_with_per_sample_gains():
    """Toy layer: a LoRA and a SHiRA (with a repeated index pair) under per-sample gains, against
    y_s = W x_s + b + Σ_i g_si ΔW_i x_s computed with dense matrices."""
    gen = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(12, 9)
    rows = torch.tensor([0, 3, 3, 8, 5, 3])
    cols = torch.tensor([1, 4, 4, 11, 0, 7])  # (3, 4) twice: summed, as PEFT's sparse_coo_tensor does
    values = torch.randn(6, generator=gen)
    sparse = SparseDelta(sparse_indices=torch.stack([rows, cols]), sparse_values=values, sparse_shape=(9, 12),
                         scale=0.5, kind="shira")
    from pipelines.adapters.delta import LayerDelta

    lora = LayerDelta(down=torch.randn(2, 12, generator=gen), up=torch.randn(9, 2, generator=gen), scale=2.0)
    dense_sparse = torch.zeros(9, 12).index_put_((rows, cols), values, accumulate=True) * 0.5
    dense_lora = 2.0 * lora.up @ lora.down
    state = MixState(["all"], [])
    state.add_column("lora")
    state.add_column("shira")
    from pipelines.composed import AdapterBranch

    layer = ComposedLinear(base, AdapterBranch(state, 0))
    layer.studio_branch.entries["lora"] = prepare_delta(lora, base)
    layer.studio_branch.entries["shira"] = prepare_delta(sparse, base)
    state.set_active(["lora", "shira"])
    gains = torch.tensor([[1.0, 0.0], [0.3, 1.0], [0.0, -0.7]])
    state.set_gains(denoiser=gains)
    x = torch.randn(3, 5, 12, generator=gen)
    with torch.no_grad():
        got = layer(x)
    for s in range(3):
        expected = base(x[s]) + x[s] @ (gains[s, 0] * dense_lora + gains[s, 1] * dense_sparse).T
        torch.testing.assert_close(got[s], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.studio_branch.entries["shira"].weight(base.weight), dense_sparse)


def test_shira_stacks_with_loras_and_renders_with_every_strategy_kind(sdxl_studio, shira_files, sdxl_loras):
    """A SHiRA and a PEFT LoRA: merge equals cat (sparse + low-rank in one derived adapter); composite runs both
    as per-sample gains; the SHiRA changes the image."""
    files, _ = shira_files
    loras = [f"{files[0]}:0.8", f"{sdxl_loras[0]}:0.6"]
    kw = dict(steps=2, seed=3, width=32, height=32, output_type="np")
    try:
        merge = sdxl_studio.compose("a corgi", loras, "merge", **kw).latents[0]
        cat = sdxl_studio.compose("a corgi", loras, "cat", **kw).latents[0]
        lora_only = sdxl_studio.compose("a corgi", loras[1:], "merge", **kw).latents[0]
        composite = sdxl_studio.compose("a corgi", loras, "composite", **kw).latents[0]
    finally:
        sdxl_studio.unload()
    np.testing.assert_allclose(cat, merge, atol=2e-4, rtol=0)
    assert np.abs(merge - lora_only).max() > 2e-3 and np.isfinite(composite).all()


def test_fusing_shiras_is_a_sparse_sum_with_its_overlap_reported(sdxl_studio, shira_files):
    files, _ = shira_files
    names = sdxl_studio.load(files)
    composer = sdxl_studio.composer
    try:
        strategy = make_strategy("cat")
        merged = merge_stack(strategy, composer, names, [0.9, -0.4])
        total_shared = total_smaller = 0
        for key, delta in merged.deltas.items():
            a, b = (composer.adapters[n].parsed.deltas[key] for n in names)
            assert isinstance(delta, SparseDelta) and delta.down is None and delta.dense is None
            torch.testing.assert_close(delta.sparse_weight(), 0.9 * a.sparse_weight() + -0.4 * b.sparse_weight())
            support_a = {tuple(p) for p in a.sparse_indices.T.tolist()}
            support_b = {tuple(p) for p in b.sparse_indices.T.tolist()}
            assert delta.sparse_values.numel() == len(support_a | support_b)  # the union, nothing dense
            total_shared += len(support_a & support_b)
            total_smaller += min(len(support_a), len(support_b))
        row = strategy.info["sparse_overlap"][0]
        assert row["shared"] == total_shared and row["share_of_smaller"] == pytest.approx(total_shared / total_smaller)
        assert any("sparse (SHiRA) supports" in line for line in format_strategy_info(strategy.info))
    finally:
        sdxl_studio.unload()


def test_shira_on_flux(tmp_path):
    ref = build_tiny_flux()
    path = tmp_path / "flux-shira.safetensors"
    write_shira(ref.transformer, path, 5, targets=["to_q", "to_k", "to_v", "proj_mlp"], prefix="transformer.")
    studio = Studio("tiny-flux-random")
    names = studio.load([path])
    state = studio.composer.state
    state.set_active(names)
    state.set_gains(denoiser=torch.ones(1, 1))
    from conftest import flux_inputs

    with torch.no_grad():
        torch.testing.assert_close(studio.pipe.transformer(**flux_inputs()).sample,
                                   ref.transformer(**flux_inputs()).sample, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("damage, message", [
    (lambda sd, k: sd.__setitem__(k, sd[k] + 10_000), "outside the layer"),
    (lambda sd, k: sd.__setitem__(k, sd[k][:, :-1].contiguous()), "values for"),
    (lambda sd, k: sd.__setitem__(k, sd[k][:1].contiguous()), "shira_indices' is I32"),  # only 2 x nnz ints pass
    (lambda sd, k: sd.__setitem__(k, sd[k].float()), "indices must be integers"),
    (lambda sd, k: sd.__setitem__(k.replace("indices", "weight"), sd[k.replace("indices", "weight")] * float("nan")),
     "NaN"),
    (lambda sd, k: sd.pop(k.replace("indices", "weight")), "lacks its values"),
])
def test_damaged_shira_files_are_refused_naming_the_layer(sdxl_studio, shira_files, tmp_path, damage, message):
    from safetensors.torch import load_file

    sd = load_file(str(shira_files[0][0]))
    key = sorted(k for k in sd if k.endswith("shira_indices"))[0]
    damage(sd, key)
    path = tmp_path / "damaged.safetensors"
    save_file(sd, str(path))
    with pytest.raises((IncompatibleLoraError, LoraFileError), match=message) as err:
        sdxl_studio.load([path])
    assert str(path) in str(err.value)
    assert not sdxl_studio.composer.adapters  # nothing half-applied


def test_plain_sparse_delta_layout_and_conv_refusal(sdxl_studio, tmp_path):
    unet = sdxl_studio.pipe.unet
    layer = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    out_f, in_f = unet.get_submodule(layer).weight.shape
    indices = torch.tensor([[0, 1, out_f - 1], [2, in_f - 1, 0]], dtype=torch.int64)
    values = torch.tensor([0.5, -0.25, 1.0])
    path = tmp_path / "plain.safetensors"
    save_file({f"unet.{layer}.sparse_delta.indices": indices, f"unet.{layer}.sparse_delta.values": values}, str(path))
    names = sdxl_studio.load([path])
    delta = sdxl_studio.composer.delta_weight(names[0], f"unet.{layer}")
    expected = torch.zeros(out_f, in_f)
    expected[indices[0], indices[1]] = values
    torch.testing.assert_close(delta, expected)
    sdxl_studio.unload()
    conv = tmp_path / "conv.safetensors"
    save_file({"unet.conv_in.sparse_delta.indices": torch.zeros(2, 1, dtype=torch.int64),
               "unet.conv_in.sparse_delta.values": torch.ones(1)}, str(conv))
    with pytest.raises(IncompatibleLoraError, match="linear layers only"):
        sdxl_studio.load([conv])


def test_shira_on_a_4bit_layer_adds_its_exact_sparse_delta(shira_files, tmp_path):
    """On a 4-bit (SVDQuant, round-to-nearest) tiny SDXL the QuantLinear hosts the SHiRA like a LoRA: its output
    moves by exactly x ΔWᵀ."""
    from pipelines.quant import QuantLinear
    from pipelines.quant.convert import convert
    from pipelines.quant.quantizer import QuantConfig

    _, folder = convert("tiny-sdxl-random", tmp_path / "int4", QuantConfig(fmt="int4", method="rtn"), None)
    studio = Studio(str(folder))
    hosts = {n: m for n, m in studio.pipe.unet.named_modules() if isinstance(m, QuantLinear)}
    x = torch.randn(2, 7, next(iter(hosts.values())).in_features, generator=torch.Generator().manual_seed(0))
    names = studio.load([shira_files[0][0]])
    delta_keys = [k.removeprefix("unet.") for k in studio.composer.adapters[names[0]].parsed.deltas]
    checked = 0
    for key in delta_keys:
        layer = hosts.get(key)
        if layer is None or layer.in_features != x.shape[-1]:
            continue
        state = studio.composer.state
        state.set_active(names)
        state.set_gains(denoiser=torch.tensor([[0.6]]))
        with torch.no_grad():
            got = layer(x)
            state.set_gains(denoiser=torch.tensor([[0.0]]))
            base = layer(x)
        dense = studio.composer.delta_weight(names[0], f"unet.{key}")
        torch.testing.assert_close(got - base, 0.6 * x @ dense.T, atol=1e-5, rtol=1e-4)
        checked += 1
    assert checked > 0
    studio.unload()


def test_studio_merge_of_shiras_writes_their_sparse_sum_as_a_shira_file(shira_files, tmp_path):
    from typer.testing import CliRunner

    from studio.cli import app

    files, _ = shira_files
    out = tmp_path / "fused.safetensors"
    result = CliRunner().invoke(app, ["merge", "--model", "tiny-sdxl-random", "--lora", f"{files[0]}:0.9",
                                      "--lora", f"{files[1]}:-0.4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "sparse (SHiRA file)" in result.output and "sparse (SHiRA) supports" in result.output
    studio = Studio("tiny-sdxl-random")
    fused, a, b = (studio.load([f])[0] for f in (out, *files))
    composer = studio.composer
    for key in composer.adapters[fused].parsed.deltas:
        expected = 0.9 * composer.delta_weight(a, key) - 0.4 * composer.delta_weight(b, key)
        torch.testing.assert_close(composer.delta_weight(fused, key), expected, atol=1e-6, rtol=1e-5)
    assert set(composer.adapters[fused].parsed.deltas) == set(composer.adapters[a].parsed.deltas)


def test_library_names_the_shira_format(shira_files):
    from pipelines.adapters.metadata import describe_header
    from safetensors import safe_open

    for path in shira_files[0]:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            info = describe_header(str(path), shapes, f.metadata())
        assert info.format == "shira"


def test_shira_on_a_text_encoder_equals_pefts_forward(tmp_path):
    ref = build_tiny_sdxl()
    path = tmp_path / "te-shira.safetensors"
    write_shira(ref.text_encoder, path, 9, targets=["q_proj", "v_proj", "fc1"], prefix="text_encoder.")
    studio = Studio("tiny-sdxl-random")
    names = studio.load([path])
    assert all(k.startswith("text_encoder.") for k in studio.composer.adapters[names[0]].parsed.deltas)
    state = studio.composer.state
    state.set_active(names)
    state.set_gains(text=torch.ones(1, 1))
    ids = torch.randint(0, 1000, (2, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(studio.pipe.text_encoder(ids).last_hidden_state,
                                   ref.text_encoder(ids).last_hidden_state, atol=1e-5, rtol=1e-5)
