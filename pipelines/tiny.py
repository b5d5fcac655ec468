"""Tiny SDXL- and FLUX-architecture pipelines, built offline from configs with seeded random weights.

They use the same diffusers and transformers classes as the real models (``UNet2DConditionModel`` with SDXL's
``text_time`` conditioning and three down blocks, ``FluxTransformer2DModel`` with dual- and single-stream
blocks, two CLIP text encoders or CLIP + T5), so the stock pipelines, every LoRA format and every strategy run
on them exactly as on the real ones, in well under a second per image on a CPU. The tokenizer is the real CLIP
BPE tokenizer, written from the vocabulary that ``open_clip`` ships (no download).

Random weights make images that are noise-like but deterministic; they are the offline default until trained
tiny models ship in ``assets/``.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

TINY_SEED = 0
TINY_IMAGE_SIZE = 64


@lru_cache(maxsize=1)
def clip_tokenizer_files() -> Path:
    """Write ``vocab.json`` and ``merges.txt`` of the CLIP BPE tokenizer from open_clip's shipped vocabulary."""
    from open_clip.tokenizer import SimpleTokenizer, default_bpe

    encoder = dict(SimpleTokenizer().encoder)
    # open_clip names the special tokens differently from the Hugging Face CLIP tokenizer; the ids match.
    encoder["<|startoftext|>"] = encoder.pop("<start_of_text>")
    encoder["<|endoftext|>"] = encoder.pop("<end_of_text>")
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    folder = Path(tempfile.mkdtemp(prefix="studio-clip-tokenizer-"))
    (folder / "vocab.json").write_text(json.dumps(encoder), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    from transformers import CLIPTokenizer

    folder = clip_tokenizer_files()
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77, pad_token=pad_token
    )


def _clip_config(projection_dim: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=projection_dim,
        hidden_act="gelu",
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def _tiny_vae(**extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=TINY_IMAGE_SIZE,
        **extra,
    )


def _eval(pipe):
    """Freshly constructed modules are in training mode (dropout on); from_pretrained ones are not."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def build_tiny_sdxl(seed: int = TINY_SEED):
    """A ``StableDiffusionXLPipeline`` with SDXL's block layout at toy width (about 1.7 M UNet parameters)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=TINY_IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 1),
        attention_head_dim=(2, 4, 4),
        cross_attention_dim=64,  # te1 hidden (32) + te2 hidden (32), as SDXL's 768 + 1280
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 32,  # six time ids + pooled te2 embedding
        use_linear_projection=True,
        norm_num_groups=16,
    )
    vae = _tiny_vae()
    text_encoder = CLIPTextModel(_clip_config())
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config())
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
    return _eval(StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(pad_token="!"),
        unet=unet,
        scheduler=scheduler,
    ))


def build_tiny_flux(seed: int = TINY_SEED):
    """A ``FluxPipeline`` (guidance-distilled like FLUX.1-dev) with 2 dual- and 2 single-stream blocks.

    FLUX's T5 slot holds a tiny ``T5EncoderModel`` driven by the CLIP tokenizer (its vocabulary is sized to
    match): the pipeline only needs token ids, and no T5 sentencepiece model can be fetched offline.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels packed 2x2
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=True,
    )
    vae = _tiny_vae(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    text_encoder = CLIPTextModel(_clip_config())
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=49408,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            pad_token_id=49407,
            eos_token_id=49407,
            dropout_rate=0.0,
        )
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return _eval(FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tokenizer(),
        transformer=transformer,
    ))


def build_tiny_flux_fill(seed: int = TINY_SEED):
    """A ``FluxFillPipeline`` like FLUX.1-Fill-dev at toy size: the tiny FLUX components around a transformer
    whose input also takes the masked image's latents and the packed mask (16 + 16 + 4·2·2 = 48 channels)."""
    from diffusers import FluxFillPipeline, FluxTransformer2DModel

    components = build_tiny_flux(seed).components
    torch.manual_seed(seed + 1)
    components["transformer"] = FluxTransformer2DModel(
        patch_size=1, in_channels=48, out_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        guidance_embeds=True,
    )
    return _eval(FluxFillPipeline(**{k: v for k, v in components.items() if k not in ("image_encoder",
                                                                                     "feature_extractor")}))


def _randomize_zero_layers(model, modules, seed: int, std: float = 0.05) -> None:
    """A freshly made ControlNet adds nothing (its output layers start at zero, by design); tests need one that
    does, so these layers get seeded random weights."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for parameter in module.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    model.eval()


def build_tiny_sdxl_controlnet(unet, seed: int = 1):
    """A ``ControlNetModel`` for the tiny SDXL UNet (diffusers' ``from_unet``: the UNet's encoder weights), with
    a conditioning embedding that downsamples by the tiny VAE's factor 2 and seeded non-zero output layers."""
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    _randomize_zero_layers(controlnet, [controlnet.controlnet_cond_embedding.conv_out, *controlnet.controlnet_down_blocks,
                                        controlnet.controlnet_mid_block], seed)
    return controlnet


def build_tiny_flux_controlnet(transformer, seed: int = 1):
    """A ``FluxControlNetModel`` for the tiny FLUX transformer (``from_transformer``: one dual- and one
    single-stream block with the transformer's weights), seeded non-zero output layers."""
    from diffusers import FluxControlNetModel

    config = transformer.config
    controlnet = FluxControlNetModel.from_transformer(transformer, num_layers=1, num_single_layers=1,
                                                      attention_head_dim=config.attention_head_dim,
                                                      num_attention_heads=config.num_attention_heads)
    _randomize_zero_layers(controlnet, [controlnet.controlnet_x_embedder, *controlnet.controlnet_blocks,
                                        *controlnet.controlnet_single_blocks], seed)
    return controlnet


# "tiny-sdxl"/"tiny-flux" load the trained world models from the shipped assets (pipelines.assets; missing files
# are an error); the "-random" names always give these seeded random models (tests use them).
TINY_BUILDERS = {"tiny-sdxl": build_tiny_sdxl, "tiny-flux": build_tiny_flux,
                 "tiny-sdxl-random": build_tiny_sdxl, "tiny-flux-random": build_tiny_flux}
