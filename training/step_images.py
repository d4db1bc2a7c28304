"""What the step-aware preference model sees at step t: the decoded DDIM x0 prediction of a noised image.

Used by the SPM trainer (to make its inputs), by `spo eval spm` and by benchmarks/spm_ceiling.py (to score the very
same inputs), so that training and evaluation cannot drift apart.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .conditioning import PromptBatch, cfg_eps, encode_prompts
from .latents import decode_to_unit
from .preference_data import PreferencePair
from .run import example_generator
from .spo import predicted_x0

if TYPE_CHECKING:

    from service.worker.pipeline import Pipeline


class StepImages:
    """Clean pair images -> the decoded DDIM x0 prediction at step t, as SPO's sampler will show them to the SPM.

    Works for SD 1.5 and SDXL pipelines (SDXL's pooled text embeddings and size ids go in `added_cond_kwargs`),
    and for epsilon, v and sample prediction. The VAE stays in float32 (SDXL's VAE overflows in float16).
    """

    def __init__(self, pipe: Pipeline, guidance: float = 5.0, cache_size: int = 4096) -> None:
        self.pipe, self.guidance, self.cache_size = pipe, guidance, cache_size
        self.vae, self.unet = pipe.vae, pipe.unet
        self.alphas = pipe.scheduler.alphas_cumprod.float()
        self.scaling = self.vae.config.scaling_factor
        self.shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        self._text: dict[str, tuple[Any, ...]] = {}  # cond, uncond, added_cond, added_uncond
        size = self.unet.config.sample_size
        self.latent_shape = (self.unet.config.in_channels, size, size)
        self.image_size = size * pipe.vae_scale_factor

    def prompt_batch(self, captions: list[str]) -> PromptBatch:
        """Conditioning of `captions` (cached per caption: the text encoders are frozen)."""
        missing = sorted({c for c in captions if c not in self._text})
        if len(self._text) + len(missing) > self.cache_size:
            self._text.clear()  # any eviction policy is correct; the cache only saves time
        if missing:
            pb = encode_prompts(self.pipe, missing)
            for i, caption in enumerate(missing):
                self._text[caption] = (pb.cond[i], pb.uncond[i], {k: v[i] for k, v in pb.added_cond.items()},
                                       {k: v[i] for k, v in pb.added_uncond.items()})
        rows = [self._text[c] for c in captions]
        keys = rows[0][2].keys()
        return PromptBatch(list(captions), torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]),
                           {k: torch.stack([r[2][k] for r in rows]) for k in keys},
                           {k: torch.stack([r[3][k] for r in rows]) for k in keys})

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, captions: list[str], t: torch.Tensor, noise: torch.Tensor
                 ) -> torch.Tensor:
        """images: [images_0; images_1] in [-1, 1], (k*B, 3, H, W); captions, t, noise: one per pair (B).

        Returns the decoded x0 predictions in [0, 1] (the SPM's input range), same layout, float32.
        """
        device = self.unet.device
        k = images.shape[0] // len(captions)
        latents = (self.vae.encode(images.to(device, self.vae.dtype)).latent_dist.mean.float() - self.shift)
        latents = latents * self.scaling
        t_all = t.to(device).repeat(k)
        a = self.alphas.to(device)[t_all].view(-1, 1, 1, 1)
        x_t = a.sqrt() * latents + (1 - a).sqrt() * noise.to(device).float().repeat(k, 1, 1, 1)
        pb = self.prompt_batch(list(captions) * k)
        pred = cfg_eps(self.unet, x_t, t_all, pb, torch.arange(len(pb.prompts), device=device), self.guidance)
        x0 = predicted_x0(self.pipe.scheduler, pred, t_all, x_t)
        return decode_to_unit(self.vae, x0)


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """HWC uint8 images -> a (N, 3, H, W) float batch in [-1, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def spm_inputs(pairs: list[PreferencePair], step_images: StepImages | None, t: torch.Tensor | None,
               noise: torch.Tensor | None, clean_images: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """What the SPM scores for a batch of pairs ([images_0; images_1] in [0, 1]) and at which t (one per pair).

    Step pairs (training/step_pairs.py) already are what SPO's sampler shows at their recorded step: as they are.
    `clean_images`: as they are at t = 0. Otherwise docs/spo.md §1's route: the same noise at the same t for both
    images, one UNet pass, the decoded x0 prediction.
    """
    images = to_tensor([q.image_0 for q in pairs] + [q.image_1 for q in pairs])
    recorded = [q.timestep for q in pairs]
    if any(r is not None for r in recorded):
        if clean_images or None in recorded:
            raise ValueError("step pairs (pairs with a timestep) are already previews at their step: they cannot be "
                             "mixed with clean-image pairs, nor trained with --clean-images")
        return (images + 1.0) / 2.0, torch.tensor(recorded, dtype=torch.long)
    if clean_images:
        return (images + 1.0) / 2.0, torch.zeros(len(pairs), dtype=torch.long)
    if step_images is None or t is None or noise is None:
        raise ValueError("noising clean-image pairs to t needs `step_images`, `t` and `noise`")
    return step_images(images, [q.caption for q in pairs], t, noise), t


def draw_t_and_noise(seed: int, step: int, indices: list[int], latent_shape: tuple[int, ...],
                     num_timesteps: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """A timestep and a noise latent per example, each from the example's own generator (`example_generator`)."""
    ts, noises = [], []
    for i in indices:
        g = example_generator(seed, step, i)
        ts.append(torch.randint(0, num_timesteps, (1,), generator=g))
        noises.append(torch.randn(latent_shape, generator=g))
    return torch.cat(ts), torch.stack(noises)

