"""Quantized tiny pipelines end to end: every strategy, exact LoRA deltas, bit-for-bit unload, CLI, bad folders,
memory accounting at full FLUX.1 / SDXL size."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import unet_inputs
from typer.testing import CliRunner

from fusion import REGISTRY
from pipelines.adapters import parse_lora
from pipelines.errors import ModelLoadError
from pipelines.quant import QuantLinear
from pipelines.quant.calibrate import read_prompts
from pipelines.quant.convert import Calibration, convert
from pipelines.quant.memory import (FLUX1_DEV, SDXL_BASE, flux_arithmetic, meta_bytes, meta_denoiser, model_bytes,
                                    sdxl_arithmetic)
from pipelines.quant.quantizer import QuantConfig
from pipelines.quant.storage import QUANT_FILE, WEIGHTS_FILE
from pipelines.tiny import build_tiny_sdxl
from studio import Studio
from studio.cli import app

FAST = dict(alphas=(0.25, 0.5, 0.75))


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def calibration():
    return Calibration(read_prompts(None)[:1], steps=2, samples_per_layer=128)


RECIPES = {
    "sdxl": ("tiny-sdxl-random", lambda: QuantConfig(fmt="int4", **FAST), calibration),
    "flux": ("tiny-flux-random", lambda: QuantConfig(fmt="nvfp4", **FAST), calibration),
    "sdxl-rtn": ("tiny-sdxl-random", lambda: QuantConfig(fmt="int4", method="rtn"), lambda: None),
    "sdxl-r8": ("tiny-sdxl-random", lambda: QuantConfig(fmt="int4", rank=8, alphas=None), calibration),
}


class QuantDirs(dict):
    """Quantized tiny models, made on first use (once per test module)."""

    def __init__(self, root):
        super().__init__()
        self.root = root

    def __missing__(self, name):
        model, config, calib = RECIPES[name]
        _, self[name] = convert(model, self.root / name, config(), calib())
        return self[name]


@pytest.fixture(scope="module")
def quant_dirs(tmp_path_factory):
    return QuantDirs(tmp_path_factory.mktemp("quant"))


def lora_files(family, sdxl_loras, flux_loras):
    return sdxl_loras[:2] if family == "sdxl" else flux_loras


def denoiser_of(studio):
    return getattr(studio.pipe, studio.family.denoiser)


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_quantized_tiny_pipeline_renders_with_every_strategy(family, quant_dirs, sdxl_loras, flux_loras):
    folder = quant_dirs[family]
    studio = Studio(str(folder))
    denoiser = denoiser_of(studio)
    quantized = {n for n, m in denoiser.named_modules() if isinstance(m, QuantLinear)}
    info = json.loads((folder / QUANT_FILE).read_text())
    assert quantized == set(info["layers"]) and len(quantized) > 10
    files = lora_files(family, sdxl_loras, flux_loras)
    base = studio.compose("a corgi", [], "merge", steps=2, seed=1, output_type="np").latents[0]
    for strategy in REGISTRY:
        result = studio.compose("a corgi", [f"{files[0]}:0.9", f"{files[1]}:0.7"], strategy, steps=2, seed=1,
                                output_type="np")
        image = result.latents[0]
        assert np.isfinite(image).all(), strategy
        assert np.abs(image - base).max() > 1e-3, f"{strategy}: the LoRAs changed nothing"
        hosts = [m for m in denoiser.modules() if isinstance(m, QuantLinear) and m.studio_branch is not None]
        assert hosts, "LoRAs on quantized layers must be hosted by the QuantLinear itself"
        assert all(m.studio_branch.fixed_rank == m.rank for m in hosts if m.studio_branch.down_cat is not None)
    studio.unload()
    assert all(m.studio_branch is None for m in denoiser.modules() if isinstance(m, QuantLinear))
    assert not any("studio_branch" in n for n, _ in denoiser.named_modules())
    again = studio.compose("a corgi", [], "merge", steps=2, seed=1, output_type="np").latents[0]
    assert np.array_equal(again, base)


def test_loras_on_the_quantized_model_add_their_exact_deltas(quant_dirs, sdxl_loras):
    """Merge on a 4-bit model = the 4-bit model + Σ w_i ΔW_i x, with ΔW_i from the PEFT-written files."""
    weights = [0.8, -0.5]
    studio = Studio(str(quant_dirs["sdxl"]))
    names = studio.load(sdxl_loras[:2])
    state = studio.composer.state
    state.set_active(names)
    state.set_gains(denoiser=torch.tensor([weights]))
    inputs = unet_inputs()
    with torch.no_grad():
        got = studio.pipe.unet(**inputs).sample

    ref = Studio(str(quant_dirs["sdxl"]))  # the same quantized model, deltas added by hooks
    hooks = []
    for file, w in zip(sdxl_loras[:2], weights):
        parsed = parse_lora(file, ref.pipe, ref.family)
        for key, delta in parsed.deltas.items():
            module = ref.pipe.unet.get_submodule(key.partition(".")[2])
            dense = delta.weight((module.out_features, module.in_features)) * w  # scale included
            hooks.append(module.register_forward_hook(lambda m, a, y, d=dense: y + a[0] @ d.T))
    assert any(isinstance(ref.pipe.unet.get_submodule(k.partition(".")[2]), QuantLinear)
               for k in parsed.deltas)
    with torch.no_grad():
        expected = ref.pipe.unet(**inputs).sample
        for h in hooks:
            h.remove()
        base = ref.pipe.unet(**inputs).sample
    # Layer by layer the two agree to float rounding (test_quant_linear); through the whole UNet such a
    # rounding difference can flip a 4-bit activation code downstream now and then, so compare norms.
    error = ((got - expected).norm() / expected.norm()).item()
    effect = ((expected - base).norm() / expected.norm()).item()
    assert error < 1e-4 and effect > 100 * error, (error, effect)


def test_svdquant_model_is_closer_to_16_bit_than_rtn(quant_dirs):
    inputs = unet_inputs()
    full = build_tiny_sdxl()
    with torch.no_grad():
        target = full.unet(**inputs).sample
        errors = {}
        for name in ("sdxl", "sdxl-rtn"):
            unet = Studio(str(quant_dirs[name])).pipe.unet
            errors[name] = ((unet(**inputs).sample - target).norm() / target.norm()).item()
    assert errors["sdxl"] < 0.75 * errors["sdxl-rtn"], errors
    # and the image stays close to the 16-bit model's
    studio16, studio4 = Studio("tiny-sdxl-random"), Studio(str(quant_dirs["sdxl"]))
    a = studio16.compose("a red fox", [], steps=3, seed=3, output_type="np").latents[0]
    b = studio4.compose("a red fox", [], steps=3, seed=3, output_type="np").latents[0]
    psnr = 10 * np.log10(1.0 / np.mean((a - b) ** 2))
    assert psnr > 25, psnr


def test_quantize_and_render_from_the_command_line(tmp_path):
    runner = CliRunner()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# calibration\na lighthouse at dusk\n")
    out = tmp_path / "q"
    result = runner.invoke(app, ["quantize", "tiny-sdxl-random", "--out", str(out), "--calib-prompts", str(prompts),
                                 "--calib-steps", "1", "--alpha", "0.5", "--rank", "16"])
    assert result.exit_code == 0, result.output
    info = json.loads((out / QUANT_FILE).read_text())
    assert info["quantization"]["rank"] == 16 and info["calibration"]["prompts"] == ["a lighthouse at dusk"]
    assert all(v["rank"] == 16 and v["alpha"] == 0.5 for v in info["layers"].values())
    render = runner.invoke(app, ["render", "a fox", "--model", str(out), "--steps", "2", "--out", str(tmp_path / "img")])
    assert render.exit_code == 0, render.output
    assert list((tmp_path / "img").glob("*.png"))
    twice = runner.invoke(app, ["quantize", str(out), "--out", str(tmp_path / "again")])
    assert twice.exit_code == 2 and "already quantized" in twice.output
    bad = runner.invoke(app, ["quantize", "tiny-sdxl-random", "--out", str(tmp_path / "x"), "--format", "fp8"])
    assert bad.exit_code == 2 and "unknown 4-bit format 'fp8'" in bad.output
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    refused = runner.invoke(app, ["quantize", "tiny-sdxl-random", "--out", str(busy)])
    assert refused.exit_code == 2 and "not empty" in refused.output and (busy / "keep.txt").exists()


# ------------------------------------------------------------------------------------------------ bad input
@pytest.fixture
def copy_of(quant_dirs, tmp_path):
    made = []

    def copy(name="sdxl"):
        made.append(name)
        target = tmp_path / f"copy-{len(made)}-{name}"
        shutil.copytree(quant_dirs[name], target)
        return target
    return copy


def test_missing_files_get_a_clear_error(copy_of):
    folder = copy_of()
    (folder / WEIGHTS_FILE).unlink()
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: missing \(the quantized model folder is incomplete\)"):
        Studio(str(folder))
    folder = copy_of()
    (folder / QUANT_FILE).unlink()
    with pytest.raises(ModelLoadError, match=r"studio_quant\.json: missing.*re-run `studio quantize`"):
        Studio(str(folder))


def test_mismatched_files_get_a_clear_error(copy_of, quant_dirs):
    folder = copy_of()
    shutil.copy(quant_dirs["sdxl-r8"] / WEIGHTS_FILE, folder / WEIGHTS_FILE)  # another quantization's tensors
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: \d+ bytes, but studio_quant\.json records \d+"):
        Studio(str(folder))
    info = json.loads((folder / QUANT_FILE).read_text())
    info["files"][WEIGHTS_FILE]["bytes"] = (folder / WEIGHTS_FILE).stat().st_size  # sizes agree, contents do not
    (folder / QUANT_FILE).write_text(json.dumps(info))
    with pytest.raises(ModelLoadError, match=r"does not match studio_quant\.json.*tensors of the wrong shape "
                                             r"\(e\.g\. .*lora_down: \[8, 64\] vs \[32, 64\]\)"):
        Studio(str(folder))
    folder = copy_of()
    info = json.loads((folder / QUANT_FILE).read_text())
    first = next(iter(info["layers"]))
    info["layers"][first]["out"] = 48
    (folder / QUANT_FILE).write_text(json.dumps(info))
    with pytest.raises(ModelLoadError, match=rf"layer '{first}' is recorded as 64->48 but the model config has"):
        Studio(str(folder))
    (folder / QUANT_FILE).write_text("{ not json")
    with pytest.raises(ModelLoadError, match=r"studio_quant\.json: not valid JSON"):
        Studio(str(folder))


# --------------------------------------------------------------------------------------------------- memory
@pytest.mark.parametrize("fmt,group", [("int4", 64), ("nvfp4", 16)])
def test_memory_arithmetic_matches_the_meta_build_at_full_size(fmt, group):
    for family, arithmetic, config in (("flux", flux_arithmetic, FLUX1_DEV), ("sdxl", sdxl_arithmetic, SDXL_BASE)):
        report = arithmetic(config, fmt=fmt, group=group)
        bytes16, bytes_q, per_layer = meta_bytes(meta_denoiser(config), family, fmt=fmt, group=group)
        assert (report.total16, report.total_q) == (bytes16, bytes_q), family
        if family == "flux" and fmt == "int4":
            assert report.ratio >= 3.5  # the paper: 3.6x smaller
            assert len(per_layer) == 19 * 14 + 38 * 6  # 8 attention + 4 feed-forward + 2 adaLN; 3 + 2 + 1


def test_memory_measured_on_a_loaded_model_matches_the_arithmetic(quant_dirs):
    unet = Studio(str(quant_dirs["sdxl"])).pipe.unet
    stored, original = model_bytes(unet)
    report = sdxl_arithmetic(dict(unet.config), fmt="int4", group=64)
    assert (stored, original) == (report.total_q, report.total16)
    file_size = (quant_dirs["sdxl"] / WEIGHTS_FILE).stat().st_size
    assert stored < file_size < stored + 200_000  # the file is the tensors plus a JSON header
