"""SPO fine-tuning (docs/spo.md §2-§4): setup, the loop, outputs.

Each iteration: (1) sample a batch of prompts with the step-wise resampler using the current policy, (2) the
step-aware preference model scores candidates mid-trajectory and `compare` keeps clear win/lose pairs, (3) a fixed
number of optimizer steps on those pairs with the SPO loss, the reference being the same UNet with its LoRA adapter
disabled. The reference implementation's defects (docs/spo.md §4) are fixed here: clipping really clips, the previous
timestep comes from the scheduler's list, log-probs are fp32, no UNet copy for the reference, every process saves its
state, any fine-tune type saves, a fixed number of optimizer steps per batch, seeds independent of world size.

Checkpoints: OUT/checkpoints/step-N/, N counting batches (SPO iterations), not optimizer steps.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .conditioning import PromptBatch, cfg_eps, encode_prompts
from .evaluate import heldout_rating
from .lora import add_lora, reference_model, save_result, save_snapshot
from .presets import SPO_PRESETS, SPOPreset
from .rater import RATER_VERSION
from .run import (
    CHECKPOINTS,
    TimeBudget,
    agreed,
    append_record,
    checkpoints,
    make_accelerator,
    prompt_generators,
    prompt_order,
    refuse_foreign_checkpoints,
    refuse_old_spo_layout,
    resume_state,
    save_checkpoint,
    trim_log,
    weight_dtype,
)
from .sampler import SampleResult, Scorer, StepPairs, spo_sample
from .scorers import lookahead_rater_scorer, rater_scorer, spm_scorer
from .shapes import TRAIN_COMBOS, caption_for
from .spo import ddim_step_log_prob, spo_loss

if TYPE_CHECKING:
    from accelerate import Accelerator
    from diffusers import SchedulerMixin, UNet2DConditionModel

    from service.worker.pipeline import Pipeline

KEEP_CHECKPOINTS = 1  # SPO checkpoints hold the whole UNet's state (a full fine-tune: GBs); one is enough
SCORERS = ("spm", "rater", "lookahead")


# ------------------------------------------------------------------------------------------------------------ setup


@dataclass
class SPORun:
    """The models and optimizer of one run, and what carries over between batches."""

    accelerator: Accelerator
    pipe: Pipeline
    unet: torch.nn.Module  # the policy as `accelerator.prepare` returned it
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    ref_unet: UNet2DConditionModel | None  # a frozen copy for a full fine-tune; None: the LoRA-disabled UNet
    latent_shape: tuple[int, ...]
    last_pairs: tuple[StepPairs, PromptBatch] | None = None  # trained on again when a batch keeps no pair


def setup_models(p: SPOPreset, base: Path, seed: int, full_unet: bool, vae: str | None = None) -> SPORun:
    """The base pipeline, frozen in half precision on GPU, with a LoRA (or the whole UNet) to train.

    `vae` replaces the pipeline's VAE (folder or hub id): an SDXL base sampled in fp16 needs the fp16-fix VAE, or its
    previews (what the SPM scores) overflow; `p.vae_fp32` keeps the VAE in fp32 instead.
    """
    from accelerate.utils import set_seed

    from service.worker.pipeline import load_pipeline

    accelerator = make_accelerator(p.mixed_precision)  # accumulation is train_on_pairs' own (all kept pairs)
    set_seed(seed)  # the same on every process: sampling noise is per prompt, not per device
    dtype = weight_dtype(accelerator)
    pipe = load_pipeline(str(base), vae=vae, device=accelerator.device)
    pipe.vae.to(dtype=torch.float32 if p.vae_fp32 else dtype)
    for enc in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if enc is not None:
            enc.requires_grad_(False).to(dtype=dtype)
    unet = pipe.unet
    ref_unet = None
    if full_unet:
        ref_unet = copy.deepcopy(unet).requires_grad_(False).to(dtype=dtype)
        unet.requires_grad_(True)
    else:
        add_lora(unet, p.lora_rank, p.lora_targets, dtype)
    if p.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = [q for q in unet.parameters() if q.requires_grad]  # a list: clipping must see them after the optimizer
    optimizer = torch.optim.AdamW(params, lr=p.lr, betas=p.adam_betas, weight_decay=p.weight_decay, eps=p.adam_eps)
    prepared, optimizer = accelerator.prepare(unet, optimizer)
    size = unet.config.sample_size
    return SPORun(accelerator, pipe, prepared, optimizer, params, ref_unet, (unet.config.in_channels, size, size))


def scorer_for_prompts(kind: str, spm: Path | None, run: SPORun, guidance: float) -> Callable[[list[str]], Scorer]:
    """prompts -> the `Scorer` the sampler judges that batch's candidates with."""
    if kind == "spm":
        from .spm import StepAwarePreferenceModel

        assert spm is not None, "train_spo checks --spm before it gets here"
        model = StepAwarePreferenceModel.from_pretrained(spm).to(run.accelerator.device).eval()
        return partial(spm_scorer, run.pipe.vae, model)
    if kind == "rater":
        return partial(rater_scorer, run.pipe.vae)
    return lambda prompts: lookahead_rater_scorer(run.pipe, run.unet, prompts, guidance)


@dataclass(frozen=True)
class PromptPlan:
    """Which prompts each batch samples: epochs over `prompts` in a (seed, epoch) order, global batches of
    `prompts_per_batch` x processes, each process taking every world-th prompt of a batch."""

    prompts: list[str]
    global_batch: int
    per_epoch: int
    total: int

    @classmethod
    def make(cls, prompts: list[str], p: SPOPreset, world: int, max_batches: int | None) -> PromptPlan:
        global_batch = p.prompts_per_batch * world
        per_epoch = max(1, len(prompts) // global_batch)
        total = p.epochs * per_epoch if max_batches is None else min(p.epochs * per_epoch, max_batches)
        return cls(prompts, global_batch, per_epoch, total)

    def share(self, batch: int, seed: int, rank: int, world: int) -> tuple[int, list[int]]:
        """(epoch, global indices of this process's prompts) of batch `batch`."""
        epoch, in_epoch = divmod(batch, self.per_epoch)
        chunk = prompt_order(len(self.prompts), seed, epoch)[in_epoch * self.global_batch:
                                                              (in_epoch + 1) * self.global_batch]
        return epoch, chunk[rank::world]


# ------------------------------------------------------------------------------------------------- one iteration


def pair_log_probs(unet: torch.nn.Module, scheduler: SchedulerMixin, pairs: StepPairs, batch: PromptBatch,
                   p: SPOPreset) -> tuple[torch.Tensor, ...]:
    """log p(x_prev | x_t) of win and lose transitions under the current UNet (win and lose in one call)."""
    x = torch.cat([pairs.x_t_win, pairs.x_t_lose])
    t = torch.cat([pairs.timestep, pairs.timestep])
    idx = torch.cat([pairs.prompt_index, pairs.prompt_index])
    eps = cfg_eps(unet, x, t, batch, idx, p.guidance)
    prev = torch.cat([pairs.x_prev_win, pairs.x_prev_lose])
    logp = ddim_step_log_prob(scheduler, eps, t, x, prev, p.eta)
    return logp.chunk(2)


def sample_step_pairs(accelerator: Accelerator, pipe: Pipeline, unet: torch.nn.Module, p: SPOPreset,
                      scorer: Scorer, prompts: list[str], latents: torch.Tensor, generators: list[torch.Generator]
                      ) -> tuple[SampleResult, PromptBatch, dict[str, float]]:
    """Step 1 of an SPO iteration: sample with the current policy and the step-wise resampler.

    Returns the sampler's result, the prompts' conditioning and the seconds spent sampling vs scoring.
    """
    started = time.perf_counter()
    unet.eval()
    pb = encode_prompts(pipe, prompts)
    spent = [0.0]

    def timed_score(x: torch.Tensor, idx: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s0 = time.perf_counter()
        with torch.autocast(x.device.type, enabled=False) if p.vae_fp32 else contextlib.nullcontext():
            scores = scorer(x.float() if p.vae_fp32 else x, idx, t)
        spent[0] += time.perf_counter() - s0
        return scores

    def eps_fn(x: torch.Tensor, t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return cfg_eps(unet, x, t, pb, idx, p.guidance)

    with torch.no_grad(), accelerator.autocast():
        result = spo_sample(pipe.scheduler, eps_fn, Scorer(timed_score, scorer.scores_latents),
                            latents * pipe.scheduler.init_noise_sigma, num_steps=p.num_steps,
                            num_candidates=p.num_candidates, divert_start_step=p.divert_start_step,
                            inner_steps=p.inner_steps, threshold=p.threshold, eta=p.eta, generator=generators,
                            continue_from=p.continue_from)
    return result, pb, {"scoring_s": spent[0], "sampling_s": time.perf_counter() - started - spent[0]}


@dataclass(frozen=True)
class StepShare:
    """One optimizer step of a batch as every process sees it: how many pairs each process trains on in it and
    how many forward/backward passes everyone runs (the most any process needs)."""

    step: int  # which of the batch's optimizer steps
    counts: tuple[int, ...]  # per process
    passes: int

    @property
    def total(self) -> int:
        return sum(self.counts)


def select_pairs(pairs: StepPairs, index: torch.Tensor) -> StepPairs:
    index = index.to(pairs.timestep.device)
    return StepPairs(*(getattr(pairs, f)[index] for f in StepPairs.__dataclass_fields__))


def plan_steps(kept: list[int], steps: int, micro_batch: int) -> list[StepShare]:
    """Spread every process's kept pairs over `steps` optimizer steps (near-equal chunks, each pair once).

    Every process computes the same plan from the gathered counts, so all take the same optimizer steps and the same
    number of passes (a process short of pairs runs zero-weight passes): no process waits for a DDP gradient
    all-reduce that another skips. A step no process has pairs for is skipped by all.
    """
    chunks = [[len(c) for c in np.array_split(np.arange(n), steps)] for n in kept]
    plan = [StepShare(s, tuple(c[s] for c in chunks), max(math.ceil(c[s] / micro_batch) for c in chunks))
            for s in range(steps)]
    return [share for share in plan if share.total]


def kept_counts(accelerator: Accelerator, n: int) -> list[int]:
    """Every process's number of pairs to train on this batch (the same list on every process)."""
    if accelerator.num_processes == 1:
        return [n]
    return [int(v) for v in accelerator.gather(torch.tensor([n], device=accelerator.device)).tolist()]


def placeholder_pairs(scheduler: SchedulerMixin, shape: tuple[int, ...], device: torch.device) -> StepPairs:
    """One all-zero transition at a sampled timestep: the input of a zero-weight pass on a process that has never
    kept a pair (finite, so 0 x its gradient is 0)."""
    x = torch.zeros(1, *shape, device=device)
    t = torch.as_tensor(scheduler.timesteps[len(scheduler.timesteps) // 2], device=device).reshape(1).long()
    return StepPairs(x, x, t, x, x, torch.zeros(1, dtype=torch.long, device=device))


def train_on_pairs(accelerator: Accelerator, unet: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   params: list[torch.nn.Parameter], scheduler: SchedulerMixin, pairs: StepPairs | None,
                   pb: PromptBatch, p: SPOPreset, generator: torch.Generator,
                   ref_unet: UNet2DConditionModel | None = None) -> tuple[list[float], list[torch.Tensor],
                                                                           list[torch.Tensor]]:
    """Step 2: `optimizer_steps_per_batch` optimizer steps over all of this batch's kept pairs (§4.6).

    Each step minimises the mean SPO loss over the pairs all processes train on in it: a process scales its pairs'
    summed loss by world / (pairs in the step), so DDP's gradient average is that mean whatever each process kept.
    The reference is the same UNet with its LoRA disabled, or `ref_unet` for a full fine-tune. Returns the mean loss
    of every step (over all processes) and this process's win/lose probability ratios (policy / reference).
    """
    n = len(pairs) if pairs is not None else 0
    plan = plan_steps(kept_counts(accelerator, n), p.optimizer_steps_per_batch, p.micro_batch)
    if not plan:
        return [], [], []
    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    order = torch.randperm(n, generator=generator).to(device) if n else torch.zeros(0, dtype=torch.long, device=device)
    if pairs is None:
        model = accelerator.unwrap_model(unet)
        filler = placeholder_pairs(scheduler, (model.config.in_channels, model.config.sample_size,
                                               model.config.sample_size), device)
    else:
        filler = select_pairs(pairs, order[:1])
    chunks = torch.tensor_split(order, p.optimizer_steps_per_batch)  # the sizes plan_steps assumed
    losses, ratios_w, ratios_l = [], [], []
    unet.train()
    for share in plan:
        idx_all = chunks[share.step]
        assert len(idx_all) == share.counts[rank]
        weight = world / share.total
        loss_sum = torch.zeros((), device=device)
        for k in range(share.passes):
            idx = idx_all[k * p.micro_batch:(k + 1) * p.micro_batch]
            real = len(idx) > 0
            mini = select_pairs(pairs, idx) if real and pairs is not None else filler
            sync = k == share.passes - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(unet):
                with accelerator.autocast():
                    logp_w, logp_l = pair_log_probs(unet, scheduler, mini, pb, p)
                    with torch.no_grad(), reference_model(accelerator.unwrap_model(unet), ref_unet is None,
                                                          ref_unet) as ref:
                        ref_w, ref_l = pair_log_probs(ref, scheduler, mini, pb, p)
                per_pair = spo_loss(logp_w, ref_w, logp_l, ref_l, p.beta, p.clip_eps, reduction="none")
                accelerator.backward(per_pair.sum() * (weight if real else 0.0))
            if real:
                loss_sum += per_pair.detach().sum()
                ratios_w.append(torch.exp(logp_w - ref_w).detach().float())
                ratios_l.append(torch.exp(logp_l - ref_l).detach().float())
        accelerator.clip_grad_norm_(params, p.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total_loss = accelerator.reduce(loss_sum, "sum") if world > 1 else loss_sum
        losses.append(float(total_loss) / share.total)
    return losses, ratios_w, ratios_l


def spo_iteration(run: SPORun, p: SPOPreset, plan: PromptPlan, batch: int, seed: int,
                  scorer_for: Callable[[list[str]], Scorer]) -> dict[str, Any]:
    """Sample this batch's prompts with the current policy, then train on the kept pairs (the previous batch's if
    none were kept); returns the batch's log record."""
    acc = run.accelerator
    epoch, mine = plan.share(batch, seed, acc.process_index, acc.num_processes)
    prompts = [plan.prompts[i] for i in mine]
    latents = torch.stack([torch.randn(run.latent_shape, generator=g) for g in prompt_generators(seed, epoch, mine, 0)])
    result, pb, timings = sample_step_pairs(acc, run.pipe, run.unet, p, scorer_for(prompts), prompts,
                                            latents.to(acc.device), prompt_generators(seed, epoch, mine, 1))
    started = time.perf_counter()
    if result.pairs is not None:
        run.last_pairs = (result.pairs, pb)
    pairs, pairs_pb = run.last_pairs if run.last_pairs is not None else (None, pb)
    # Every process calls this, pairs or not: the optimizer steps (and DDP's all-reduces) must line up.
    losses, ratios_w, ratios_l = train_on_pairs(acc, run.unet, run.optimizer, run.params, run.pipe.scheduler, pairs,
                                                pairs_pb, p, prompt_generators(seed, epoch, [batch], 2)[0],
                                                run.ref_unet)
    timings["training_s"] = time.perf_counter() - started
    rw = torch.cat(ratios_w) if ratios_w else torch.ones(1)
    rl = torch.cat(ratios_l) if ratios_l else torch.ones(1)
    return {"batch": batch, "epoch": epoch, "loss": float(np.mean(losses)) if losses else math.nan,
            "keep_rate": result.keep_rate, "pairs": len(result.pairs) if result.pairs else 0,
            "optimizer_steps": len(losses),
            "ratio_win_mean": rw.mean().item(), "ratio_lose_mean": rl.mean().item(),
            "ratio_abs_dev_max": max((rw - 1).abs().max().item(), (rl - 1).abs().max().item()), **timings}


# ------------------------------------------------------------------------------------------------------- the run


ScorerFactory = Callable[[SPORun], Callable[[list[str]], Scorer]]


def train_spo(preset: str, base: Path, out: Path, *, spm: Path | None = None, scorer: str | ScorerFactory = "spm",
              prompts: list[str] | None = None, seed: int = 42, full_unet: bool = False, resume: bool = False,
              max_batches: int | None = None, max_minutes: float | None = None, snapshot_every: int = 0,
              vae: str | None = None, overrides: dict[str, Any] | None = None) -> Path:
    """Fine-tune `base` with SPO; writes a diffusers LoRA (or UNet folder) and a served-model manifest entry.

    `prompts`: the training prompts (default: the shapes world's training captions; the held-out rater evaluation
    runs only then). `scorer`: spm, rater, lookahead, or a callable run -> (prompts -> Scorer) for programmatic
    use. `max_minutes` budgets the training compute (sampling, scoring, optimizer steps, checkpoints; summed over
    resumed runs), not held-out evaluation or snapshots; `snapshot_every` keeps the weights every N batches in
    OUT/snapshots/.
    """
    if preset not in SPO_PRESETS:
        raise ValueError(f"--preset must be one of {sorted(SPO_PRESETS)}, got {preset!r}")
    if not callable(scorer) and scorer not in SCORERS:
        raise ValueError(f"--scorer must be spm, rater or lookahead, got {scorer!r}")
    if prompts is not None and not prompts:
        raise ValueError("--prompts: no prompts to train on")
    if scorer == "spm" and spm is None:
        raise ValueError("--spm is required with --scorer spm")
    p, out = replace(SPO_PRESETS[preset], **(overrides or {})), Path(out)
    ckpt_dir, log_path = out / CHECKPOINTS, out / "spo_log.jsonl"
    refuse_old_spo_layout(out, resume)
    refuse_foreign_checkpoints(ckpt_dir, resume)  # pruning by step would delete the new run's checkpoints
    run = setup_models(p, base, seed, full_unet, vae)
    acc, rank = run.accelerator, run.accelerator.process_index
    scorer_for = scorer(run) if callable(scorer) else scorer_for_prompts(scorer, spm, run, p.guidance)
    shapes_world = prompts is None
    plan = PromptPlan.make(prompts or [caption_for(*c) for c in TRAIN_COMBOS], p, acc.num_processes, max_batches)
    state = resume_state(acc, ckpt_dir, {"batch": 0, "train_seconds": 0.0}, resume,
                         must_match={"seed": seed, "preset": preset})
    if state["batch"]:
        run.last_pairs = torch.load(checkpoints(ckpt_dir)[-1] / f"last_pairs_{rank}.pt", weights_only=False)
    if acc.is_main_process:
        trim_log(log_path, state["batch"] - 1, resume, key="batch")  # records of batches 0 .. batch - 1
    budget = TimeBudget(max_minutes, state["train_seconds"])  # the steps below it, not evaluation or snapshots
    bar = tqdm(total=plan.total, initial=state["batch"], desc="spo", dynamic_ncols=True,
               disable=not acc.is_main_process)

    while state["batch"] < plan.total:
        if agreed(acc, budget.spent()):
            tqdm.write(f"time budget of {max_minutes} min reached after {state['batch']} batches")
            break  # a wall-clock budget (equal-compute comparisons): the LoRA so far is the result
        with budget.counting():
            record = spo_iteration(run, p, plan, state["batch"], seed, scorer_for)
        state["batch"] += 1
        if shapes_world and p.eval_every and (state["batch"] % p.eval_every == 0 or state["batch"] == plan.total):
            run.unet.eval()
            record.update({f"heldout_{k}": v for k, v in heldout_rating(run.pipe).items()})
        if acc.is_main_process:
            append_record(log_path, record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", keep=f"{record['keep_rate']:.2f}",
                        ratio=f"{record['ratio_win_mean']:.3f}/{record['ratio_lose_mean']:.3f}")
        bar.update(1)
        if p.checkpoint_every and state["batch"] % p.checkpoint_every == 0:
            with budget.counting():
                save_checkpoint(acc, ckpt_dir, state["batch"], {
                    "batch": state["batch"], "train_seconds": budget.counted, "seed": seed, "preset": preset,
                    "config": asdict(p)}, KEEP_CHECKPOINTS,
                    extra=lambda path: torch.save(run.last_pairs, path / f"last_pairs_{rank}.pt"))
        if snapshot_every and state["batch"] % snapshot_every == 0:
            if acc.is_main_process:
                save_snapshot(run.pipe, acc.unwrap_model(run.unet), out, state["batch"], budget.counted, full_unet)
            acc.wait_for_everyone()
    bar.close()

    finish(run, p, out, base, full_unet, budget, {
        "batches": state["batch"], "planned_batches": plan.total, "processes": acc.num_processes},
        {"method": "spo", "preset": preset, "seed": seed, "scorer": scorer if isinstance(scorer, str) else "custom",
         "spm": str(spm) if spm else None, "vae": vae, "prompts": len(plan.prompts), "rater_version": RATER_VERSION})
    return out


def finish(run: SPORun, p: SPOPreset, out: Path, base: Path, full_unet: bool, budget: TimeBudget,
           info: dict[str, Any], config: dict[str, Any]) -> None:
    """The result: the weights and manifest entry, `spo_config.json`, `train_info.json` and the curves."""
    from .plots import save_curves

    acc = run.accelerator
    acc.wait_for_everyone()
    if acc.is_main_process:
        save_result(run.pipe, acc.unwrap_model(run.unet), out, full_unet, base, p.kind, {**config, **asdict(p)},
                    "spo_config.json")
        (out / "train_info.json").write_text(json.dumps(
            {**info, "seconds": round(budget.counted, 1), "wall_seconds": round(budget.wall_seconds(), 1),
             "max_minutes": budget.max_minutes, "stopped_by_time_budget": info["batches"] < info["planned_batches"]},
            indent=2) + "\n")
        log_path = out / "spo_log.jsonl"
        if log_path.exists():
            save_curves(log_path, out / "spo_curves.png",
                        keys=("loss", "keep_rate", "ratio_win_mean", "ratio_lose_mean", "heldout_total",
                              "heldout_quality"), smooth=5,
                        step_key="batch")
    acc.end_training()
