"""SPO's three primitives (docs/spo.md §2-§3): the eta-DDIM transition log-density, compare, and the SPO loss.

Kept free of models and trainers so each can be checked against hand-computed values.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from diffusers import SchedulerMixin


def previous_timestep(scheduler: SchedulerMixin, timestep: torch.Tensor) -> torch.Tensor:
    """The timestep the scheduler steps to after `timestep`, read from its own timestep list.

    Works for any spacing (leading, trailing, linspace); the reference's `t - 1000 // N` is right only for leading.
    -1 after the last step (the scheduler then uses its final alpha).
    """
    steps = scheduler.timesteps.to(timestep.device)
    if steps.numel() == 0:
        raise ValueError("call scheduler.set_timesteps(...) first")
    t = timestep.reshape(-1, 1).to(steps.dtype)
    match = t == steps.reshape(1, -1)
    if not bool(match.any(dim=1).all()):
        raise ValueError(f"timestep(s) {timestep.tolist()} not in the scheduler's timesteps")
    idx = match.float().argmax(dim=1)
    nxt = torch.cat([steps, steps.new_tensor([-1])])
    return nxt[idx + 1].reshape(timestep.shape)


def _alpha(scheduler: Any, t: torch.Tensor) -> torch.Tensor:
    alphas = scheduler.alphas_cumprod.to(device=t.device, dtype=torch.float64)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64, device=t.device)
    return torch.where(t >= 0, alphas[t.clamp(min=0).long()], final)


def _x0_and_eps(scheduler: Any, out: torch.Tensor, a_t: torch.Tensor,
                x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (x - (1 - a_t).sqrt() * out) / a_t.sqrt(), out
    if kind == "v_prediction":
        return a_t.sqrt() * x - (1 - a_t).sqrt() * out, a_t.sqrt() * out + (1 - a_t).sqrt() * x
    if kind == "sample":
        return out, (x - a_t.sqrt() * out) / (1 - a_t).sqrt()
    raise ValueError(f"unsupported prediction_type {kind!r}")


def predicted_x0(scheduler: SchedulerMixin, model_output: torch.Tensor, timestep: torch.Tensor | int,
                 sample: torch.Tensor) -> torch.Tensor:
    """DDIM's predicted clean latent from the noise prediction at `timestep` (what the SPM scores mid-sampling)."""
    t = torch.as_tensor(timestep, device=sample.device).long().reshape(-1).expand(sample.shape[0])
    a_t = _alpha(scheduler, t).reshape((sample.shape[0],) + (1,) * (sample.ndim - 1))
    return _x0_and_eps(scheduler, model_output.double(), a_t, sample.double())[0].to(sample.dtype)


def _ddim_mean_std(scheduler: Any, model_output: torch.Tensor, timestep: torch.Tensor | int, sample: torch.Tensor,
                   eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the eta-DDIM transition x_t -> x_prev, as `DDIMScheduler.step` computes them but with the
    previous timestep read from the scheduler's list (diffusers' DDIM uses `t - 1000 // N` too)."""
    b = sample.shape[0]
    t = torch.as_tensor(timestep, device=sample.device).long().reshape(-1).expand(b)
    prev_t = previous_timestep(scheduler, t)
    shape = (b,) + (1,) * (sample.ndim - 1)
    a_t = _alpha(scheduler, t).reshape(shape)
    a_prev = _alpha(scheduler, prev_t).reshape(shape)
    x0, eps = _x0_and_eps(scheduler, model_output.double(), a_t, sample.double())
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * variance.sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).clamp(min=0).sqrt() * eps
    return mean.float(), std.float()


def ddim_step(scheduler: SchedulerMixin, model_output: torch.Tensor, timestep: torch.Tensor | int,
              sample: torch.Tensor, eta: float, generator: torch.Generator | None = None,
              noise: torch.Tensor | None = None) -> torch.Tensor:
    """One stochastic eta-DDIM step; the exact transition whose density `ddim_step_log_prob` measures."""
    mean, std = _ddim_mean_std(scheduler, model_output, timestep, sample, eta)
    if noise is None:
        noise = torch.randn(sample.shape, generator=generator, device=sample.device, dtype=torch.float32)
    return (mean + std * noise.float()).to(sample.dtype)


def ddim_step_log_prob(scheduler: SchedulerMixin, model_output: torch.Tensor, timestep: torch.Tensor | int,
                       sample: torch.Tensor, prev_sample: torch.Tensor, eta: float) -> torch.Tensor:
    """log p(prev_sample | sample) under the eta-DDIM step with `model_output`, averaged over non-batch dims.

    The average over latent elements follows the reference implementation: it keeps policy/reference ratios near 1
    and fixes the effective scale of beta. Arithmetic is fp32 (fp64 for the alphas) whatever the models ran in.
    """
    if eta <= 0:
        raise ValueError("eta must be > 0: the DDIM transition is deterministic at eta = 0 and has no density")
    mean, std = _ddim_mean_std(scheduler, model_output, timestep, sample, eta)
    log_prob = -((prev_sample.float() - mean) ** 2) / (2 * std**2) - std.log() - 0.5 * math.log(2 * math.pi)
    return log_prob.mean(dim=tuple(range(1, sample.ndim)))


def compare(scores: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """From K candidates' preference scores (K, B): best and worst indices (2, B) and which pairs to keep (B,).

    A pair is kept when softmax over (best, worst) separates them by more than `threshold`: near-ties are noise.
    """
    if scores.ndim != 2 or scores.shape[0] < 2:
        raise ValueError(f"scores must be (K >= 2, B), got {tuple(scores.shape)}")
    best = scores.argmax(dim=0)
    worst = scores.argmin(dim=0)
    pair = torch.stack([scores.gather(0, best[None])[0], scores.gather(0, worst[None])[0]])
    prob = pair.float().softmax(dim=0)
    keep = (prob[0] - prob[1]) > threshold
    return torch.stack([best, worst]), keep


def spo_loss(logp_win: torch.Tensor, logp_ref_win: torch.Tensor, logp_lose: torch.Tensor,
             logp_ref_lose: torch.Tensor, beta: float, eps: float, reduction: str = "mean") -> torch.Tensor:
    """-log sigmoid(beta * (log r_win - log r_lose)) with policy/reference ratios clamped to [1 - eps, 1 + eps]."""
    ratio_win = torch.exp(logp_win - logp_ref_win).clamp(1 - eps, 1 + eps)
    ratio_lose = torch.exp(logp_lose - logp_ref_lose).clamp(1 - eps, 1 + eps)
    losses = -F.logsigmoid(beta * (ratio_win.log() - ratio_lose.log()))
    if reduction == "mean":
        return losses.mean()
    if reduction == "none":
        return losses
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
