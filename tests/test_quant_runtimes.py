"""Runtimes of the 4-bit layers (issue 17): ``dequant`` against its formula and the 16-bit model, ``auto``'s choice
and fallbacks, the runtime in folders, recipes and the CLI, and the Triton kernel under Triton's interpreter."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_quant_linear import host, lora, outlier_layer
from typer.testing import CliRunner

from pipelines.errors import ModelLoadError, StudioError
from pipelines.quant import QuantLinear, runtime
from pipelines.quant.calibrate import read_prompts
from pipelines.quant.convert import Calibration, convert
from pipelines.quant.quantizer import QuantConfig, build_layer, smoothing_factors
from pipelines.quant.storage import QUANT_FILE
from studio import Recipe, Studio
from studio.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread

TESTS = Path(__file__).resolve().parent


def quant_layer(fmt="int4", mode="w4a4", seed=0):
    linear, x = outlier_layer(seed=seed)
    group = 64 if fmt == "int4" else 16
    if mode == "w4a16":
        return build_layer(linear.weight.detach(), linear.bias.detach(), fmt=fmt, group_size=group, rank=0,
                           smooth=None, mode="w4a16"), linear, x
    smooth = smoothing_factors(x.reshape(-1, 256).abs().amax(0), linear.weight, 0.5)
    return build_layer(linear.weight.detach(), linear.bias.detach(), fmt=fmt, group_size=group, rank=16,
                       smooth=smooth), linear, x


# ----------------------------------------------------------------------------------------------- dequant
@pytest.mark.parametrize("fmt,mode", [("int4", "w4a4"), ("nvfp4", "w4a4"), ("int4", "w4a16")])
def test_dequant_is_x_times_the_dequantized_residual_plus_branch(fmt, mode):
    layer, linear, x = quant_layer(fmt, mode)
    layer.runtime = "dequant"
    stored = {k: (v.dtype, v.shape) for k, v in layer.state_dict().items()}
    with torch.no_grad():
        got = layer(x).double()
    # (x / λ) · dequant(R)ᵀ + x · L_downᵀ · L_upᵀ + b, in float64 from the stored codes and scales
    xd = x.double()
    xs = xd / layer.smooth.double() if layer.smooth is not None else xd
    expected = xs @ layer.residual_weight().double().T + layer.bias.double()
    if layer.rank:
        expected = expected + xd @ layer.lora_down.double().T @ layer.lora_up.double().T
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    # no dense copy is kept: the layer holds exactly the tensors it was loaded with
    assert {k: (v.dtype, v.shape) for k, v in layer.state_dict().items()} == stored
    assert not [v for v in vars(layer).values() if isinstance(v, torch.Tensor)]
    # bfloat16 activations: the weight is rounded once to bfloat16 and one GEMM runs in bfloat16
    xb = x.bfloat16()
    with torch.no_grad():
        yb = layer.bfloat16()._product(xb)
    assert yb.dtype == torch.bfloat16
    assert torch.equal(yb, torch.nn.functional.linear(xb, (layer.residual_weight() / (
        layer.smooth.float() if layer.smooth is not None else 1.0)).bfloat16()))


def test_dequant_is_closer_to_the_16_bit_layer_than_w4a4_and_hosts_loras():
    layer, linear, x = quant_layer()
    with torch.no_grad():
        exact = linear(x)
        errors = {}
        for name in ("reference", "dequant"):
            layer.runtime = name
            errors[name] = ((layer(x) - exact).norm() / exact.norm()).item()
    assert errors["dequant"] < errors["reference"], errors  # no activation rounding
    deltas = {"a": lora(256, 192, 4, 1), "b": lora(256, 192, 8, 2, scale=2.0)}
    layer.runtime = "dequant"
    with torch.no_grad():
        base = layer(x)
    composed, state = host(layer, deltas)
    gains = torch.tensor([[0.8, 0.3], [0.0, 1.5]])
    state.set_gains(denoiser=gains)
    with torch.no_grad():
        got = composed(x)
    for i in range(2):
        change = sum(gains[i, j] * d.scale * (x[i] @ d.down.T @ d.up.T) for j, d in enumerate(deltas.values()))
        torch.testing.assert_close(got[i], base[i] + change, rtol=1e-5, atol=1e-5)


# PSNR (dB) of the dequant runtime vs the 16-bit trained tiny models: the README's runtime table rounded down
# (benchmarks/bench_quant_kernels.py --only psnr measures the same renders: 2 prompts x 2 seeds, 8 steps)
README_DEQUANT_PSNR = {("sdxl", "int4"): 49.5, ("flux", "nvfp4"): 29.0}
PSNR_PROMPTS = ("a corgi astronaut on the moon", "a lighthouse at dusk, oil painting")


def psnr(a, b):
    return 10 * np.log10(1.0 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


@pytest.mark.parametrize("family,fmt", list(README_DEQUANT_PSNR))
def test_dequant_matches_the_16_bit_trained_tiny_model_as_the_readme_says(family, fmt, tmp_path):
    config = QuantConfig(fmt=fmt, alphas=(0.25, 0.5, 0.75), group_size=32 if (family, fmt) == ("flux", "int4") else None)
    _, folder = convert(f"tiny-{family}", tmp_path / "q", config,
                        Calibration(read_prompts(None)[:1], steps=2, samples_per_layer=128))
    ref, studio = Studio(f"tiny-{family}"), Studio(str(folder), runtime="dequant")
    assert studio.runtime_counts["dequant"] >= 10 and set(studio.runtime_counts) == {"dequant"}
    values = []
    for prompt in PSNR_PROMPTS:
        for seed in (0, 1):
            a, b = (s.compose(prompt, [], steps=8, seed=seed, output_type="np").latents[0] for s in (ref, studio))
            values.append(psnr(a, b))
    assert np.mean(values) >= README_DEQUANT_PSNR[(family, fmt)], values


# ---------------------------------------------------------------------------------------------- auto
def fake_gpu(monkeypatch, capability=(9, 0), triton_error=None):
    monkeypatch.setattr(runtime, "_capability", lambda index: capability)
    monkeypatch.setattr(runtime, "triton_import_error", lambda: triton_error)
    monkeypatch.setattr(runtime, "interpreted", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Fake GPU")


def test_auto_picks_triton_on_a_capable_gpu_and_falls_back_cleanly(monkeypatch):
    int4, _, _ = quant_layer("int4")
    nvfp4, _, _ = quant_layer("nvfp4")
    adaln, _, _ = quant_layer("int4", "w4a16")
    gpu = torch.device("cuda:0")
    fake_gpu(monkeypatch, (9, 0))  # Hopper: INT8 tensor cores, no INT4
    assert runtime.resolve("auto", int4, gpu) == "triton"
    assert runtime.resolve("auto", nvfp4, gpu) == "dequant"  # no NVFP4 kernel
    assert runtime.resolve("auto", adaln, gpu) == "dequant"  # weight-only layers never quantize activations
    assert runtime.resolve("auto", int4, "cpu") == "dequant"
    for name in ("reference", "dequant"):
        assert runtime.resolve(name, int4, gpu) == name
    fake_gpu(monkeypatch, (7, 5))  # Turing
    assert runtime.resolve("auto", int4, gpu) == "dequant"
    with pytest.raises(RuntimeError, match=r"runtime 'triton' cannot run: Fake GPU has compute capability 7\.5; "
                                           r"the kernel needs 8\.0"):
        runtime.resolve("triton", int4, gpu)
    fake_gpu(monkeypatch, (8, 0), triton_error="ModuleNotFoundError: No module named 'triton'")
    assert runtime.resolve("auto", int4, gpu) == "dequant"
    with pytest.raises(RuntimeError, match=r"triton cannot be imported \(ModuleNotFoundError"):
        runtime.resolve("triton", int4, gpu)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_auto_falls_back_to_dequant_when_the_kernel_cannot_compile(monkeypatch):
    from pipelines.quant import triton_kernels

    layer, _, x = quant_layer("int4")
    monkeypatch.setattr(runtime, "_kernel_failure", None)
    monkeypatch.setattr(runtime, "interpreted", lambda: True)  # the CPU counts as a Triton device here

    def broken(*args, **kwargs):
        raise RuntimeError("PTX assembly failed")

    monkeypatch.setattr(triton_kernels, "w4a4_linear", broken)
    layer.runtime = "triton"
    with pytest.raises(RuntimeError, match="PTX assembly failed"), torch.no_grad():
        layer(x)
    layer.runtime = "auto"
    with torch.no_grad():
        got = layer(x)
        layer.runtime = "dequant"
        assert torch.equal(got, layer(x))
    assert runtime.resolve("auto", layer, "cpu") == "dequant"  # from now on, without trying again
    with pytest.raises(RuntimeError, match=r"runtime 'triton' cannot run: the Triton kernel failed here "
                                           r"\(RuntimeError: PTX assembly failed\)"):
        runtime.resolve("triton", layer, "cpu")


def test_triton_without_a_gpu_is_refused_when_selected_and_nothing_changes(monkeypatch):
    monkeypatch.setattr(runtime, "interpreted", lambda: False)
    model = torch.nn.Sequential(quant_layer("int4")[0], quant_layer("int4", "w4a16")[0])
    with pytest.raises(RuntimeError, match=r"the model runs on cpu; the Triton W4A4 kernel needs a CUDA GPU"):
        runtime.set_runtime(model, "triton")
    assert [m.runtime for m in model] == ["reference", "reference"]
    with pytest.raises(ValueError, match=r"unknown runtime 'fast'; use one of auto, dequant, triton, reference"):
        runtime.set_runtime(model, "fast")
    assert runtime.set_runtime(model, "auto") == {"dequant": 2}
    assert [m.runtime for m in model] == ["auto", "auto"]
    with pytest.raises(ValueError, match="unknown runtime"):
        QuantLinear(64, 64, runtime="int8")


# --------------------------------------------------------------------------- folders, Studio, recipes, CLI
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    _, out = convert("tiny-sdxl-random", tmp_path_factory.mktemp("rt") / "q", QuantConfig(fmt="int4", alphas=None),
                     Calibration(read_prompts(None)[:1], steps=1, samples_per_layer=64), runtime="dequant")
    return out


def test_the_folder_records_a_runtime_and_studio_overrides_it(folder, tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "interpreted", lambda: False)
    info = json.loads((folder / QUANT_FILE).read_text())
    assert info["runtime"] == "dequant"
    studio = Studio(str(folder))
    layers = [m for m in studio.pipe.unet.modules() if isinstance(m, QuantLinear)]
    assert studio.runtime == "dequant" and {m.runtime for m in layers} == {"dequant"}
    assert studio.compose("a fox", [], steps=1, output_type="np").recipe.runtime == "dequant"
    assert Studio(str(folder), runtime="reference").compose("a fox", [], steps=1).recipe.runtime == "reference"
    assert Studio("tiny-sdxl-random").compose("a fox", [], steps=1).recipe.runtime == "auto"  # 16-bit model
    with pytest.raises(StudioError, match=r"runtime 'triton' cannot run: the model runs on cpu"):
        Studio(str(folder), runtime="triton")
    # a folder written before runtimes existed loads with auto; a bad runtime in it is refused, naming the file
    del info["runtime"]
    (folder / QUANT_FILE).write_text(json.dumps(info))
    old = Studio(str(folder))
    assert old.runtime == "auto" and old.runtime_counts == {"dequant": len(layers)}
    info["runtime"] = "warp-speed"
    (folder / QUANT_FILE).write_text(json.dumps(info))
    with pytest.raises(ModelLoadError, match=r"studio_quant\.json: unknown runtime 'warp-speed'"):
        Studio(str(folder))
    info["runtime"] = "dequant"
    (folder / QUANT_FILE).write_text(json.dumps(info))


def test_recipes_keep_the_runtime_and_old_recipes_load(monkeypatch):
    monkeypatch.setattr(runtime, "interpreted", lambda: False)
    old = Recipe.from_toml('model = "tiny-sdxl"\nprompt = "a fox"\n')
    assert old.runtime == "auto"
    rec = Recipe(model="q/", prompt="a fox", runtime="triton")
    assert Recipe.from_toml(rec.to_toml()).runtime == "triton"
    # an image made by the kernel is reproduced by the reference path (the same W4A4 numbers) where it cannot run
    chosen, note = runtime.recipe_runtime("triton", "cpu")
    assert chosen == "reference" and "cannot run here" in note
    assert runtime.recipe_runtime("dequant", "cpu") == ("dequant", None)
    assert runtime.recipe_runtime("auto", "cpu") == (None, None)


def test_render_and_quantize_print_the_runtime(folder, tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "interpreted", lambda: False)
    runner = CliRunner()
    n = len(json.loads((folder / QUANT_FILE).read_text())["layers"])
    result = runner.invoke(app, ["render", "a fox", "--model", str(folder), "--steps", "1", "--out", str(tmp_path / "a"),
                                 "--runtime", "reference"])
    assert result.exit_code == 0, result.output
    assert f"runtime reference: reference (exact W4A4, slow) on {n} layers" in result.output
    png = next((tmp_path / "a").glob("*.png"))
    assert Recipe.load(png).runtime == "reference"
    again = runner.invoke(app, ["render", "--recipe", str(png), "--out", str(tmp_path / "b")])
    assert again.exit_code == 0 and "runtime reference" in again.output
    bad = runner.invoke(app, ["render", "a fox", "--model", str(folder), "--runtime", "triton"])
    assert bad.exit_code == 2 and "runtime 'triton' cannot run" in bad.output
    prompts = tmp_path / "p.txt"
    prompts.write_text("a lighthouse\n")
    quant = runner.invoke(app, ["quantize", "tiny-sdxl-random", "--out", str(tmp_path / "q"), "--calib-prompts",
                                str(prompts), "--calib-steps", "1", "--alpha", "0.5", "--runtime", "triton"])
    assert quant.exit_code == 0, quant.output
    assert "runtime triton recorded, but not on this machine" in quant.output
    assert json.loads((tmp_path / "q" / QUANT_FILE).read_text())["runtime"] == "triton"
    refused = runner.invoke(app, ["quantize", "tiny-sdxl-random", "--out", str(tmp_path / "r"), "--runtime", "int3"])
    assert refused.exit_code == 2 and "unknown runtime 'int3'" in refused.output


# ------------------------------------------------------------------------------------- Triton, interpreted
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed (it ships with "
                    "the CUDA build of torch, which CI installs)")
def test_triton_kernels_equal_the_reference_path_under_the_interpreter():
    """tests/quant_triton_interpreted.py in a fresh process with TRITON_INTERPRET=1 (read when triton is imported)."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(TESTS / "quant_triton_interpreted.py")], cwd=TESTS.parent, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]
