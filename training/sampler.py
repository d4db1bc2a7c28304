"""SPO sampling: a multi-sample eta-DDIM loop with the step-wise resampler (docs/spo.md §2).

From `divert_start_step` on, every segment branches K candidates off one parent, lets each run `1 + inner_steps`
stochastic steps on its own, scores the candidates with the step-aware preference model, keeps the best/worst pair
when the preference is clear, and continues from ONE candidate picked uniformly at random (not the winner: continuing
from the winner or the loser collapses results, per the paper's ablation). SD 1.5 uses `inner_steps = 0` (a branch at
every step); SDXL uses 3 (branches at steps 4, 8, 12, 16).

The sampler knows nothing about models: it takes `eps_fn(x, t, prompt_index) -> noise prediction` (classifier-free
guidance applied inside) and a `Scorer`, `scorer(x0_latents, prompt_index, t) -> scores` (one with `scores_latents`
gets the candidates' noisy latents instead of their x0 previews).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .spo import compare, ddim_step, predicted_x0

if TYPE_CHECKING:
    from diffusers import SchedulerMixin

EpsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Scorer:
    """How the sampler judges candidates: `fn(x, prompt_index, t) -> scores`, one score per candidate.

    `x` is each candidate's predicted clean latent (x0) at the candidates' timestep `t`, or with `scores_latents` the
    candidate's noisy latent itself (a lookahead scorer finishes it before judging).
    """

    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    scores_latents: bool = False

    def __call__(self, x: torch.Tensor, prompt_index: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.fn(x, prompt_index, t)


@dataclass
class StepPairs:
    """Kept win/lose transitions. With `inner_steps = 0` both transitions start from the same parent."""

    x_t_win: torch.Tensor  # (P, C, H, W) parent of the winning transition
    x_t_lose: torch.Tensor  # (P, C, H, W) parent of the losing transition
    timestep: torch.Tensor  # (P,) the parents' timestep t
    x_prev_win: torch.Tensor  # (P, C, H, W) x_{t-1} on the winning side
    x_prev_lose: torch.Tensor
    prompt_index: torch.Tensor  # (P,) which prompt of the batch (its embedding lives with the caller)

    def __len__(self) -> int:
        return int(self.timestep.shape[0])

    @staticmethod
    def concat(parts: list[StepPairs]) -> StepPairs:
        if not parts:
            raise ValueError("no pairs")
        return StepPairs(*(torch.cat([getattr(p, f) for p in parts]) for f in StepPairs.__dataclass_fields__))


@dataclass
class SampleResult:
    pairs: StepPairs | None  # None when no comparison was clear enough
    final_latents: torch.Tensor  # (B, C, H, W) the resampled trajectory's end
    compared: int  # comparisons made (segments x batch)
    kept: int  # comparisons kept as pairs
    chosen: list[torch.Tensor]  # per segment: which candidate the resampler continued from, (B,)
    best: list[torch.Tensor]  # per segment: best candidate index, (B,)

    @property
    def keep_rate(self) -> float:
        return self.kept / max(self.compared, 1)


@torch.no_grad()
def spo_sample(
    scheduler: SchedulerMixin,
    eps_fn: EpsFn,
    scorer: Scorer,
    latents: torch.Tensor,
    *,
    num_steps: int = 20,
    num_candidates: int = 4,
    divert_start_step: int = 4,
    inner_steps: int = 0,
    threshold: float = 0.3,
    eta: float = 1.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
    continue_from: str = "random",
) -> SampleResult:
    """Sample a batch of trajectories from `latents` (x_T, already scaled by the scheduler's init sigma).

    `generator` may be one generator per prompt: then every random draw of a prompt's trajectory comes from its own
    generator, so results do not depend on how prompts are split across processes or batches. `continue_from`
    "winner" follows the best-scored candidate instead of a random one (the paper's ablation; the random pick is still
    drawn, so both settings see the same noise).
    """
    if continue_from not in ("random", "winner"):
        raise ValueError(f"continue_from must be 'random' or 'winner', got {continue_from!r}")
    if num_candidates < 2:
        raise ValueError("num_candidates must be >= 2 to form win/lose pairs")
    if not 0 <= divert_start_step < num_steps:
        raise ValueError(f"divert_start_step must be in [0, {num_steps}), got {divert_start_step}")
    scheduler.set_timesteps(num_steps, device=latents.device)
    timesteps = scheduler.timesteps
    b = latents.shape[0]
    k = num_candidates
    prompts = torch.arange(b, device=latents.device)
    x = latents
    eps = None  # the noise prediction for x at timesteps[i], when already computed
    pairs: list[StepPairs] = []
    chosen, bests = [], []
    compared = kept = 0

    i = 0
    while i < num_steps:
        t = timesteps[i]
        if eps is None:
            eps = eps_fn(x, t.expand(b), prompts)
        if i < divert_start_step:
            x = ddim_step(scheduler, eps, t, x, eta, noise=_randn(x, generator, prompts))
            eps = None
            i += 1
            continue

        # Branch: K candidates from the same parent and the same prediction, independent noise, then each runs on.
        seg = min(1 + inner_steps, num_steps - i)
        states = [x.unsqueeze(0).expand(k, *x.shape).reshape(k * b, *x.shape[1:])]
        cand_eps = eps.unsqueeze(0).expand(k, *eps.shape).reshape(k * b, *eps.shape[1:])
        cand_prompts = prompts.repeat(k)
        for s in range(seg):
            ts = timesteps[i + s]
            if s > 0:
                cand_eps = eps_fn(states[-1], ts.expand(k * b), cand_prompts)
            noise = _randn(states[-1], generator, cand_prompts)
            states.append(ddim_step(scheduler, cand_eps, ts, states[-1], eta, noise=noise))

        # Score each candidate as the SPM sees it at the candidates' own timestep.
        end = i + seg
        if end < num_steps:
            t_end = timesteps[end]
            next_eps = eps_fn(states[-1], t_end.expand(k * b), cand_prompts)
            x0 = predicted_x0(scheduler, next_eps, t_end, states[-1])
        else:
            t_end = torch.zeros((), dtype=timesteps.dtype, device=timesteps.device)
            next_eps = None
            x0 = states[-1]
        seen = states[-1] if scorer.scores_latents else x0  # a lookahead scorer finishes them
        scores = scorer(seen, cand_prompts, t_end.expand(k * b)).reshape(k, b)
        (best, worst), keep = compare(scores, threshold)
        compared += b
        kept += int(keep.sum())
        bests.append(best)

        if keep.any():
            rows = torch.nonzero(keep).flatten()
            view = [st.reshape(k, b, *x.shape[1:]) for st in states]
            for s in range(seg):
                pairs.append(StepPairs(
                    x_t_win=view[s][best[rows], rows], x_t_lose=view[s][worst[rows], rows],
                    timestep=timesteps[i + s].expand(len(rows)).clone(),
                    x_prev_win=view[s + 1][best[rows], rows], x_prev_lose=view[s + 1][worst[rows], rows],
                    prompt_index=rows.clone()))

        # The step-wise resampler: continue from a uniformly random candidate (or the ablation's winner), reusing its
        # prediction.
        pick = _randint(k, generator, prompts)
        if continue_from == "winner":
            pick = best
        chosen.append(pick)
        flat = pick * b + prompts
        x = states[-1][flat]
        eps = next_eps[flat] if next_eps is not None else None
        i = end

    return SampleResult(StepPairs.concat(pairs) if pairs else None, x, compared, kept, chosen, bests)


@torch.no_grad()
def ddim_lookahead(scheduler: SchedulerMixin, eps_fn: EpsFn, latents: torch.Tensor, timestep: int,
                   prompt_index: torch.Tensor, steps: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Finish noisy latents at `timestep` with `steps` deterministic DDIM steps on the even spacing
    t * (steps - i) // steps: a candidate's worth, measured rather than guessed (the lookahead oracle).

    Returns the finished latents and the x0 predicted at `timestep` (the preview SPO's scorer sees, from the same
    UNet call). At timestep 0 the latents are already final.
    """
    x = latents.float()
    t0 = int(timestep)
    alphas = scheduler.alphas_cumprod.double()
    preview = x
    for i in range(steps if t0 > 0 else 0):
        ti = t0 * (steps - i) // steps
        eps = eps_fn(x, torch.full((len(x),), ti, device=x.device), prompt_index)
        x0 = predicted_x0(scheduler, eps, ti, x)
        if i == 0:
            preview = x0
        t_next = t0 * (steps - i - 1) // steps
        x = x0 if t_next == 0 else (alphas[t_next].sqrt() * x0 + (1 - alphas[t_next]).sqrt() * eps).float()
    return x, preview


def _randn(like: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None,
           rows: torch.Tensor) -> torch.Tensor:
    """Standard normal noise shaped like `like`; with per-prompt generators, row r draws from generator[rows[r]]."""
    if not isinstance(generator, list):
        return torch.randn(like.shape, generator=generator, dtype=torch.float32).to(like.device)
    return torch.stack([torch.randn(like.shape[1:], generator=generator[int(r)], dtype=torch.float32)
                        for r in rows.tolist()]).to(like.device)


def _randint(k: int, generator: torch.Generator | list[torch.Generator] | None, rows: torch.Tensor) -> torch.Tensor:
    if not isinstance(generator, list):
        return torch.randint(k, (len(rows),), generator=generator).to(rows.device)
    return torch.tensor([int(torch.randint(k, (1,), generator=generator[int(r)])) for r in rows.tolist()],
                        device=rows.device)
