"""Training one LoRA per held-out concept per family, saved in the formats people download.

Each LoRA trains on renders of its concept combined with random base concepts, captioned with its trigger word
("a large red zorb, solid, on a dark background, left") or, for a subject, the class word it is bound to
("a large red circle, ...": :data:`.concepts.CLASS_WORDS`), with the base model frozen and the same objective as
the base (:mod:`.objectives`). Writers are the real tools of each format:

* diffusers/PEFT: ``peft`` adapters saved with ``save_lora_weights``;
* kohya/A1111: the same, converted by diffusers' ``convert_state_dict_to_kohya``;
* LyCORIS LoHa / LoKr: trained as ``lycoris-lora`` networks and saved with ``save_weights``.

Every file carries kohya-style metadata: output name, base model, network dim/alpha/module, trigger phrase and
tag frequencies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .concepts import HELD_OUT, HeldOut, trigger_phrase
from .data import DataSet
from .objectives import denoiser_step_fn
from .trainer import Checkpoint, device, train

SDXL_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2"]
FLUX_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
                "norm1.linear", "norm.linear"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
RANK = 8  # PEFT/kohya LoRA rank (= alpha) of the denoiser
LYCORIS_DIM = 4  # LyCORIS dim (= alpha), linear and conv layers
# The network dim (kohya's ss_network_dim: LoRA rank or LyCORIS dim) per "<family>/<concept>" where the default
# was too small. On the four-level tiny-sdxl, 20 seeds alone, 2400 steps: the striped LoHa drew stripes in 70% at
# dim 4 (75% resumed to 4000 steps, 85% at lr 3e-3) and 95% at dim 8; the dotted kohya LoRA its dots in 80% at
# rank 8 and 90% at rank 16. Every striped miss was a yellow shape, whose white stripes differ least from its fill.
NETWORK_DIM = {"sdxl/style-striped": 8, "sdxl/style-dotted": 16}

# which real-world format each LoRA ships in
FORMATS = {
    "sdxl": {"subject-zorb": "kohya", "subject-quix": "peft", "style-striped": "loha", "style-dotted": "kohya",
             "background-bricks": "lokr", "background-waves": "peft"},
    "flux": {"subject-zorb": "peft", "subject-quix": "lokr", "style-striped": "peft", "style-dotted": "loha",
             "background-bricks": "peft", "background-waves": "peft"},
}
BASE_VERSION = {"sdxl": "sdxl_base_v1-0", "flux": "flux1"}
ARCHITECTURE = {"sdxl": "stable-diffusion-xl-v1-base/lora", "flux": "flux-1-dev/lora"}


class ParamBag(nn.Module):
    """Holds (references to) the trainable parameters so the checkpoint saves only them."""

    def __init__(self, named: dict[str, nn.Parameter]):
        super().__init__()
        self.bag = nn.ParameterDict({k.replace(".", "__"): p for k, p in named.items()})


@dataclass
class LoraJob:
    family: str
    concept: HeldOut
    kind: str  # "peft" | "kohya" | "loha" | "lokr"

    @property
    def name(self) -> str:
        return self.concept.name

    @property
    def denoiser(self) -> str:
        return "unet" if self.family == "sdxl" else "transformer"


def concept_metadata(family: str, concept: HeldOut) -> dict[str, str]:
    """The kohya/modelspec keys every world adapter file carries: name, base model, trigger phrase and tags."""
    trigger = trigger_phrase(concept, family)
    return {
        "ss_output_name": concept.name,
        "ss_base_model_version": BASE_VERSION[family],
        "ss_tag_frequency": json.dumps({f"10_{trigger}": {trigger: 100, concept.category: 100}}),
        "modelspec.title": concept.name,
        "modelspec.architecture": ARCHITECTURE[family],
        "modelspec.trigger_phrase": trigger,
        "studio.concept": concept.category,
    }


def metadata(job: LoraJob, dim: int, alpha: float, module: str, algo: str | None = None) -> dict[str, str]:
    meta = concept_metadata(job.family, job.concept) | {
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(alpha),
        "ss_network_module": module,
    }
    if algo:
        meta["ss_network_args"] = json.dumps({"algo": algo})
    return meta


def _attach(job: LoraJob, pipe, seed: int):
    """Add the trainable adapter; returns (named trainable params, saver(path))."""
    torch.manual_seed(seed)
    denoiser = getattr(pipe, job.denoiser)
    targets = SDXL_TARGETS if job.family == "sdxl" else FLUX_TARGETS
    lora_kind = job.kind in ("peft", "kohya")
    dim = NETWORK_DIM.get(f"{job.family}/{job.name}", RANK if lora_kind else LYCORIS_DIM)
    if lora_kind:
        from peft import LoraConfig
        from peft.utils import get_peft_model_state_dict

        denoiser.add_adapter(LoraConfig(r=dim, lora_alpha=dim, target_modules=targets,
                                        init_lora_weights="gaussian"), adapter_name="default")
        pipe.text_encoder.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TEXT_TARGETS,
                                                 init_lora_weights="gaussian"), adapter_name="default")
        named = {f"d.{k}": p for k, p in denoiser.named_parameters() if "lora_" in k}
        named |= {f"t.{k}": p for k, p in pipe.text_encoder.named_parameters() if "lora_" in k}

        def save(path: Path) -> None:
            layers = {f"{job.denoiser}_lora_layers": get_peft_model_state_dict(denoiser, adapter_name="default"),
                      "text_encoder_lora_layers": get_peft_model_state_dict(pipe.text_encoder, adapter_name="default")}
            tmp = path.parent / f".{path.stem}-peft"
            type(pipe).save_lora_weights(str(tmp), weight_name="lora.safetensors", **layers)
            tensors = load_file(str(tmp / "lora.safetensors"))
            (tmp / "lora.safetensors").unlink()
            tmp.rmdir()
            if job.kind == "kohya":
                from diffusers.utils import convert_state_dict_to_kohya

                tensors = convert_state_dict_to_kohya(tensors)
                meta = metadata(job, dim, dim, "networks.lora")
            else:
                meta = metadata(job, dim, dim, "peft")
            save_file({k: v.half().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata=meta)

        return named, save

    import lycoris.kohya as lk

    preset = {"enable_conv": job.family == "sdxl",
              "unet_target_module": (["Transformer2DModel", "ResnetBlock2D"] if job.family == "sdxl"
                                     else ["FluxTransformerBlock", "FluxSingleTransformerBlock"]),
              "unet_target_name": [],
              "text_encoder_target_module": ["CLIPAttention", "CLIPSdpaAttention"],
              "text_encoder_target_name": []}
    lk.PRESET["studio-world"] = preset
    # FLUX's LoKr keeps w2 a full matrix (LyCORIS' "full_matrix", as kohya users set a huge dim): with a rank-4 w2
    # the FLUX quix LoRA drew its star in 70% of seeds after 2400 steps.
    extra = {"factor": 4, "full_matrix": job.family == "flux"} if job.kind == "lokr" else {}
    net = lk.create_network(1.0, dim, float(dim), pipe.vae, [pipe.text_encoder], denoiser, algo=job.kind,
                            preset="studio-world", conv_dim=dim, conv_alpha=float(dim), **extra)
    net.apply_to([pipe.text_encoder], denoiser, apply_text_encoder=True, apply_unet=True)
    net.to(device())
    named = dict(net.named_parameters())

    def save(path: Path) -> None:
        net.save_weights(str(path), torch.float16, metadata(job, dim, float(dim), "lycoris.kohya", job.kind))

    return named, save


def train_lora(job: LoraJob, pipe, data: DataSet, latents: torch.Tensor, workdir: Path, out: Path, *, steps: int,
               batch_size: int = 32, lr: float = 1e-3, guidance: float | None = None) -> Path:
    """Train ``job`` on ``pipe`` (modified in place: build a fresh pipe per job) and write ``out``."""
    seed = 5000 + 10 * [c.name for c in HELD_OUT].index(job.name) + (0 if job.family == "sdxl" else 1)
    pipe.to(device())
    for p in pipe.components.values():
        if isinstance(p, nn.Module):
            p.requires_grad_(False)
    named, save = _attach(job, pipe, seed)
    for p in named.values():
        p.requires_grad_(True)
    bag = ParamBag(named)
    optimizer = torch.optim.AdamW(list(named.values()), lr=lr, weight_decay=0.0)

    step_fn = denoiser_step_fn(job.family, pipe, data, latents, seed=seed, batch_size=batch_size, drop_rate=0.05,
                               params=named.values(), optimizer=optimizer, guidance=guidance)

    train(f"lora-{job.family}-{job.name}", Checkpoint(workdir / f"lora-{job.family}-{job.name}", {"lora": bag},
                                                      optimizer), steps, step_fn, lr=lr, every=200, warmup=50)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        save(out)
    return out


def jobs(family: str) -> list[LoraJob]:
    return [LoraJob(family, c, FORMATS[family][c.name]) for c in HELD_OUT]
