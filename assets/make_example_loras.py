"""Write the small example LoRAs shipped in ``assets/loras/`` (seeded random weights, for the offline quick start).

They are written by third-party code, in two real-world formats: diffusers/PEFT (``save_lora_weights``) and
kohya (diffusers' ``convert_state_dict_to_kohya``), with kohya-style metadata. Their weights are random, so
they change images without showing a concept; trained concept LoRAs for the tiny models replace them.

    python assets/make_example_loras.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from diffusers import FluxPipeline, StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_kohya
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from pipelines.tiny import build_tiny_flux, build_tiny_sdxl  # noqa: E402


def _adapter(module, targets, seed, rank=4):
    module.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), adapter_name="default")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.08)
    return get_peft_model_state_dict(module, adapter_name="default")


def _metadata(name, base, trigger):
    return {"ss_output_name": name, "ss_base_model_version": base, "ss_network_dim": "4", "ss_network_alpha": "4",
            "ss_tag_frequency": json.dumps({"1_" + trigger: {trigger: 10}}), "modelspec.trigger_phrase": trigger,
            "studio.note": "seeded random weights: an example file, not a trained concept"}


def main():
    out = ROOT / "loras"
    sdxl_dir, flux_dir = out / "tiny-sdxl", out / "tiny-flux"
    sdxl_dir.mkdir(parents=True, exist_ok=True)
    flux_dir.mkdir(parents=True, exist_ok=True)
    for seed, name, trigger in ((1, "random-subject", "zorb"), (2, "random-style", "inkwash")):
        pipe = build_tiny_sdxl()
        layers = {"unet_lora_layers": _adapter(pipe.unet, ["to_q", "to_k", "to_v", "to_out.0"], seed),
                  "text_encoder_lora_layers": _adapter(pipe.text_encoder, ["q_proj", "v_proj"], seed + 10)}
        tmp = sdxl_dir / f".{name}"
        StableDiffusionXLPipeline.save_lora_weights(str(tmp), weight_name="lora.safetensors", **layers)
        kohya = convert_state_dict_to_kohya(load_file(str(tmp / "lora.safetensors")))
        save_file({k: v.contiguous() for k, v in kohya.items()}, str(sdxl_dir / f"{name}.safetensors"),
                  metadata=_metadata(name, "sdxl_base_v1-0", trigger))
        (tmp / "lora.safetensors").unlink()
        tmp.rmdir()
        pipe = build_tiny_flux()
        layers = {"transformer_lora_layers": _adapter(pipe.transformer, ["to_q", "to_k", "to_v", "to_out.0"], seed)}
        FluxPipeline.save_lora_weights(str(flux_dir), weight_name=f"{name}.safetensors", **layers)
    print(f"wrote {sorted(p.name for p in out.rglob('*.safetensors'))}")


if __name__ == "__main__":
    main()
