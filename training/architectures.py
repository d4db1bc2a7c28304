"""Builders for the tiny Stable Diffusion (SD 1.5 and SDXL) architectures trained on the shapes world.

Same diffusers / transformers classes and config keys as the real checkpoints, only narrower, so every code path that
serves or fine-tunes SD 1.5 / SDXL runs unchanged on them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .presets import TinyWidths
from .shapes import IMAGE_SIZE, vocabulary
from .tokenizer import write_clip_tokenizer

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

TOKENIZER_MAX_LENGTH = 16  # a caption is 9 tokens with BOS/EOS; SD uses 77, which would only cost compute here


def sd_scheduler() -> DDIMScheduler:
    """The SD 1.5 noise schedule (scaled-linear betas, leading spacing, steps_offset 1) with DDIM sampling."""
    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
        timestep_spacing="leading",
    )


def build_vae(widths: TinyWidths = TinyWidths()) -> AutoencoderKL:
    n = len(widths.vae_channels)  # n-1 downsamplings: 4 blocks -> 8x, as in SD
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=IMAGE_SIZE,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=widths.vae_channels, layers_per_block=1, norm_num_groups=8, scaling_factor=1.0,
    )
    # Start the posterior nearly deterministic: with SD's tiny KL weight a unit-variance start never shrinks in a
    # short run and drowns the latent code in sampling noise.
    with torch.no_grad():
        conv = vae.encoder.conv_out
        conv.weight[4:].zero_()
        conv.bias[4:].fill_(-10.0)
    return vae


def write_tokenizer(out: Path) -> CLIPTokenizer:
    write_clip_tokenizer(out, vocabulary(), TOKENIZER_MAX_LENGTH)
    return CLIPTokenizer.from_pretrained(out)


def _text_config(tokenizer: CLIPTokenizer, hidden: int, layers: int, projection_dim: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 16), max_position_embeddings=TOKENIZER_MAX_LENGTH,
        projection_dim=projection_dim, hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def build_sd15_text_encoder(tokenizer: CLIPTokenizer, widths: TinyWidths = TinyWidths()) -> CLIPTextModel:
    return CLIPTextModel(_text_config(tokenizer, widths.text_hidden, widths.text_layers, widths.text_hidden))


def build_sd15_unet(widths: TinyWidths = TinyWidths()) -> UNet2DConditionModel:
    n = len(widths.unet_channels)
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 8, in_channels=4, out_channels=4, layers_per_block=widths.unet_layers_per_block,
        block_out_channels=widths.unet_channels, down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n, cross_attention_dim=widths.text_hidden, attention_head_dim=4,
        norm_num_groups=32,
    )


def build_sdxl_text_encoders(tokenizer: CLIPTokenizer, widths: TinyWidths = TinyWidths()
                             ) -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    """SDXL's pair: a CLIP-L-like encoder and a wider CLIP-bigG-like encoder with a text projection."""
    te1 = CLIPTextModel(_text_config(tokenizer, widths.text_hidden // 2, widths.text_layers, widths.text_hidden // 2))
    te2 = CLIPTextModelWithProjection(
        _text_config(tokenizer, widths.text_hidden, widths.text_layers, widths.text_hidden // 2))
    return te1, te2


def build_sdxl_unet(widths: TinyWidths = TinyWidths(), time_embed_dim: int = 8) -> UNet2DConditionModel:
    """SDXL's UNet layout (first level without attention, linear projections, `text_time` added conditioning)."""
    c = widths.unet_channels
    channels = (c[0] // 2, *c)
    cross = widths.text_hidden // 2 + widths.text_hidden  # concat of both encoders' penultimate hidden states
    pooled = widths.text_hidden // 2  # text_encoder_2 projection
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 8, in_channels=4, out_channels=4, layers_per_block=widths.unet_layers_per_block,
        block_out_channels=channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), cross_attention_dim=cross, attention_head_dim=4,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + pooled, norm_num_groups=16,
    )


# -- Real-size architectures (random weights): GPU benchmarks and architecture checks; nothing is downloaded. -------

SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, layers_per_block=2)
SDXL_UNET = dict(sample_size=128, cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
                 block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=2,
                 transformer_layers_per_block=(1, 2, 10), use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=2,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              block_out_channels=(128, 256, 512, 512), scaling_factor=0.18215)
CLIP_L_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")


def build_random_sd15_pipeline(tokenizer_dir: Path) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline with SD 1.5's exact architecture and random weights (77-token prompts)."""
    from diffusers import StableDiffusionPipeline

    write_clip_tokenizer(tokenizer_dir, vocabulary(), 77)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    text = CLIPTextConfig(**CLIP_L_TEXT, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    return StableDiffusionPipeline(vae=AutoencoderKL(**SD_VAE), text_encoder=CLIPTextModel(text), tokenizer=tokenizer,
                                   unet=UNet2DConditionModel(**SD15_UNET), scheduler=sd_scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
