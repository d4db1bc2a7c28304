"""Text conditioning exactly as diffusers pipelines compute it, and the classifier-free-guidance UNet call.

Shared by base training, SPM training (x0 predictions shown to the preference model) and SPO (sampling and the
loss), so all three see the model as the served pipeline does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from diffusers import StableDiffusionXLPipeline

if TYPE_CHECKING:

    from service.worker.pipeline import Pipeline


def condition(pipe: Pipeline, captions: list[str]) -> tuple[torch.Tensor, dict]:
    """Text conditioning exactly as the diffusers pipeline computes it at inference (with gradients)."""
    if isinstance(pipe, StableDiffusionXLPipeline):
        embeds, _, pooled, _ = pipe.encode_prompt(captions, device=pipe.device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        size = (pipe.unet.config.sample_size * pipe.vae_scale_factor,) * 2
        time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=embeds.dtype,
                                          text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
        return embeds, {"text_embeds": pooled, "time_ids": time_ids.repeat(len(captions), 1)}
    embeds, _ = pipe.encode_prompt(captions, device=pipe.device, num_images_per_prompt=1,
                                   do_classifier_free_guidance=False)
    return embeds, {}


@dataclass
class PromptBatch:
    """Conditioning for a batch of prompts, with the unconditional branch for classifier-free guidance."""

    prompts: list[str]
    cond: torch.Tensor
    uncond: torch.Tensor
    added_cond: dict
    added_uncond: dict

    def select(self, index: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Embeddings for rows `index`, stacked [uncond; cond] as the CFG UNet call expects."""
        emb = torch.cat([self.uncond[index], self.cond[index]])
        added = {k: torch.cat([self.added_uncond[k][index], self.added_cond[k][index]]) for k in self.added_cond}
        return emb, added


@torch.no_grad()
def encode_prompts(pipe: Pipeline, prompts: list[str]) -> PromptBatch:
    cond, added_c = condition(pipe, prompts)
    uncond, added_u = condition(pipe, [""] * len(prompts))
    if getattr(pipe.config, "force_zeros_for_empty_prompt", False):  # real SDXL: zeros are its unconditional input
        uncond = torch.zeros_like(uncond)
        added_u = {**added_u, "text_embeds": torch.zeros_like(added_u["text_embeds"])}
    return PromptBatch(prompts, cond, uncond, added_c, added_u)


def cfg_eps(unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, batch: PromptBatch, index: torch.Tensor,
            guidance: float) -> torch.Tensor:
    """Noise prediction with classifier-free guidance, in one UNet call of twice the batch."""
    emb, added = batch.select(index)
    dtype = next(unet.parameters()).dtype  # not `unet.dtype`: a DDP-wrapped UNet (several processes) has none
    x_in = torch.cat([x, x]).to(dtype)
    t_in = torch.cat([t, t]) if t.ndim else t
    out = unet(x_in, t_in, encoder_hidden_states=emb.to(dtype), added_cond_kwargs=added or None).sample
    uncond, cond = out.float().chunk(2)
    return uncond + guidance * (cond - uncond)
