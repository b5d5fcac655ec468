"""Training the world's concepts as SHiRA adapters (Bhardwaj et al. 2024, "Sparse High Rank Adapters").

A SHiRA adapter trains a fixed sparse subset of each targeted layer's weights directly: ``W + ΔW`` with ``ΔW``
non-zero only on a mask chosen before training (SHiRA-Rand, the random mask of the paper and PEFT's default).
The adapter is made, trained and written by PEFT's own SHiRA tuner (``ShiraConfig`` +
``inject_adapter_in_model``; a third-party writer, as the other world LoRAs): for an ``m x n`` weight PEFT trains
``r·(m+n)`` entries, so ``r = 1`` on the tiny models' 96-wide layers gives 1.2-2.6% of each layer (1.6% of the
targeted SDXL weights, 1.5% of FLUX's), the paper's 1-2%. Every concept gets its own mask seed, so the supports
of two adapters overlap only by chance (about the density, ~1.5%): the paper's argument for fusing SHiRAs by a
plain sparse sum.

Targets are the linear layers the world's LoRAs target (PEFT's SHiRA adapts ``nn.Linear`` only, so the SDXL
ResNet convolutions are left out); the text encoder is not adapted (on its 32-wide layers ``r = 1`` is already
6% of the weights). The file is what diffusers' ``save_lora_weights`` writes from PEFT's
``get_peft_model_state_dict`` (``unet.<module>.shira_weight`` / ``.shira_indices``), re-saved compactly with the
world's trigger metadata: values in float16 and indices in int16 (every index of the tiny layers is below 32768;
PEFT's own loader converts indices back with ``.to(torch.int)``, the studio reads any integer type).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipelines.atomic_files import atomic_target
from pipelines.families import FAMILIES

from .concepts import HELD_OUT, HeldOut
from .data import DataSet
from .loras import FLUX_TARGETS, SDXL_TARGETS, ParamBag, concept_metadata
from .objectives import denoiser_step_fn
from .trainer import Checkpoint, device, train

RANK = 1  # PEFT's r: r·(m+n) trained entries per m x n layer (1.2-2.6% of the tiny models' layers)
# 5x the LoRAs' rate: at 2e-3 the SDXL zorb SHiRA drew its shape in 1 of 8 seeds after 200 steps (FLUX 0 of 8
# after 400), at 1e-2 in 7 of 8 (SDXL, 200 steps)
LR = 1e-2
LINEAR_TARGETS = {"sdxl": [t for t in SDXL_TARGETS if not t.startswith("conv")], "flux": list(FLUX_TARGETS)}


def mask_seed(family: str, concept: HeldOut) -> int:
    """The random-mask seed of one adapter: distinct per concept and family (distinct supports)."""
    return 9000 + 10 * [c.name for c in HELD_OUT].index(concept.name) + (0 if family == "sdxl" else 1)


def metadata(family: str, concept: HeldOut, density: float) -> dict[str, str]:
    """Trigger metadata as the other world LoRAs carry it (kohya/modelspec keys), plus the SHiRA settings."""
    return {"format": "pt"} | concept_metadata(family, concept) | {
        "ss_network_dim": str(RANK),
        "ss_network_module": "peft.shira",
        "shira.r": str(RANK),
        "shira.mask": "random",
        "shira.density": f"{density:.4f}",
    }


def compact(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Values in float16, indices in int16 (refused if an index does not fit)."""
    out = {}
    for key, value in tensors.items():
        if key.endswith("shira_indices"):
            if value.numel() and int(value.max()) > torch.iinfo(torch.int16).max:
                raise ValueError(f"{key}: an index above 32767 does not fit int16")
            out[key] = value.to(torch.int16).contiguous()
        else:
            out[key] = value.to(torch.float16).contiguous()
    return out


def train_shira(family: str, concept: HeldOut, pipe, data: DataSet, latents: torch.Tensor, workdir: Path,
                out: Path, *, steps: int, batch_size: int = 32, lr: float = LR,
                guidance: float | None = None) -> Path:
    """Train one SHiRA adapter of ``concept`` on ``pipe`` (modified in place: build a fresh pipe per adapter)
    with PEFT's tuner and write ``out``."""
    from peft import ShiraConfig, get_peft_model_state_dict, inject_adapter_in_model

    seed = mask_seed(family, concept)
    torch.manual_seed(seed)
    pipe.to(device())
    for p in pipe.components.values():
        if isinstance(p, nn.Module):
            p.requires_grad_(False)
    denoiser_name = FAMILIES[family].denoiser
    denoiser = getattr(pipe, denoiser_name)
    config = ShiraConfig(r=RANK, target_modules=LINEAR_TARGETS[family], random_seed=seed)
    inject_adapter_in_model(config, denoiser, adapter_name="default")
    denoiser.to(device())
    named = {k: p for k, p in denoiser.named_parameters() if "shira_weight" in k}
    for p in named.values():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(list(named.values()), lr=lr, weight_decay=0.0)
    step_fn = denoiser_step_fn(family, pipe, data, latents, seed=seed, batch_size=batch_size, drop_rate=0.05,
                               params=named.values(), optimizer=optimizer, guidance=guidance)
    name = f"shira-{family}-{concept.name}"
    train(name, Checkpoint(workdir / name, {"shira": ParamBag(named)}, optimizer), steps, step_fn, lr=lr,
          every=100, warmup=50)

    with torch.no_grad():
        state = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(denoiser, adapter_name="default").items()}
    trained = sum(v.numel() for k, v in state.items() if k.endswith("shira_weight"))
    total = sum(m.base_layer.weight.numel() for m in denoiser.modules() if hasattr(m, "shira_indices"))
    tmp = out.parent / f".{out.stem}-peft"
    type(pipe).save_lora_weights(str(tmp), weight_name="shira.safetensors",
                                 **{f"{denoiser_name}_lora_layers": state})
    tensors = load_file(str(tmp / "shira.safetensors"))
    (tmp / "shira.safetensors").unlink()
    tmp.rmdir()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_target(out) as partial:
        save_file(compact(tensors), str(partial), metadata=metadata(family, concept, trained / total))
    return out
