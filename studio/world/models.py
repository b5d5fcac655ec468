"""The tiny world's model architectures: the real diffusers/transformers classes at toy size.

* SDXL: ``UNet2DConditionModel`` with SDXL's block types and ``text_time`` conditioning on 16x16x4 latents, two
  CLIP text encoders (the second with projection, pooled into the added embedding), Euler. One level more than
  SDXL's three (16 -> 8 -> 4 -> 2): with three levels the model never learned the caption's position word (33%,
  chance), its convolutions being translation-equivariant with little border signal at 4x4; at 2x2 every pixel
  meets the zero padding differently. Its schedule is SDXL's scaled-linear betas rescaled to zero terminal SNR,
  v-prediction, trailing timesteps (Lin et al. 2024, *Common Diffusion Noise Schedules and Sample Steps Are
  Flawed*, Sec. 3): sampling starts from pure noise as training did, and the high-noise steps that decide the
  layout are not weighted away as ε-prediction weighs them (by the SNR).
* FLUX.1: ``FluxTransformer2DModel`` with dual- and single-stream blocks on the 8x8 grid of packed latents,
  CLIP (pooled) + T5 (sequence), guidance embedding (FLUX.1-dev layout), flow-matching Euler.

Both share the world's VAE (:mod:`.vae`) and the world's CLIP-scheme BPE tokenizer (:mod:`.tokenizer`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipelines.tiny import _eval

from . import tokenizer as world_tokenizer

TEXT_HIDDEN = 32
T5_MAX_LENGTH = 32  # tokens; the world's captions are short


def _clip_config(vocab: int, layers: int = 3):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab, hidden_size=TEXT_HIDDEN, intermediate_size=4 * TEXT_HIDDEN,
                          num_hidden_layers=layers, num_attention_heads=4, projection_dim=TEXT_HIDDEN,
                          hidden_act="gelu", max_position_embeddings=77, bos_token_id=vocab - 2,
                          eos_token_id=vocab - 1, pad_token_id=vocab - 1)


def world_sdxl(vae, tokenizer_dir: Path, seed: int = 0):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(48, 96, 96, 96),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=1, attention_head_dim=(3, 6, 6, 6), cross_attention_dim=2 * TEXT_HIDDEN,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + TEXT_HIDDEN, use_linear_projection=True, norm_num_groups=16,
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="trailing", steps_offset=1, num_train_timesteps=1000,
                                       rescale_betas_zero_snr=True, prediction_type="v_prediction")
    vocab = world_tokenizer.vocab_size(tokenizer_dir)
    return _eval(StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(_clip_config(vocab)),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(vocab)),
        tokenizer=world_tokenizer.clip_tokenizer(tokenizer_dir),
        tokenizer_2=world_tokenizer.clip_tokenizer(tokenizer_dir, pad_token="!"), unet=unet, scheduler=scheduler,
        add_watermarker=False,
    ))


def world_flux(vae, tokenizer_dir: Path, seed: int = 0):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=16,
        num_attention_heads=6, joint_attention_dim=TEXT_HIDDEN, pooled_projection_dim=TEXT_HIDDEN,
        axes_dims_rope=[4, 6, 6], guidance_embeds=True,
    )
    vocab = world_tokenizer.vocab_size(tokenizer_dir)
    t5 = T5EncoderModel(T5Config(vocab_size=vocab, d_model=TEXT_HIDDEN, d_kv=8, d_ff=4 * TEXT_HIDDEN, num_layers=3,
                                 num_heads=4, decoder_start_token_id=0, pad_token_id=vocab - 1,
                                 eos_token_id=vocab - 1, dropout_rate=0.0))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    tok = world_tokenizer.clip_tokenizer(tokenizer_dir)
    return _eval(FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=CLIPTextModel(_clip_config(vocab)),
                              tokenizer=tok, text_encoder_2=t5, tokenizer_2=tok, transformer=transformer))
