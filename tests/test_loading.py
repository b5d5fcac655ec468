"""Loading models: built-in tiny names, a local diffusers folder, a single-file FLUX transformer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipelines.errors import ModelLoadError
from pipelines.loading import pick_dtype, sniff_single_file
from pipelines.tiny import build_tiny_flux, build_tiny_sdxl
from studio import Studio


def _render(studio, **kw):
    return studio.compose("a lighthouse at dusk", [], "merge", steps=2, seed=1, width=64, height=64,
                          output_type="np", **kw).latents[0]


def test_local_folder_equals_builtin(tmp_path):
    folder = tmp_path / "tiny-sdxl-folder"
    build_tiny_sdxl().save_pretrained(folder)
    from_folder = Studio(str(folder))
    assert from_folder.family.name == "sdxl"
    np.testing.assert_array_equal(_render(from_folder), _render(Studio("tiny-sdxl-random")))


def test_single_file_flux_transformer(tmp_path):
    folder = tmp_path / "tiny-flux-folder"
    pipe = build_tiny_flux()
    pipe.save_pretrained(folder)
    single = tmp_path / "flux-transformer.safetensors"
    save_file({k: v.contiguous() for k, v in pipe.transformer.state_dict().items()}, str(single))
    assert sniff_single_file(single) == "flux"
    studio = Studio(str(single), config=str(folder))
    assert studio.family.name == "flux"
    # same weights, same image up to float rounding (the single-file route may lay tensors out differently)
    np.testing.assert_allclose(_render(studio), _render(Studio("tiny-flux-random")), rtol=0, atol=1e-5)


def test_sniff_rejects_other_checkpoints(tmp_path):
    other = tmp_path / "sd3.safetensors"
    save_file({"joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(ModelLoadError, match="neither SDXL nor FLUX.1"):
        sniff_single_file(other)


def test_unreachable_hub_id_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="cannot load 'no-such-org/no-such-model'"):
        Studio("no-such-org/no-such-model")


def test_dtype_choice():
    assert pick_dtype(torch.device("cpu")) == torch.float32
    assert pick_dtype(torch.device("cpu"), "bf16") == torch.bfloat16
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        pick_dtype(torch.device("cpu"), "int3")


def test_bfloat16_composite_runs(sdxl_loras):
    """Reduced precision end to end (what CUDA users get), on the CPU."""
    studio = Studio("tiny-sdxl-random", dtype="bf16")
    result = studio.compose("a corgi", [f"{sdxl_loras[0]}:0.8", sdxl_loras[1]], "composite", steps=2)
    assert result.image.size == (64, 64)
    assert next(studio.pipe.unet.parameters()).dtype == torch.bfloat16


def test_a_missing_local_lora_path_is_not_tried_as_a_hub_id(tmp_path, monkeypatch):
    """A path that can only be local (absolute, ./, ~) says which folder is missing instead of a Hub error;
    an ``owner/name`` id still goes to the Hub."""
    import studio.lora as lora_module
    from pipelines.errors import LoraFileError

    asked = []
    monkeypatch.setattr(lora_module, "_download", lambda text: asked.append(text) or tmp_path / "x.safetensors")
    for text, where in [("/nonexistent/dir/foo.safetensors", "no such folder: /nonexistent/dir"),
                        (f"{tmp_path}/foo.safetensors", "no such file in that folder"),
                        ("./nowhere/a/b.safetensors", "no such folder")]:
        with pytest.raises(LoraFileError, match=where):
            lora_module.resolve_source(text)
    assert asked == []
    lora_module.resolve_source("someone/some-lora")
    lora_module.resolve_source("someone/some-lora/sub/file.safetensors")
    assert asked == ["someone/some-lora", "someone/some-lora/sub/file.safetensors"]


def test_loading_writes_no_progress_bars_into_a_log(capfd):
    """stderr is not a terminal under pytest (as in a log file): no diffusers/transformers loading bars, and both
    libraries' progress-bar setting is as it was afterwards."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    from pipelines.loading import load_pipeline

    load_pipeline("tiny-sdxl")
    err = capfd.readouterr().err
    assert "Loading pipeline components" not in err and "Loading weights" not in err
    assert diffusers_logging.is_progress_bar_enabled() and transformers_logging.is_progress_bar_enabled()
