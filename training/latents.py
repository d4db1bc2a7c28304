"""Latents to images: the one place that undoes the VAE's scaling (and shift) and decodes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from diffusers import AutoencoderKL


def decode_to_unit(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images in [0, 1], (N, 3, H, W), float32 (what the preference models and rater take)."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    images = vae.decode((latents / vae.config.scaling_factor + shift).to(vae.dtype)).sample
    return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def decode_to_uint8(vae: AutoencoderKL, latents: torch.Tensor) -> np.ndarray:
    """Scaled latents -> uint8 RGB images (N, H, W, 3), what the rater reads."""
    with torch.no_grad():
        images = decode_to_unit(vae, latents).permute(0, 2, 3, 1).cpu().numpy()
    return (images * 255).round().astype(np.uint8)
