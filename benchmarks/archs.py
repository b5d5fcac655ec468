"""Benchmark architectures: the published SDXL and FLUX.1 configs at full width or narrowed.

``width_divisor=1`` is the real architecture (use it on a GPU); larger divisors keep every block, layer and
LoRA-targetable module of the real model (so LoRA files have the real key counts) at a fraction of the width,
which makes CPU measurements of loading and switching meaningful. Weights are random and seeded.
"""

from __future__ import annotations

import torch

from pipelines.tiny import _eval, clip_tokenizer


def sdxl(width_divisor: int = 8, seed: int = 0, dtype=torch.float32):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    d = width_divisor
    torch.manual_seed(seed)
    te1_hidden, te2_hidden = 768 // d, 1280 // d
    unet = UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320 // d, 640 // d, 1280 // d),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
        cross_attention_dim=te1_hidden + te2_hidden, addition_embed_type="text_time",
        addition_time_embed_dim=256 // d, projection_class_embeddings_input_dim=6 * (256 // d) + te2_hidden,
        use_linear_projection=True, norm_num_groups=32 if d == 1 else 8,
    )

    def clip(hidden, layers, heads, projection=None):
        config = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=4 * hidden,
                                num_hidden_layers=layers, num_attention_heads=heads,
                                projection_dim=projection or hidden, hidden_act="gelu", max_position_embeddings=77)
        return config

    te1 = CLIPTextModel(clip(te1_hidden, 12, 12))
    te2 = CLIPTextModelWithProjection(clip(te2_hidden, 32, 20))
    vae = AutoencoderKL(block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=clip_tokenizer(),
                                     tokenizer_2=clip_tokenizer(pad_token="!"), unet=unet, scheduler=scheduler)
    return _eval(pipe).to(dtype=dtype)


def flux(width_divisor: int = 8, seed: int = 0, dtype=torch.float32):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    d = width_divisor
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128 // d,
        num_attention_heads=24, joint_attention_dim=4096 // d, pooled_projection_dim=768 // d,
        guidance_embeds=True, axes_dims_rope=(16, 56, 56) if d == 1 else (128 // d - 2 * (2 * ((128 // d) // 8)), 2 * ((128 // d) // 8), 2 * ((128 // d) // 8)),
    )
    te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768 // d, intermediate_size=3072 // d,
                                      num_hidden_layers=12, num_attention_heads=12, projection_dim=768 // d,
                                      max_position_embeddings=77))
    t5 = T5EncoderModel(T5Config(vocab_size=49408, d_model=4096 // d, d_kv=64, d_ff=10240 // d, num_layers=2,
                                 num_heads=8, dropout_rate=0.0))
    vae = AutoencoderKL(block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, norm_num_groups=8,
                        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159,
                        scaling_factor=0.3611)  # FLUX.1's VAE latent statistics (FluxPipeline needs both)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=te, tokenizer=clip_tokenizer(),
                        text_encoder_2=t5, tokenizer_2=clip_tokenizer(), transformer=transformer)
    return _eval(pipe).to(dtype=dtype)
