"""LoRA-LEGO (``lego``) and orthogonal Monte Carlo dropout (``mcdropout``) against their formulas computed
directly: planted clusters on a toy layer, ``cat`` up to a permutation of ranks at k = Σr, exactly orthogonal
outputs on the layers of PEFT files, and the saved merges rendering in plain diffusers as in the studio."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fusion import make_strategy, merge_stack
from fusion.lego import kmeans, lego_factors
from pipelines.tiny import build_tiny_flux, build_tiny_sdxl
from reference import saved_lora_vs_studio
from studio import Studio
from studio.merging import save_merge

WEIGHTS = [0.8, -0.5, 0.7]
SCALES = [8 / 4, 2 / 2, 4 / 8]  # alpha / rank of the sdxl_loras fixtures
RANKS = [4, 2, 8]
ATOL = 2e-4


@pytest.fixture(scope="module")
def sdxl_studio():
    return Studio("tiny-sdxl-random")


@pytest.fixture(scope="module")
def stack(sdxl_studio, sdxl_loras):
    names = sdxl_studio.load(sdxl_loras)
    files = [load_file(str(f)) for f in sdxl_loras]
    factors = [{k.removesuffix(".lora_A.weight"): (s * sd[k.replace("lora_A", "lora_B")], sd[k])
                for k in sd if k.endswith(".lora_A.weight")} for sd, s in zip(files, SCALES)]
    return names, factors


def planted_units(seed: int = 0):
    """Three well separated groups of rank-one units (b, a): 3, 2 and 4 noisy copies of three directions."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(3, 10 + 7, generator=gen, dtype=torch.float64) * 5
    sizes = [3, 2, 4]
    rows = [centers[c] + 0.01 * torch.randn(s, 17, generator=gen, dtype=torch.float64)
            for c, s in enumerate(sizes)]
    points = torch.cat(rows)
    truth = torch.cat([torch.full((s,), c) for c, s in enumerate(sizes)])
    return points[:, :10].T.contiguous(), points[:, 10:].contiguous(), truth


def test_lego_on_planted_clusters_is_the_papers_formula():
    """Centroid = mean of the members; parameter reweighting to the members' mean norms; output × √(n/k)."""
    ups, downs, truth = planted_units()
    n, k = downs.shape[0], 3
    for reweight in ("both", "parameter", "output", "none"):
        up, down = lego_factors(ups, downs, k, torch.Generator().manual_seed(4), reweight)
        expected = torch.zeros(10, 7, dtype=torch.float64)
        for c in range(k):
            m = truth == c
            b, a = ups[:, m].mean(1), downs[m].mean(0)
            if reweight in ("both", "parameter"):
                b = b * ups[:, m].norm(dim=0).mean() / b.norm()
                a = a * downs[m].norm(dim=1).mean() / a.norm()
            expected += torch.outer(b, a)
        if reweight in ("both", "output"):
            expected *= (n / k) ** 0.5
        torch.testing.assert_close(up.double() @ down.double(), expected, atol=1e-5, rtol=1e-5)


def test_kmeans_is_seeded_and_reaches_a_fixed_point():
    gen = torch.Generator().manual_seed(0)
    points = torch.randn(40, 6, generator=gen)
    c1, l1 = kmeans(points, 5, torch.Generator().manual_seed(9))
    c2, l2 = kmeans(points, 5, torch.Generator().manual_seed(9))
    assert torch.equal(c1, c2) and torch.equal(l1, l2)
    assert torch.equal(torch.cdist(points.double(), c1).argmin(1), l1)  # every point sits with its nearest centroid
    for c in range(5):
        torch.testing.assert_close(c1[c], points[l1 == c].double().mean(0))
    with pytest.raises(ValueError, match="1 <= k"):
        kmeans(points, 41, gen)


def test_lego_with_k_equal_to_all_ranks_is_cat_up_to_permutation(sdxl_studio, stack):
    names, factors = stack
    composer = sdxl_studio.composer
    lego = merge_stack(make_strategy("lego", {"rank": sum(RANKS)}), composer, names, WEIGHTS)
    cat = merge_stack(make_strategy("cat"), composer, names, WEIGHTS)
    default = merge_stack(make_strategy("lego"), composer, names, WEIGHTS)
    for key, delta in lego.deltas.items():
        units = torch.cat([cat.deltas[key].up.T, cat.deltas[key].down], dim=1)
        got = torch.cat([delta.up.T, delta.down], dim=1)
        assert got.shape == units.shape
        distance = torch.cdist(got.double(), units.double())
        match = distance.argmin(1)
        assert sorted(match.tolist()) == list(range(sum(RANKS)))  # a permutation of cat's ranks
        torch.testing.assert_close(got, units[match], atol=1e-6, rtol=1e-5)
        expected = sum(w * b @ a for w, f in zip(WEIGHTS, factors) for b, a in [f[key]])
        torch.testing.assert_close(delta.up @ delta.down, expected, atol=1e-6, rtol=1e-5)
        assert default.deltas[key].rank == max(RANKS)  # k defaults to the largest input rank


def test_mcdropout_outputs_are_exactly_orthogonal(sdxl_studio, stack):
    names, factors = stack
    merged = merge_stack(make_strategy("mcdropout", {"seed": 3}), sdxl_studio.composer, names, WEIGHTS)
    again = merge_stack(make_strategy("mcdropout", {"seed": 3}), sdxl_studio.composer, names, WEIGHTS)
    other = merge_stack(make_strategy("mcdropout", {"seed": 4}), sdxl_studio.composer, names, WEIGHTS)
    owners_seen = torch.zeros(3)
    bounds = np.cumsum([0] + RANKS)
    gen = torch.Generator().manual_seed(0)
    for key, delta in merged.deltas.items():
        assert torch.equal(delta.up, again.deltas[key].up)
        x = torch.randn(delta.down.shape[1], 16, generator=gen)
        outputs = [delta.up[:, bounds[i]:bounds[i + 1]] @ (delta.down[bounds[i]:bounds[i + 1]] @ x) for i in range(3)]
        for i in range(3):
            for j in range(i + 1, 3):
                # every token's output vectors are orthogonal: disjoint supports, so the products are exact zeros
                assert ((outputs[i] * outputs[j]).sum(0) == 0).all()
        # the formula: each output row is N · w_i · (s_i B_i A_i)[row] of exactly one LoRA i
        full = [w * b @ a for w, f in zip(WEIGHTS, factors) for b, a in [f[key]]]
        got = delta.up @ delta.down
        for row in range(got.shape[0]):
            hits = [i for i in range(3) if torch.allclose(got[row], 3 * full[i][row], atol=1e-6, rtol=1e-5)]
            assert len(hits) == 1, (key, row)
            owners_seen[hits[0]] += 1
    share = owners_seen / owners_seen.sum()
    assert (share - 1 / 3).abs().max() < 0.05  # keep probability 1 - p = 1/N for each LoRA
    assert any(not torch.equal(merged.deltas[k].up, other.deltas[k].up) for k in merged.deltas)


def test_saved_lego_and_mcdropout_render_in_diffusers_as_in_the_studio(sdxl_studio, sdxl_te_loras, flux_loras,
                                                                       tmp_path):
    flux_studio = Studio("tiny-flux-random")
    cases = [
        (sdxl_studio, build_tiny_sdxl, [f"{sdxl_te_loras[0]}:0.9", f"{sdxl_te_loras[1]}:0.6"], "lego", {"rank": 3}, 5.0),
        (flux_studio, build_tiny_flux, [f"{f}:{w}" for f, w in zip(flux_loras, [0.9, 0.7])], "mcdropout", {}, 3.5),
    ]
    sdxl_studio.unload()
    for studio, build, loras, strategy, params, guidance in cases:
        path = tmp_path / f"{strategy}.safetensors"
        report = save_merge(studio, loras, strategy, params, path)
        assert report.layers > 0
        expected, got = saved_lora_vs_studio(studio, build, path, loras, strategy, params, guidance)
        base = studio.compose("a corgi", [], "merge", steps=2, seed=1, guidance=guidance, width=32, height=32,
                              output_type="np").latents[0]
        np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
        assert np.abs(got - base).max() > 10 * ATOL  # the merged LoRAs act
        studio.unload()


def test_qr_cosines_of_an_all_zero_update_are_zero_not_nan():
    """A LoRA module left untrained (B = 0) made `studio merge --strategy qr` report `mean |cos| nan`."""
    from fusion.qr import cosines

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen)
    got = cosines([torch.zeros(3, 4), a, b])
    assert torch.isfinite(got).all() and (got[0] == 0).all()
    assert float(got[1, 2]) == pytest.approx(float((a * b).sum() / (a.norm() * b.norm())), rel=1e-6)


def test_mcdropout_mc_gives_each_output_element_to_one_lora_times_n(sdxl_studio, sdxl_loras):
    """The released code's form: per call, every output element is N × the output of exactly one LoRA (so the
    masked outputs are orthogonal), fresh masks each call, seeded; the mean over calls tends to the sum."""
    from fusion.mcdropout import OrthogonalDropoutGate

    sdxl_studio.unload()
    names = sdxl_studio.load(sdxl_loras)
    composer = sdxl_studio.composer
    state = composer.state
    key = next(k for k, layer in composer.layers.items() if k.endswith("attn1.to_q"))
    layer = composer.layers[key]
    state.set_active(names)
    state.set_gains(denoiser=torch.tensor([WEIGHTS]))
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(1))
    branch = layer.studio_branch
    with torch.no_grad():
        base = torch.nn.functional.linear(x, layer.weight, layer.bias)
        outputs = branch.adapter_outputs(x, base, layer)  # each LoRA's own change at its weight
        summed = layer(x) - base
        try:
            branch.set_gate(OrthogonalDropoutGate(7))
            draws = [layer(x) - base for _ in range(400)]
            branch.set_gate(OrthogonalDropoutGate(7))
            again = layer(x) - base
        finally:
            branch.set_gate(None)
            sdxl_studio.unload()
    first = draws[0]
    owner = torch.randint(3, tuple(base.shape), generator=torch.Generator().manual_seed(7))  # the gate's first draw
    masked = torch.stack([torch.where(owner == k, 3 * outputs[k], torch.zeros_like(base)) for k in range(3)])
    torch.testing.assert_close(first, masked.sum(0), atol=1e-6, rtol=1e-5)  # N·o_k of the owning LoRA only
    assert torch.equal(again, first) and not torch.equal(draws[1], first)
    for i in range(3):
        for j in range(i + 1, 3):
            assert ((masked[i] * masked[j]).sum(-1) == 0).all()  # orthogonal per token
    mean = torch.stack(draws).mean(0)
    assert (mean - summed).abs().mean() < 0.15 * summed.abs().mean()  # E[N·m_k·o_k] summed over k = Σ_k o_k


def test_mcdropout_mc_renders_reproducibly_and_detaches(sdxl_studio, sdxl_loras):
    kw = dict(steps=2, seed=3, width=32, height=32, output_type="np")
    loras = [f"{sdxl_loras[0]}:0.8", f"{sdxl_loras[1]}:0.6"]
    try:
        merge = sdxl_studio.compose("a corgi", loras, "merge", **kw).latents[0]
        one = sdxl_studio.compose("a corgi", loras, "mcdropout-mc", **kw).latents[0]
        two = sdxl_studio.compose("a corgi", loras, "mcdropout-mc", **kw).latents[0]
        other = sdxl_studio.compose("a corgi", loras, "mcdropout-mc", strategy_params={"seed": 1}, **kw).latents[0]
        assert all(layer.studio_branch.gate is None for layer in sdxl_studio.composer.layers.values())
    finally:
        sdxl_studio.unload()
    np.testing.assert_array_equal(one, two)
    assert np.isfinite(one).all() and np.abs(one - merge).max() > 1e-4 and np.abs(one - other).max() > 1e-4
