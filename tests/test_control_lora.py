"""FLUX control LoRAs (BFL Canny/Depth and files like them) are refused clearly, in BFL's layout and in diffusers'
layout, before anything attaches; the refusal names FluxControlPipeline as not supported yet.

The diffusers-layout file is written by third-party code only: a tiny ``FluxTransformer2DModel`` with the
studio's tiny FLUX config but twice the input channels (what a control LoRA is trained on: image latents and
control latents concatenated), PEFT's ``add_adapter`` on ``x_embedder`` and the attention/MLP layers (random
factors, as in ``writers.py``), optionally a ``norm_q`` scale, saved with diffusers'
``FluxControlPipeline.save_lora_weights``. That the file is a real control LoRA is checked on the plain diffusers
path: ``FluxControlPipeline.load_lora_weights`` widens the tiny transformer's ``x_embedder`` and renders.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import writers
from PIL import Image

from pipelines.adapters import parse_lora
from pipelines.errors import IncompatibleLoraError
from pipelines.families import FLUX
from pipelines.tiny import build_tiny_flux
from studio import Studio

NOT_YET = "does not support FluxControlPipeline yet"


def write_control_lora(folder: Path, *, norms: bool, seed: int = 11) -> Path:
    """A diffusers-layout FLUX control LoRA for the tiny FLUX model (see the module docstring)."""
    from diffusers import FluxControlPipeline, FluxTransformer2DModel

    config = {k: v for k, v in build_tiny_flux().transformer.config.items() if not k.startswith("_")}
    config["out_channels"] = config["out_channels"] or config["in_channels"]
    config["in_channels"] = 2 * config["in_channels"]
    torch.manual_seed(seed)
    wide = FluxTransformer2DModel(**config)
    layers, lora_config = writers.add_peft_adapter(wide, ["x_embedder", *writers.FLUX_TARGETS], 4, 4, seed, 0.05)
    if norms:
        dim = wide.transformer_blocks[0].attn.norm_q.weight.shape[0]
        layers["transformer_blocks.0.attn.norm_q.weight"] = 1 + 0.1 * torch.randn(dim, generator=torch.Generator().manual_seed(seed))
    folder.mkdir(parents=True, exist_ok=True)
    FluxControlPipeline.save_lora_weights(str(folder), weight_name="control.safetensors", transformer_lora_layers=layers,
                                          transformer_lora_adapter_metadata=lora_config.to_dict())
    return folder / "control.safetensors"


@pytest.fixture(scope="module")
def control_loras(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("control-loras")
    return {"norms": write_control_lora(folder / "with-norms", norms=True),
            "plain": write_control_lora(folder / "embedder-only", norms=False, seed=12)}


@pytest.fixture(scope="module")
def studio() -> Studio:
    return Studio("tiny-flux-random")


def test_written_files_are_control_loras_for_diffusers(control_loras):
    """The fixture files are what FluxControlPipeline loads as control LoRAs (its input layer is widened)."""
    from diffusers import FluxControlPipeline

    base = build_tiny_flux()
    width = base.transformer.x_embedder.in_features
    components = {k: v for k, v in base.components.items() if k in FluxControlPipeline._get_signature_keys(FluxControlPipeline)[0]}
    pipe = FluxControlPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(control_loras["norms"]))
    embedder = pipe.transformer.x_embedder
    assert getattr(embedder, "base_layer", embedder).in_features == 2 * width == pipe.transformer.config.in_channels
    control = Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype("uint8"))
    image = pipe("a corgi", control_image=control, num_inference_steps=2, height=64, width=64, guidance_scale=3.5,
                 generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


@pytest.mark.parametrize("kind, names", [("norms", "normalisation scales (transformer.transformer_blocks.0.attn.norm_q"),
                                         ("plain", "its x_embedder takes 32 input channels, the model's 16")])
def test_control_lora_refused_before_anything_attaches(studio, control_loras, flux_loras, kind, names):
    transformer = studio.pipe.transformer
    attached = set(studio.composer.adapters)  # LoRAs stay attached between renders; none may be added here
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    with pytest.raises(IncompatibleLoraError, match="control LoRA in diffusers' layout") as info:
        studio.compose("a corgi", [flux_loras[0], control_loras[kind]], "merge", steps=2)
    message = str(info.value)
    assert str(control_loras[kind]) in message and names in message and NOT_YET in message
    # nothing half-applied: a LoRA attached for this call is detached again, the transformer is as before
    assert set(studio.composer.adapters) == attached
    after = transformer.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert transformer.x_embedder.in_features == 16 and transformer.config.in_channels == 16
    # and the studio still renders with the ordinary LoRA
    assert studio.compose("a corgi", [flux_loras[0]], "merge", steps=2).image.size == (64, 64)


def test_bfl_layout_names_flux_control_pipeline(studio, tmp_path):
    """BFL's own key layout (img_in, query_norm.scale), as in FLUX.1-Canny-dev-lora."""
    gen = torch.Generator().manual_seed(3)
    tensors = {"img_in.lora_A.weight": torch.randn(4, 128, generator=gen) * 0.05,
               "img_in.lora_B.weight": torch.randn(3072, 4, generator=gen) * 0.05,
               "double_blocks.0.img_attn.norm.query_norm.scale": torch.ones(128)}
    path = writers.write_state_dict(tmp_path / "canny.safetensors", tensors)
    with pytest.raises(IncompatibleLoraError, match=f"control LoRA in BFL's layout.*{NOT_YET}"):
        parse_lora(path, studio.pipe, FLUX)
