"""QR-LoRA: the basis, the file format, the base check, the paper's merge and the orthogonal merge of ordinary
LoRAs, each against its formula computed directly (float32, CPU)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import writers
from fusion import make_strategy, merge_stack
from fusion.qr import orthogonalize, shared_basis
from pipelines.adapters.kinds import qr
from pipelines.adapters.qr_lora import qr_bases, save_qr_bases, save_qr_lora, triu_mask
from pipelines.errors import IncompatibleLoraError, LoraFileError, StrategyError
from pipelines.families import FLUX
from pipelines.tiny import build_tiny_flux
from studio import Studio

ATOL = 2e-4


@pytest.fixture(scope="module")
def flux_studio():
    return Studio("tiny-flux-random")


def qr_layers(path):
    """{layer: (Q, R, ΔR)} straight from a released-layout file."""
    tensors = load_file(str(path))
    layers = {}
    for key in tensors:
        if key.endswith(".lora.q.weight"):
            name = key.removesuffix(".lora.q.weight")
            layers[name] = (tensors[key], tensors[f"{name}.lora.base_r.weight"], tensors[f"{name}.lora.delta_r.weight"])
    return layers


def test_basis_is_top_r_svd_then_qr():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(24, 40, generator=gen)
    for alpha in (None, 8.0):
        q, r = qr.basis(w, 4, alpha)
        s = 1.0 if alpha is None else alpha / 4
        u, sv, vh = torch.linalg.svd(w, full_matrices=False)
        w_r = (u[:, :4] * sv[:4]) @ vh[:4]
        torch.testing.assert_close(s * q @ r, w_r, atol=1e-5, rtol=0)
        torch.testing.assert_close(q.T @ q, torch.eye(4), atol=1e-5, rtol=0)
        assert torch.allclose(r[:, :4].tril(-1), torch.zeros(4, 4), atol=1e-6)  # R is upper triangular
        assert qr.base_mismatch(q, r, w, s) is None
    assert qr.base_mismatch(q, r, w * 1.1, 2.0) is not None
    assert triu_mask(3, 5).tolist()[2] == [0, 0, 1, 1, 1]


def test_released_layout_parses_to_q_delta_r(flux_studio, flux_qr_loras):
    """Each QR layer becomes the exact delta Q ΔR; the released file's text-encoder PEFT LoRA is read too."""
    parsed = flux_studio.load([flux_qr_loras[1]])
    adapter = flux_studio.composer.adapters[parsed[0]].parsed
    layers = qr_layers(flux_qr_loras[1])
    assert adapter.info.format == "qr-lora" and adapter.info.rank == 4
    qr_keys = {k for k, d in adapter.deltas.items() if d.kind == "qr"}
    assert qr_keys == set(layers)
    assert any(k.startswith("text_encoder.") for k in adapter.deltas)
    # single blocks' attention projections are targets too (the released code matches by substring)
    assert any(k.startswith("transformer.single_transformer_blocks.") for k in qr_keys)
    for key, (q, r, delta_r) in itertools.islice(layers.items(), 5):
        torch.testing.assert_close(flux_studio.composer.delta_weight(parsed[0], key), q @ delta_r, atol=1e-6, rtol=0)
    flux_studio.unload()


def test_qr_bases_create_what_the_released_code_computes(flux_studio, flux_qr_loras, tmp_path):
    """The studio's creation function gives the released code's Q and R for the same base weights."""
    pipe = flux_studio.pipe
    bases = qr_bases(pipe, FLUX, rank=4)
    released = qr_layers(flux_qr_loras[0])
    assert set(bases) == set(released)
    for key, (q, r) in bases.items():
        torch.testing.assert_close(q @ r, released[key][0] @ released[key][1], atol=1e-5, rtol=0)
    # alpha 8 at rank 4: s = 2, and Q, R are made for it (s·QR = W_r)
    scaled = qr_bases(pipe, FLUX, rank=4, alpha=8.0)
    delta_r = {k: torch.full_like(r, 0.01) * triu_mask(*r.shape) for k, (q, r) in scaled.items()}
    path = save_qr_lora(tmp_path / "ours.safetensors", scaled, delta_r, alpha=8.0, variant="triu", base_model="tiny")
    studio = flux_studio
    name = studio.load([path])[0]
    key = next(iter(scaled))
    q, r = scaled[key]
    torch.testing.assert_close(2.0 * q @ r, bases[key][0] @ bases[key][1], atol=1e-5, rtol=0)
    torch.testing.assert_close(studio.composer.delta_weight(name, key), 2.0 * q @ delta_r[key], atol=1e-6, rtol=0)
    # the same tensors declared with the wrong alpha do not fit the base weights
    wrong = save_qr_lora(tmp_path / "wrong.safetensors", scaled, delta_r, alpha=4.0)
    with pytest.raises(IncompatibleLoraError, match="another alpha"):
        studio.load([wrong])
    # a half-precision file (how the world's QR-LoRAs ship) passes the base check and keeps the delta to fp16
    half = save_qr_lora(tmp_path / "half.safetensors", scaled, delta_r, alpha=8.0, dtype=torch.float16)
    assert {v.dtype for v in load_file(str(half)).values()} == {torch.float16}
    name = studio.load([half])[0]
    torch.testing.assert_close(studio.composer.delta_weight(name, key), 2.0 * q @ delta_r[key], atol=2e-3, rtol=1e-2)
    studio.unload()


def test_adapters_sharing_one_bases_file_load_as_self_contained_ones(flux_studio, tmp_path):
    """ΔR-only adapters naming a bases file next to them give the very deltas of self-contained files; the
    base check still runs on the shared Q and R, and a bases file is neither an adapter nor a path escape."""
    studio = flux_studio
    bases = qr_bases(studio.pipe, FLUX, rank=4)
    gen = torch.Generator().manual_seed(5)
    delta_r = {k: 0.01 * torch.randn(r.shape, generator=gen) for k, (q, r) in bases.items()}
    whole = save_qr_lora(tmp_path / "whole.safetensors", bases, delta_r)
    library = tmp_path / "library"
    save_qr_bases(library / "qr-bases.safetensors", bases)
    slim = save_qr_lora(library / "style.safetensors", bases, delta_r, bases_file="qr-bases.safetensors")
    assert all(k.endswith(".lora.delta_r.weight") for k in load_file(str(slim)))
    assert slim.stat().st_size < 0.5 * whole.stat().st_size
    a, b = studio.load([whole, slim])
    for key in itertools.islice(bases, 6):
        assert torch.equal(studio.composer.delta_weight(a, key), studio.composer.delta_weight(b, key))
    studio.unload()

    from studio.library import scan

    infos, errors = scan(library)
    assert [Path(i.path).name for i in infos] == ["style.safetensors"] and not errors
    with pytest.raises(IncompatibleLoraError, match="QR-LoRA bases file"):
        studio.load([library / "qr-bases.safetensors"])
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "style.safetensors").write_bytes(slim.read_bytes())
    with pytest.raises(LoraFileError, match="bases file 'qr-bases.safetensors', which is not in"):
        studio.load([alone / "style.safetensors"])
    # Q, R of another alpha (s·QR = W_r with s = 2) do not fit the adapter's s = 1: the base check refuses them
    save_qr_bases(alone / "qr-bases.safetensors", qr_bases(studio.pipe, FLUX, rank=4, alpha=8.0))
    with pytest.raises(IncompatibleLoraError, match="another alpha"):
        studio.load([alone / "style.safetensors"])
    save_file(load_file(str(slim)), str(alone / "escape.safetensors"), metadata={"qr_lora.bases": "../library/qr-bases.safetensors"})
    with pytest.raises(LoraFileError, match="file name in the adapter's folder"):
        studio.load([alone / "escape.safetensors"])
    with pytest.raises(ValueError, match="file name"):
        save_qr_lora(tmp_path / "x.safetensors", bases, delta_r, bases_file="/etc/qr-bases.safetensors")
    assert not studio.composer.layers


def test_adapter_for_another_base_checkpoint_is_refused(flux_studio, tmp_path):
    other = writers.qr_lora_released_layout(tmp_path / "other", 43, base_noise=0.2)
    with pytest.raises(IncompatibleLoraError, match=r"QR-LoRA layer 'transformer\..*another base checkpoint"):
        flux_studio.load([other])
    assert not flux_studio.composer.layers  # nothing attached


def test_qr_merge_equals_paper_formula_and_released_inference(flux_studio, flux_qr_loras):
    """W' = W_res + Q(R + Σ λ_i ΔR_i) with W_res = W − QR (the released inference script's rewrite), both on
    the merged layer weights and on the image (plain diffusers pipeline with rewritten weights)."""
    lambdas = [0.9, 1.0]
    strategy = make_strategy("qr")
    names = flux_studio.load(flux_qr_loras)
    merged = merge_stack(strategy, flux_studio.composer, names, lambdas)
    a, b = qr_layers(flux_qr_loras[0]), qr_layers(flux_qr_loras[1])
    ref = build_tiny_flux()
    for key, (q, r, dr_a) in a.items():
        w = ref.transformer.get_submodule(key.removeprefix("transformer.")).weight
        w_res = w.detach() - q @ r
        expected = w_res + q @ (r + lambdas[0] * dr_a + lambdas[1] * b[key][2])
        delta = merged.deltas[key]
        assert delta.rank == 4  # one shared rank-r adapter, not 2r
        got = w.detach() + delta.weight(tuple(w.shape))
        torch.testing.assert_close(got, expected, atol=2e-6, rtol=0)
        with torch.no_grad():
            w.copy_(expected)
    assert strategy.info["qr"]["layers"]["sum"] == len(a)  # (the text-encoder LoRA takes the ordinary path)
    # the released inference script drops the text-encoder LoRA; leave it out on both sides
    studio_image = flux_studio.compose("a corgi", [f"{f}:{lam}:blocks=te=0" for f, lam in zip(flux_qr_loras, lambdas)],
                                       "qr", steps=3, seed=4, output_type="np").latents[0]
    with torch.no_grad():
        expected_image = ref("a corgi", num_inference_steps=3, guidance_scale=3.5, height=64, width=64,
                             generator=torch.Generator("cpu").manual_seed(4), output_type="np").images[0]
    np.testing.assert_allclose(studio_image, expected_image, atol=ATOL, rtol=0)
    base = flux_studio.compose("a corgi", [], "merge", steps=3, seed=4, output_type="np").latents[0]
    assert np.abs(base - expected_image).max() > 10 * ATOL
    flux_studio.unload()


def test_qr_merge_refuses_adapters_with_different_bases(flux_studio, flux_qr_loras, tmp_path):
    rank8 = writers.qr_lora_released_layout(tmp_path / "rank8", 44, rank=8)
    names = flux_studio.load([flux_qr_loras[0], rank8])
    with pytest.raises(StrategyError, match="different Q.*shared basis"):
        merge_stack(make_strategy("qr"), flux_studio.composer, names, [1.0, 1.0])
    # the orthogonal merge works on any bases
    merge_stack(make_strategy("qr", {"mode": "orthogonal"}), flux_studio.composer, names, [1.0, 1.0])
    flux_studio.unload()


# ------------------------------------------------------------------------------------- orthogonal merge
def random_lora_factors(seed, out=40, inp=30, ranks=(3, 2, 4), shared=0.6):
    """LoRAs whose B factors and updates overlap (so that interference is visible)."""
    gen = torch.Generator().manual_seed(seed)
    common_b = torch.randn(out, 2, generator=gen)
    common_a = torch.randn(2, inp, generator=gen)
    factors = []
    for r in ranks:
        b = torch.randn(out, r, generator=gen)
        a = torch.randn(r, inp, generator=gen)
        b[:, :2] = shared * common_b + (1 - shared) * b[:, :2]
        a[:2] = shared * common_a + (1 - shared) * a[:2]
        factors.append((b, a))
    return factors


def flat_cos(x, y):
    return float((x * y).sum() / (x.norm() * y.norm()))


def test_shared_basis_reconstructs_every_update_and_keeps_cosines():
    factors = random_lora_factors(1)
    q, segments = shared_basis([b for b, _ in factors])
    torch.testing.assert_close(q.T @ q, torch.eye(q.shape[1]), atol=1e-5, rtol=0)
    assert [s.stop - s.start for s in segments] == [3, 2, 4]
    coeffs = [(q.T @ b) @ a for b, a in factors]
    for (b, a), c in zip(factors, coeffs):
        torch.testing.assert_close(q @ c, b @ a, atol=1e-4, rtol=1e-5)
    updates = [b @ a for b, a in factors]
    for i, j in itertools.combinations(range(3), 2):  # projection alone changes no interference
        assert flat_cos(coeffs[i], coeffs[j]) == pytest.approx(flat_cos(updates[i], updates[j]), abs=1e-5)
    # a B that lies in the span of earlier ones adds no direction (QR-LoRA adapters share one Q)
    q2, seg2 = shared_basis([factors[0][0], 2 * factors[0][0]])
    assert q2.shape[1] == 3 and seg2[1].stop == seg2[1].start


def test_orthogonal_merge_equals_gram_schmidt_with_explicit_projectors():
    """Independent reference: segments from Householder QR of [B_1 B_2 B_3], projectors P_s = Q_s Q_sᵀ, and
    Gram–Schmidt of the flattened P_s ΔW_i in stack order."""
    factors = random_lora_factors(2)
    updates = [b @ a for b, a in factors]
    q_h, _ = torch.linalg.qr(torch.cat([b for b, _ in factors], dim=1))
    bounds = np.cumsum([0] + [b.shape[1] for b, _ in factors])
    expected = [torch.zeros_like(u) for u in updates]
    for s in range(3):
        p = q_h[:, bounds[s]:bounds[s + 1]] @ q_h[:, bounds[s]:bounds[s + 1]].T
        done = []
        for i, u in enumerate(updates):
            x = p @ u
            if x.norm() < 1e-4 * max((p @ v).norm() for v in updates):
                continue
            for y in done:
                x = x - (x * y).sum() / (y * y).sum() * y
            done.append(x)
            expected[i] += x
    q, segments = shared_basis([b for b, _ in factors])
    coeffs = orthogonalize([(q.T @ b) @ a for b, a in factors], segments)
    for e, c in zip(expected, coeffs):
        torch.testing.assert_close(q @ c, e, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(q @ coeffs[0], updates[0], atol=1e-4, rtol=1e-5)  # the first LoRA keeps everything
    for i, j in itertools.combinations(range(3), 2):
        assert abs(flat_cos(q @ coeffs[i], q @ coeffs[j])) < 1e-5
        assert abs(flat_cos(updates[i], updates[j])) > 0.05  # they did interfere


def test_orthogonal_merge_on_lora_files_reports_interference(sdxl_loras):
    """Two LoRA files: per layer the merge is w_1 ΔW_1 + w_2 (ΔW_2 − c ΔW_1), c = ⟨ΔW_2, ΔW_1⟩/‖ΔW_1‖², and
    the reported 'before' interference is the mean |cos(ΔW_1, ΔW_2)| over the layers, from the files directly."""
    studio = Studio("tiny-sdxl-random")
    files = sdxl_loras[:2]
    weights = [0.8, 0.6]
    names = studio.load(files)
    strategy = make_strategy("qr")
    merged = merge_stack(strategy, studio.composer, names, weights)
    scales = [8 / 4, 2 / 2]  # alpha / rank of the two fixtures
    sds = [load_file(str(f)) for f in files]
    cosines = []
    for key, delta in merged.deltas.items():
        module = key.removeprefix("unet.")
        d1, d2 = [s * sd[f"unet.{module}.lora_B.weight"] @ sd[f"unet.{module}.lora_A.weight"]
                  for s, sd in zip(scales, sds)]
        c = (d1 * d2).sum() / (d1 * d1).sum()
        expected = weights[0] * d1 + weights[1] * (d2 - c * d1)
        torch.testing.assert_close(delta.weight(tuple(d1.shape)), expected, atol=1e-5, rtol=1e-4)
        cosines.append(abs(flat_cos(d1, d2)))
    (row,) = strategy.info["qr"]["interference"]
    assert row["pair"] == names and row["layers"] == len(cosines)
    assert row["mean_abs_cos_before"] == pytest.approx(np.mean(cosines), rel=1e-4)
    assert row["max_abs_cos_before"] == pytest.approx(max(cosines), rel=1e-4)
    assert row["mean_abs_cos_after"] < 1e-5 and row["max_abs_cos_before"] > 1e-3
    assert strategy.info["qr"]["retained_energy"][names[0]] == pytest.approx(1.0, abs=1e-5)
    # mode=sum is the exact merge (and reports unchanged interference)
    plain = make_strategy("qr", {"mode": "sum"})
    summed = merge_stack(plain, studio.composer, names, weights)
    key = next(iter(summed.deltas))
    expected = sum(w * studio.composer.delta_weight(n, key) for w, n in zip(weights, names))
    torch.testing.assert_close(summed.deltas[key].weight(tuple(expected.shape)), expected, atol=1e-6, rtol=1e-5)
    (row,) = plain.info["qr"]["interference"]
    assert row["mean_abs_cos_after"] == pytest.approx(row["mean_abs_cos_before"], rel=1e-4)
