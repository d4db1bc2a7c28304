"""Step-wise preference pairs: two candidates branched off one parent mid-sampling, labelled by their finished images.

The paper's step-aware preference model learns from final-image pairs noised to step t, assuming a pair's
preference survives the same noise (docs/spo.md §1). On spo-tiny that assumption fails: within a pair the preference is
decided after t = 251 (`benchmarks/spm_ceiling.py`), so those inputs carry almost nothing at the steps where SPO's
sampler compares candidates. These pairs ask the step-aware model the question SPO asks it, on the inputs SPO shows
it. A trajectory is sampled as SPO's sampler does (DDIM 20 steps, eta 1, CFG 5); at each of its branch steps two
candidates x_{t-1} leave the trajectory's state with independent noise. Each candidate is stored as the sampler's
scorer sees it (the decoded DDIM x0 prediction at the candidates' timestep, or the image itself after the last
step), with that timestep in the `timestep` column, and labelled by the rater on its finished image with the
Bradley-Terry noise of `spo data pairs`.

A candidate is finished as the lookahead oracle finishes it (`training.sampler.ddim_lookahead`: 4 deterministic DDIM
steps), so its label is a function of what the SPM sees: this data distils the oracle scorer with which SPO improved
spo-tiny into a step-aware model. The pairs are ordinary Pick-a-Pic-format records; `spo train spm` scores a pair
that carries a timestep as it is, at that timestep, instead of noising it (docs/spo.md §1's route).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from .conditioning import cfg_eps, encode_prompts
from .latents import decode_to_uint8
from .preference_data import SPLITS, GeneratedPair, PairPlan, write_shards
from .rater import rate
from .sampler import ddim_lookahead
from .shapes import caption_for
from .spo import ddim_step

if TYPE_CHECKING:

    from service.worker.pipeline import Pipeline

NUM_STEPS = 20  # SPO's sampler: DDIM 20 steps, eta 1, CFG 5 (docs/spo.md §2)
GUIDANCE = 5.0
FIRST_BRANCH_STEP = 4  # the sampler's divert_start_step: t = 751 with 20 leading-spaced steps
LOOKAHEAD_STEPS = 4  # as the oracle scorer


def plan_step_pairs(n: int, seed: int = 0, split: str = "train", first_step: int = FIRST_BRANCH_STEP,
                    num_steps: int = NUM_STEPS) -> list[PairPlan]:
    """`n` pairs, one per branch step of consecutive trajectories: prompt and trajectory seed (`seed_0`) per
    trajectory; branch-noise seed (`seed_1`), label draw and branch step per pair."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    if not 0 <= first_step < num_steps:
        raise ValueError(f"first branch step must be in [0, {num_steps}), got {first_step}")
    rng = random.Random(f"step-pairs-{seed}-{split}")
    plans: list[PairPlan] = []
    while len(plans) < n:
        caption, seed_0 = caption_for(*rng.choice(SPLITS[split])), rng.randrange(100_000, 2**31 - 1)
        for step in range(first_step, num_steps):
            if len(plans) < n:
                plans.append(PairPlan(len(plans), caption, seed_0, rng.randrange(100_000, 2**31 - 1), rng.random(),
                                      GUIDANCE, GUIDANCE, num_steps, num_steps, branch_step=step))
    return plans


@torch.no_grad()
def _trajectories(pipe: Pipeline, plans: list[PairPlan]) -> list[GeneratedPair]:
    """The pairs of a batch of trajectories (plans grouped by `seed_0`). Every draw comes from the trajectory's or the
    pair's own seed, so a pair does not depend on its batch."""
    unet, scheduler = pipe.unet, pipe.scheduler
    num_steps, guidance = plans[0].steps_0, plans[0].guidance_0
    scheduler.set_timesteps(num_steps, device=unet.device)
    ts = scheduler.timesteps
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    seeds = list(dict.fromkeys(p.seed_0 for p in plans))
    captions = [next(p.caption for p in plans if p.seed_0 == s) for s in seeds]
    trajectory = [torch.Generator().manual_seed(s) for s in seeds]
    pb = encode_prompts(pipe, captions)

    def noise(generators: list[torch.Generator]) -> torch.Tensor:
        return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(unet.device)

    def eps_fn(x: torch.Tensor, t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return cfg_eps(unet, x, t, pb, rows, guidance)

    rows = torch.arange(len(seeds), device=unet.device)
    x = noise(trajectory) * scheduler.init_noise_sigma
    made: list[GeneratedPair] = []
    for i in range(num_steps):
        eps = eps_fn(x, ts[i].expand(len(seeds)), rows)
        here = [p for p in plans if p.branch_step == i]
        if here:  # two candidates per pair from the trajectory's state and prediction, then finished by lookahead
            sub = torch.tensor([seeds.index(p.seed_0) for p in here], device=unet.device)
            branch = [torch.Generator().manual_seed(p.seed_1) for p in here]
            candidates = torch.cat([ddim_step(scheduler, eps[sub], ts[i], x[sub], 1.0, noise=noise(branch)),
                                    ddim_step(scheduler, eps[sub], ts[i], x[sub], 1.0, noise=noise(branch))])
            seen_t = int(ts[i + 1]) if i + 1 < num_steps else 0
            final, preview = ddim_lookahead(scheduler, eps_fn, candidates, seen_t, sub.repeat(2), LOOKAHEAD_STEPS)
            seen, done = decode_to_uint8(pipe.vae, preview), decode_to_uint8(pipe.vae, final)
            k = len(here)
            made += [GeneratedPair(p, seen[j], seen[k + j], rate(done[j], p.caption).total,
                                   rate(done[k + j], p.caption).total, timestep=seen_t) for j, p in enumerate(here)]
        x = ddim_step(scheduler, eps, ts[i], x, 1.0, noise=noise(trajectory))  # the trajectory goes on
    return made


def generate_step_pairs(pipe: Pipeline, plans: list[PairPlan], *, batch: int = 32,
                        progress: bool = True) -> Iterator[GeneratedPair]:
    """The planned step pairs, rated, in plan order; `batch` trajectories per run."""
    bar = tqdm(total=len(plans), desc="step pairs", unit="pair", dynamic_ncols=True, disable=not progress)
    seeds = list(dict.fromkeys(p.seed_0 for p in plans))
    for start in range(0, len(seeds), batch):
        group = set(seeds[start:start + batch])
        chunk = [p for p in plans if p.seed_0 in group]
        made = {g.plan.index: g for g in _trajectories(pipe, chunk)}
        for p in chunk:
            yield made[p.index]
            bar.update(1)
    bar.close()


def write_step_pairs(model: Path | str, out: Path | str, n: int, *, temperature: float = 0.005, seed: int = 0,
                     split: str = "train", tie_rate: float = 0.0, first_step: int = FIRST_BRANCH_STEP,
                     batch: int = 32, shard_size: int = 4096, row_group_size: int = 256,
                     device: str = "cpu") -> dict:
    """`n` step pairs from a diffusers model into parquet shards at `out` (resumable like `write_pairs`)."""
    from service.worker.pipeline import load_pipeline

    pipe = None

    def make(plans: list[PairPlan]) -> Iterator[GeneratedPair]:
        nonlocal pipe
        if pipe is None:
            pipe = load_pipeline(str(model), device=device)
        return generate_step_pairs(pipe, plans, batch=batch, progress=False)

    plans = plan_step_pairs(n, seed, split, first_step)
    summary = write_shards(out, plans, make, model_name=Path(model).name, temperature=temperature,
                           tie_rate=tie_rate, shard_size=shard_size, row_group_size=row_group_size,
                           record=dict(model=str(model), split=split, seed=seed, kind="step pairs",
                                       first_branch_step=first_step, num_steps=NUM_STEPS, guidance=GUIDANCE))
    return summary


def timestep_buckets(timesteps: np.ndarray, split_at: int = 551) -> dict[str, np.ndarray]:
    """Masks over step pairs: all, early (t >= `split_at`: where a choice between siblings still changes the final
    image, benchmarks/step_signal.py) and late."""
    return {"all": np.ones(len(timesteps), bool), "early": timesteps >= split_at, "late": timesteps < split_at}
