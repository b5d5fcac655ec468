"""LoRA files written by third-party code (diffusers/PEFT, diffusers' kohya converter, lycoris-lora).

Tests read these with the studio and compare against the writer's own definition of the adapter, so a
format test never just round-trips the studio's own writer. Weights are random but small, like trained LoRAs
(large random deltas make the tiny networks chaotic and turn float rounding into visible differences).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipelines.tiny import build_tiny_flux, build_tiny_sdxl

SDXL_UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
FLUX_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "proj_mlp", "proj_out", "ff.net.2", "ff_context.net.2"]


def _randomize(module: torch.nn.Module, seed: int, std: float) -> None:
    """Random A and B factors; DoRA magnitudes (initialised to the weight norms) get a ±10 % perturbation."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.1 * torch.randn(param.shape, generator=gen))
            elif "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def add_peft_adapter(module, targets, rank, alpha, seed, std, use_dora=False):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights="gaussian",
                        use_dora=use_dora)
    module.add_adapter(config, adapter_name="default")
    _randomize(module, seed, std)
    return get_peft_model_state_dict(module, adapter_name="default"), config


def peft_sdxl(folder: Path, seed: int, *, rank: int = 4, alpha: float = 8, text_encoders: bool = False,
              std: float = 0.05, targets=SDXL_UNET_TARGETS, use_dora: bool = False) -> Path:
    """A diffusers-format SDXL LoRA saved with ``StableDiffusionXLPipeline.save_lora_weights``."""
    from diffusers import StableDiffusionXLPipeline

    pipe = build_tiny_sdxl()
    unet_sd, unet_cfg = add_peft_adapter(pipe.unet, targets, rank, alpha, seed, std, use_dora)
    kwargs = {"unet_lora_layers": unet_sd, "unet_lora_adapter_metadata": unet_cfg.to_dict()}
    if text_encoders:
        te_sd, te_cfg = add_peft_adapter(pipe.text_encoder, CLIP_TARGETS, rank, alpha, seed + 1, std, use_dora)
        te2_sd, te2_cfg = add_peft_adapter(pipe.text_encoder_2, CLIP_TARGETS, rank, alpha, seed + 2, std, use_dora)
        kwargs |= {"text_encoder_lora_layers": te_sd, "text_encoder_lora_adapter_metadata": te_cfg.to_dict(),
                   "text_encoder_2_lora_layers": te2_sd, "text_encoder_2_lora_adapter_metadata": te2_cfg.to_dict()}
    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusionXLPipeline.save_lora_weights(str(folder), weight_name="lora.safetensors", **kwargs)
    return folder / "lora.safetensors"


def peft_flux(folder: Path, seed: int, *, rank: int = 4, alpha: float = 4, text_encoder: bool = False,
              std: float = 0.05) -> Path:
    """A diffusers-format FLUX LoRA saved with ``FluxPipeline.save_lora_weights``."""
    from diffusers import FluxPipeline

    pipe = build_tiny_flux()
    tr_sd, tr_cfg = add_peft_adapter(pipe.transformer, FLUX_TARGETS, rank, alpha, seed, std)
    kwargs = {"transformer_lora_layers": tr_sd, "transformer_lora_adapter_metadata": tr_cfg.to_dict()}
    if text_encoder:
        te_sd, te_cfg = add_peft_adapter(pipe.text_encoder, CLIP_TARGETS, rank, alpha, seed + 1, std)
        kwargs |= {"text_encoder_lora_layers": te_sd, "text_encoder_lora_adapter_metadata": te_cfg.to_dict()}
    folder.mkdir(parents=True, exist_ok=True)
    FluxPipeline.save_lora_weights(str(folder), weight_name="lora.safetensors", **kwargs)
    return folder / "lora.safetensors"


def kohya_from_peft(peft_file: Path, out: Path, *, alpha_factor: float = 1.0, metadata: dict | None = None) -> Path:
    """Convert a diffusers SDXL LoRA to kohya/A1111 keys with ``diffusers.utils.convert_state_dict_to_kohya``.

    The converter writes ``alpha = rank`` (scale 1) and folds nothing; ``alpha_factor`` rescales the written
    alphas so tests exercise ``scale = alpha / rank`` (the PEFT scale is folded into ``lora_up`` to keep the
    same model, or not, as the caller decides).
    """
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import load_file

    sd = load_file(str(peft_file))
    kohya = convert_state_dict_to_kohya(sd)
    for key in list(kohya):
        if key.endswith(".alpha"):
            kohya[key] = (kohya[key].float() * alpha_factor).reshape(())
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(out), metadata=metadata or {})
    return out


LYCORIS_SDXL_PRESET = {
    "enable_conv": True,
    "unet_target_module": ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D", "TimestepEmbedding"],
    "unet_target_name": ["conv_in", "conv_out"],
    "text_encoder_target_module": ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"],
    "text_encoder_target_name": [],
}
LYCORIS_FLUX_PRESET = {
    "enable_conv": False,
    "unet_target_module": ["FluxTransformerBlock", "FluxSingleTransformerBlock"],
    "unet_target_name": [],
    "text_encoder_target_module": ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"],
    "text_encoder_target_name": [],
}


def lycoris_network(pipe, denoiser, out: Path, algo: str, seed: int, *, preset: dict, dim: int = 4,
                    alpha: float = 2.0, std: float = 0.1, metadata: dict | None = None, **kwargs):
    """Write a kohya-style LyCORIS file with ``lycoris.kohya.create_network`` and return (file, network).

    The network stays applied to ``pipe``'s modules, so running ``pipe`` gives lycoris' own output: the
    reference the studio is compared against. (lycoris' built-in "full" preset targets SDXL's
    ``time_embedding`` twice on diffusers UNets, so the tests pass an explicit preset.)
    """
    import lycoris.kohya as lk

    lk.PRESET["studio-tests"] = preset
    torch.manual_seed(seed)
    net = lk.create_network(1.0, dim, alpha, pipe.vae, [pipe.text_encoder, pipe.text_encoder_2], denoiser,
                            algo=algo, preset="studio-tests", **kwargs)
    net.apply_to([pipe.text_encoder, pipe.text_encoder_2], denoiser, apply_text_encoder=True, apply_unet=True)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in net.named_parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * std)
    out.parent.mkdir(parents=True, exist_ok=True)
    net.save_weights(str(out), torch.float32, metadata or {})
    return out, net


def write_state_dict(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata or {})
    return path


def file_size(path: Path) -> int:
    return os.path.getsize(path)


# The released QR-LoRA trainer's FLUX targets, matched by substring as its injection code does.
QR_RELEASED_FLUX_TARGETS = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj",
                            "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
                            "ff_context.net.0.proj", "ff_context.net.2"]


def qr_lora_released_layout(folder: Path, seed: int, *, family: str = "flux", rank: int = 4, std: float = 0.05,
                            base_noise: float = 0.0, targets=None, text_encoder: bool = False) -> Path:
    """A QR-LoRA file as the released QR-LoRA code (luna-ai-lab/QR-LoRA) writes it, re-implemented here from its
    description: per target linear, float32 SVD of the base weight, top-``rank`` part, ``torch.linalg.qr`` of it
    (alpha = rank, so no rescaling); keys ``<name>.lora.q.weight`` (Q), ``.lora.base_r.weight`` (R) and
    ``.lora.delta_r.weight`` (ΔR, random here: the "trained" part), saved through the pipeline's
    ``save_lora_weights`` (which adds the ``transformer.``/``unet.`` prefix). ``text_encoder`` adds a PEFT
    text-encoder LoRA, as the trainer saves with ``--train_text_encoder``. ``base_noise`` perturbs the base
    weights before the decomposition: a file made for another checkpoint.
    """
    from diffusers import FluxPipeline, StableDiffusionXLPipeline

    pipe = build_tiny_flux() if family == "flux" else build_tiny_sdxl()
    denoiser = pipe.transformer if family == "flux" else pipe.unet
    targets = targets or (QR_RELEASED_FLUX_TARGETS if family == "flux" else ["to_q", "to_k", "to_v", "to_out.0"])
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for name, module in denoiser.named_modules():
        if not isinstance(module, torch.nn.Linear) or not any(t in name for t in targets):
            continue
        w = module.weight.detach().float()
        if base_noise:
            w = w + base_noise * w.std() * torch.randn(w.shape, generator=gen)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        q, r = torch.linalg.qr(u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank], mode="reduced")
        layers[f"{name}.lora.q.weight"] = q[:, :rank].contiguous()
        layers[f"{name}.lora.base_r.weight"] = r[:rank].contiguous()
        layers[f"{name}.lora.delta_r.weight"] = (torch.randn(rank, w.shape[1], generator=gen) * std).contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    if family == "flux":
        kwargs = {"transformer_lora_layers": layers}
        if text_encoder:
            te_sd, _ = add_peft_adapter(pipe.text_encoder, CLIP_TARGETS, rank, rank, seed + 1, std)
            kwargs["text_encoder_lora_layers"] = te_sd
        FluxPipeline.save_lora_weights(str(folder), weight_name="qr.safetensors", **kwargs)
    else:
        StableDiffusionXLPipeline.save_lora_weights(str(folder), weight_name="qr.safetensors", unet_lora_layers=layers)
    return folder / "qr.safetensors"
