"""The scorers SPO's sampler can judge candidates with (`Scorer`s): the step-aware preference model, and two
ablations built on the shapes-world rater.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .conditioning import cfg_eps, encode_prompts
from .latents import decode_to_uint8, decode_to_unit
from .rater import rate
from .sampler import Scorer, ddim_lookahead

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from service.worker.pipeline import Pipeline

    from .spm import StepAwarePreferenceModel


def spm_scorer(vae: AutoencoderKL, spm: StepAwarePreferenceModel, prompts: list[str], batch: int = 64) -> Scorer:
    """Decode each candidate's predicted x0 and score it with the step-aware preference model at its timestep."""

    @torch.no_grad()
    def score(x0: torch.Tensor, prompt_index: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, len(x0), batch):
            images = decode_to_unit(vae, x0[i:i + batch])
            texts = [prompts[j] for j in prompt_index[i:i + batch].tolist()]
            out.append(spm.score(images, texts, t[i:i + batch]).float())
        return torch.cat(out)

    return Scorer(score)


def rater_scorer(vae: AutoencoderKL, prompts: list[str], scale: float = 20.0) -> Scorer:
    """Ablation / testing: the shapes-world rater on decoded x0 (a step-unaware scorer), scaled to logit units."""

    @torch.no_grad()
    def score(x0: torch.Tensor, prompt_index: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        images = decode_to_uint8(vae, x0)
        return torch.tensor([scale * rate(img, prompts[j]).total for img, j in zip(images, prompt_index.tolist(),
                                                                                  strict=True)])

    return Scorer(score)


def lookahead_rater_scorer(pipe: Pipeline, unet: UNet2DConditionModel | torch.nn.Module, prompts: list[str],
                           guidance: float, steps: int = 4, scale: float = 100.0) -> Scorer:
    """Oracle ablation: a candidate's worth measured, not guessed. Each candidate latent is finished with a short
    deterministic DDIM run (eta = 0, `steps` UNet calls, the current policy) and the rater scores the final image.

    Not a preference model: it separates "the SPO loop cannot improve this model" from "the scorer is blind"
    (benchmarks/step_signal.py shows the rater on x0 previews is blind before the last steps). Costs `steps` extra
    UNet calls per comparison. The sampler passes it the candidates' noisy latents, not their x0 previews.
    """
    batch = encode_prompts(pipe, prompts)
    rate_final = rater_scorer(pipe.vae, prompts, scale)

    def eps_fn(x: torch.Tensor, t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return cfg_eps(unet, x, t, batch, idx, guidance)

    @torch.no_grad()
    def score(latents: torch.Tensor, prompt_index: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        final, _ = ddim_lookahead(pipe.scheduler, eps_fn, latents, int(t.reshape(-1)[0]), prompt_index, steps)
        return rate_final(final, prompt_index, t)

    return Scorer(score, scores_latents=True)
