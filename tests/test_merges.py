"""Weight-space merges (cat, svd, ties, dare) against their formulas on the deltas read straight from the PEFT
files, PEFT's merge_utils for TIES/DARE, plain diffusers loading the saved merge, and every strategy of this
issue rendering on tiny SDXL and tiny FLUX (float32, CPU)."""

from __future__ import annotations

import json
import stat

import numpy as np
import pytest
import torch
from peft.utils.merge_utils import dare_linear, dare_ties, ties
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

import writers
from fusion import make_strategy, merge_stack
from fusion.dare import layer_seed
from pipelines.atomic_files import file_mode
from pipelines.errors import StudioError
from reference import saved_lora_vs_studio
from pipelines.tiny import build_tiny_flux, build_tiny_sdxl
from studio import Studio
from studio.cli import app
from studio.merging import save_merge

ATOL = 2e-4
WEIGHTS = [0.8, -0.5, 0.7]
SCALES = [8 / 4, 2 / 2, 4 / 8]  # alpha / rank of the sdxl_loras fixtures


@pytest.fixture(scope="module")
def sdxl_studio():
    return Studio("tiny-sdxl-random")


@pytest.fixture(scope="module")
def flux_studio():
    return Studio("tiny-flux-random")


def file_deltas(path, scale) -> dict[str, torch.Tensor]:
    """{"unet.<module>": s·B A} straight from a diffusers/PEFT file."""
    sd = load_file(str(path))
    return {k.removesuffix(".lora_A.weight"): scale * sd[k.replace("lora_A", "lora_B")] @ sd[k]
            for k in sd if k.endswith(".lora_A.weight")}


def best_rank_k(matrix: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def merged_weight(delta, like: torch.Tensor) -> torch.Tensor:
    """The dense change a merged LayerDelta makes (low-rank part plus dense part)."""
    w = torch.zeros_like(like)
    if delta.down is not None:
        w += delta.scale * delta.up @ delta.down.flatten(1)
    if delta.dense is not None:
        w += delta.dense.reshape(like.shape)
    return w


@pytest.fixture(scope="module")
def stack(sdxl_studio, sdxl_loras):
    names = sdxl_studio.load(sdxl_loras)
    tasks = [file_deltas(f, s) for f, s in zip(sdxl_loras, SCALES)]
    return names, tasks


def test_cat_is_exact_with_the_sum_of_ranks(sdxl_studio, stack):
    names, tasks = stack
    merged = merge_stack(make_strategy("cat"), sdxl_studio.composer, names, WEIGHTS)
    assert set(merged.deltas) == set(tasks[0])
    for key, delta in merged.deltas.items():
        expected = sum(w * t[key] for w, t in zip(WEIGHTS, tasks))
        assert delta.rank == 4 + 2 + 8
        torch.testing.assert_close(merged_weight(delta, expected), expected, atol=1e-6, rtol=1e-5)


def test_svd_is_the_best_low_rank_approximation_of_the_sum(sdxl_studio, stack):
    names, tasks = stack
    default = merge_stack(make_strategy("svd"), sdxl_studio.composer, names, WEIGHTS)
    three = merge_stack(make_strategy("svd", {"rank": 3}), sdxl_studio.composer, names, WEIGHTS)
    for key in list(default.deltas)[:8]:
        expected = sum(w * t[key] for w, t in zip(WEIGHTS, tasks))
        assert default.deltas[key].rank == 8  # PEFT's default: the largest input rank
        torch.testing.assert_close(merged_weight(default.deltas[key], expected), best_rank_k(expected, 8),
                                   atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(merged_weight(three.deltas[key], expected), best_rank_k(expected, 3),
                                   atol=1e-5, rtol=1e-4)


def test_ties_and_dare_equal_peft_merge_utils(sdxl_studio, stack):
    """Task vectors fed to PEFT are each LoRA's ΔW_i, weights are the LoRA weights."""
    names, tasks = stack
    weights = torch.tensor(WEIGHTS)
    composer = sdxl_studio.composer
    dense_ties = merge_stack(make_strategy("ties", {"density": 0.3, "rank": -1}), composer, names, WEIGHTS)
    low_ties = merge_stack(make_strategy("ties", {"density": 0.3, "rank": 2}), composer, names, WEIGHTS)
    dare_params = {"density": 0.5, "rank": -1, "seed": 5}
    dense_dare = merge_stack(make_strategy("dare", dare_params), composer, names, WEIGHTS)
    again = merge_stack(make_strategy("dare", dare_params), composer, names, WEIGHTS)
    other_seed = merge_stack(make_strategy("dare", {**dare_params, "seed": 6}), composer, names, WEIGHTS)
    dare_t = merge_stack(make_strategy("dare", {**dare_params, "method": "ties", "majority_sign_method": "frequency"}),
                         composer, names, WEIGHTS)
    for key in list(tasks[0])[:8]:
        task = [t[key] for t in tasks]
        expected = ties(task, weights, 0.3, "total")
        torch.testing.assert_close(dense_ties.deltas[key].dense, expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(merged_weight(low_ties.deltas[key], expected), best_rank_k(expected, 2),
                                   atol=1e-5, rtol=1e-4)
        torch.manual_seed(layer_seed(5, key))
        torch.testing.assert_close(dense_dare.deltas[key].dense, dare_linear(task, weights, 0.5), atol=1e-6, rtol=1e-5)
        torch.manual_seed(layer_seed(5, key))
        torch.testing.assert_close(dare_t.deltas[key].dense, dare_ties(task, weights, 0.5, "frequency"),
                                   atol=1e-6, rtol=1e-5)
        assert torch.equal(again.deltas[key].dense, dense_dare.deltas[key].dense)
        assert not torch.equal(other_seed.deltas[key].dense, dense_dare.deltas[key].dense)


def test_dora_parts_are_merged_exactly_but_not_saved(sdxl_studio, stack, lora_dir, tmp_path):
    """DoRA's rescaling is not low-rank: cat adds it as an exact dense part; such a merge is refused on saving."""
    from pipelines.adapters.export import save_lora

    names, _ = stack
    dora = writers.peft_sdxl(lora_dir / "sdxl-dora-merge", 15, rank=2, alpha=2, use_dora=True)
    both = [names[0], sdxl_studio.load([dora])[0]]
    composer = sdxl_studio.composer
    merged = merge_stack(make_strategy("cat"), composer, both, [0.7, 0.9])
    for key, delta in list(merged.deltas.items())[:6]:
        expected = 0.7 * composer.delta_weight(both[0], key) + 0.9 * composer.delta_weight(both[1], key)
        assert delta.dense is not None and delta.rank == 4
        torch.testing.assert_close(merged_weight(delta, expected), expected, atol=1e-6, rtol=1e-5)
    with pytest.raises(StudioError, match="not low-rank"):
        save_lora(tmp_path / "dora-cat.safetensors", merged.deltas, sdxl_studio.pipe, sdxl_studio.family)
    sdxl_studio.unload([both[1]])


def test_block_weights_are_baked_into_the_merge(sdxl_studio, stack):
    names, tasks = stack
    state = sdxl_studio.composer.state
    state.set_block_weights(names[0], {"mid": 0.0, "up.0": 0.5})
    try:
        merged = merge_stack(make_strategy("cat"), sdxl_studio.composer, names, WEIGHTS)
    finally:
        state.set_block_weights(names[0], {})
    for key, delta in merged.deltas.items():
        block = 0.0 if key.startswith("unet.mid_block.") else 0.5 if key.startswith("unet.up_blocks.0.") else 1.0
        expected = block * WEIGHTS[0] * tasks[0][key] + sum(w * t[key] for w, t in zip(WEIGHTS[1:], tasks[1:]))
        torch.testing.assert_close(merged_weight(delta, expected), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_every_strategy_renders_on_tiny_models(family, sdxl_studio, flux_studio, sdxl_te_loras, flux_loras):
    """Through the registry with default parameters; cat (exact) gives the merge image."""
    studio = sdxl_studio if family == "sdxl" else flux_studio
    loras = [f"{f}:{w}" for f, w in zip(sdxl_te_loras if family == "sdxl" else flux_loras, [0.9, 0.7])]
    kw = dict(steps=2, seed=3, width=32, height=32, output_type="np")
    try:
        merge = studio.compose("a corgi", loras, "merge", **kw).latents[0]
        base = studio.compose("a corgi", [], "merge", **kw).latents[0]
        for name in ["cat", "svd", "ties", "dare", "qr", "klora"]:
            image = studio.compose("a corgi", loras, name, **kw).latents[0]
            assert np.isfinite(image).all() and image.shape == merge.shape, name
            assert np.abs(image - base).max() > 10 * ATOL, name  # the LoRAs act
            if name == "cat":
                np.testing.assert_allclose(image, merge, atol=ATOL, rtol=0)
    finally:
        studio.unload()


def test_step_windows_build_one_merge_per_active_set(sdxl_studio, sdxl_loras):
    loras = [f"{sdxl_loras[0]}:0.8", f"{sdxl_loras[1]}:0.6:start=0.5", f"{sdxl_loras[2]}:0.5:end=0.75"]
    kw = dict(steps=4, seed=2, width=32, height=32, output_type="np")
    merge = sdxl_studio.compose("a corgi", loras, "merge", **kw).latents[0]
    cat = sdxl_studio.compose("a corgi", loras, "cat", **kw).latents[0]
    np.testing.assert_allclose(cat, merge, atol=ATOL, rtol=0)
    derived = [a for a in sdxl_studio.composer.adapters.values() if a.derived_from]
    assert len(derived) == 3  # {a, c}, {a, b, c}, {a, b}
    # derived adapters leave with their sources; then the model is the base model again
    sdxl_studio.unload([sdxl_studio.load([sdxl_loras[1]])[0]])
    assert not any(a.derived_from for a in sdxl_studio.composer.adapters.values())
    sdxl_studio.unload()
    assert not sdxl_studio.composer.layers


def test_saved_merges_load_in_diffusers_and_render_the_same(sdxl_studio, flux_studio, sdxl_te_loras, flux_loras,
                                                            tmp_path):
    """SDXL: cat of a UNet+text-encoder LoRA and a LyCORIS LoCon with conv layers; FLUX: ties at rank 2. The
    saved file, loaded by plain diffusers' load_lora_weights, renders the studio's image."""
    ref_pipe = build_tiny_sdxl()
    locon, _ = writers.lycoris_network(ref_pipe, ref_pipe.unet, tmp_path / "locon.safetensors", "locon", seed=7,
                                       preset=writers.LYCORIS_SDXL_PRESET, std=0.02)
    cases = [
        ("sdxl", sdxl_studio, build_tiny_sdxl, [f"{sdxl_te_loras[0]}:0.9", f"{locon}:0.6"], "cat", {}, 5.0),
        ("flux", flux_studio, build_tiny_flux, [f"{f}:{w}" for f, w in zip(flux_loras, [0.9, 0.7])], "ties",
         {"rank": 2, "density": 0.5}, 3.5),
    ]
    for family, studio, build, loras, strategy, params, guidance in cases:
        path = tmp_path / f"{family}-{strategy}.safetensors"
        report = save_merge(studio, loras, strategy, params, path)
        assert report.layers > 0 and path.exists()
        with safe_open(str(path), framework="pt") as f:
            provenance = json.loads(f.metadata()["studio.merge"])
        assert provenance["strategy"] == strategy and len(provenance["loras"][0]["sha256"]) == 64
        expected, got = saved_lora_vs_studio(studio, build, path, loras, strategy, params, guidance)
        np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
        studio.unload()


def test_merge_cli_and_its_errors(sdxl_loras, tmp_path):
    runner = CliRunner()
    out = tmp_path / "merged.safetensors"
    args = ["merge", "--model", "tiny-sdxl-random", "--lora", f"{sdxl_loras[0]}:0.8", "--lora", str(sdxl_loras[1]),
            "--strategy", "qr", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "interference" in result.output and "mean |cos|" in result.output and str(out) in result.output
    assert out.exists()
    assert stat.S_IMODE(out.stat().st_mode) == file_mode()  # the umask's mode (safetensors alone writes 0600)
    dense = runner.invoke(app, [*args[:-4], "--strategy", "ties", "--param", "rank=-1", "--out", str(out)])
    assert dense.exit_code == 2 and "keeps the merged delta dense" in dense.output
    switch = runner.invoke(app, [*args[:-4], "--strategy", "switch", "--out", str(out)])
    assert switch.exit_code == 2 and "not a weight-space merge" in switch.output
    windowed = runner.invoke(app, ["merge", "--model", "tiny-sdxl-random", "--lora", f"{sdxl_loras[0]}:0.8:start=0.5",
                                   "--out", str(out)])
    assert windowed.exit_code == 2 and "step windows" in windowed.output
    with pytest.raises(StudioError, match="parameter 'density' must be <= 1"):
        make_strategy("ties", {"density": 2})
