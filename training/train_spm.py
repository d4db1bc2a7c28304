"""Train the step-aware preference model (docs/spo.md §1) on Pick-a-Pic-format pairs: setup, the loop, outputs.

Per pair and optimizer step: t ~ U{0..999}; both images are VAE-encoded and noised with the *same* noise at the
*same* t; one classifier-free-guided UNet pass (scale 5) gives the DDIM prediction of x0, which is decoded and
scored by the SPM at t (training/step_images.py). Step pairs (`spo data step-pairs`) already are such previews, of
sibling candidates at a step of SPO's sampler: they are scored as they are, at their recorded step. The loss is
PickScore's cross-entropy over the two image logits with the soft labels.

Reproducibility: every random draw of an example (t, noise) comes from a generator keyed by (seed, step, index of
the example in the global batch), the data order is a function of (seed, epoch), and the global batch is the same
set of pairs whatever the number of processes. So a run resumed from a checkpoint (OUT/checkpoints/step-N/, N
counting optimizer steps) repeats the uninterrupted run's loss sequence, and results do not depend on the number of
GPUs (docs/spo.md §4.7).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .evaluate_spm import heldout_pairs, pairwise_correct, rater_on_previews, recorded_correct
from .preference_data import CLEAR_GAP, PairStream, PreferenceData, PreferencePair, load_pairs, pairs_rater_version
from .presets import SPM_PRESETS, SPMPreset
from .run import (
    CHECKPOINTS,
    TimeBudget,
    agreed,
    append_record,
    lr_factor,
    make_accelerator,
    process_share,
    refuse_foreign_checkpoints,
    resume_state,
    save_checkpoint,
    set_lr,
    trim_log,
)
from .spm import StepAwarePreferenceModel, build_spm
from .step_images import StepImages, draw_t_and_noise, spm_inputs
from .step_pairs import generate_step_pairs, plan_step_pairs, timestep_buckets

if TYPE_CHECKING:
    from accelerate import Accelerator

    from service.worker.pipeline import Pipeline


# ------------------------------------------------------------------------------------------------------------- loss

def pair_losses(scores_0: torch.Tensor, scores_1: torch.Tensor, label_0: torch.Tensor, label_1: torch.Tensor
                ) -> torch.Tensor:
    """PickScore's loss per pair: cross-entropy of softmax(s0, s1) against the soft labels, minus log 2 for ties.

    A tie (0.5 / 0.5) has entropy log 2, so plain cross-entropy would cost at least log 2 even for a perfect tie
    prediction; adding log 0.5 makes a perfect tie cost 0, like a confident correct win.
    """
    logp = torch.log_softmax(torch.stack([scores_0, scores_1], dim=-1).float(), dim=-1)
    ce = -(label_0 * logp[:, 0] + label_1 * logp[:, 1])
    return ce + torch.where(label_0 == label_1, math.log(0.5), 0.0)


def preference_loss(scores_0: torch.Tensor, scores_1: torch.Tensor, label_0: torch.Tensor, label_1: torch.Tensor,
                    weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean of `pair_losses` (weights 1 / pairs of the example's prompt, normalised to sum 1)."""
    losses = pair_losses(scores_0, scores_1, label_0, label_1)
    return (weights * losses).sum() / weights.sum()


# ------------------------------------------------------------------------------------------------------------ setup


@dataclass
class SPMRun:
    """The frozen diffusion model that makes the step-t images, and the SPM with its optimizer."""

    accelerator: Accelerator
    pipe: Pipeline
    step_images: StepImages
    spm: torch.nn.Module  # as `accelerator.prepare` returned it
    raw_spm: StepAwarePreferenceModel
    optimizer: torch.optim.Optimizer


def setup_models(p: SPMPreset, preset: str, accelerator: Accelerator, model: Path | str, init: Path | str | None,
                 tokenizer: Path | str | None, time_conditioning: bool) -> SPMRun:
    """The frozen pipeline (half precision UNet / text encoders on GPU) and a fresh or `init`ialised SPM."""
    from service.worker.pipeline import load_pipeline

    pipe = load_pipeline(str(model), device=accelerator.device)
    if torch.cuda.is_available():
        half = torch.bfloat16 if p.mixed_precision == "bf16" else torch.float16
        for name in ("unet", "text_encoder", "text_encoder_2"):
            if getattr(pipe, name, None) is not None:
                getattr(pipe, name).to(half)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False).eval()
    spm = build_spm(preset if p.clip == "tiny" else "sd15", init=init, tokenizer=tokenizer,
                    time_conditioning=time_conditioning)
    if p.gradient_checkpointing:
        spm.enable_gradient_checkpointing()
    spm.train()
    decay = [q for q in spm.parameters() if q.ndim >= 2]  # matrices decay; biases, norms, logit_scale do not
    no_decay = [q for q in spm.parameters() if q.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": p.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=p.lr, betas=p.betas, eps=p.eps)
    prepared, opt = accelerator.prepare(spm, opt)
    return SPMRun(accelerator, pipe, StepImages(pipe, p.guidance), prepared, accelerator.unwrap_model(prepared), opt)


class SPMEvaluation:
    """Accuracy on held-out pairs at each t (step pairs: at their own step, by bucket), also on the clear ones
    (acc_clear_*) when gaps are known. Runs on the main process; the others wait."""

    def __init__(self, run: SPMRun, p: SPMPreset, eval_data: Path | str | None, step_pairs: bool, seed: int) -> None:
        self.run, self.seed = run, seed
        pairs: list[PreferencePair] = []
        if run.accelerator.is_main_process and p.eval_every > 0:
            if eval_data is not None:
                pairs, stats = load_pairs(eval_data, p.eval_pairs, image_size=run.step_images.image_size)
                print(f"eval pairs from {eval_data}: {stats.report()}", file=sys.stderr)
            elif p.clip == "tiny" and step_pairs:
                plans = plan_step_pairs(p.eval_pairs, 4321, "heldout")
                pairs = [g.to_pair() for g in generate_step_pairs(run.pipe, plans)]
            elif p.clip == "tiny":
                pairs = heldout_pairs(run.pipe, p.eval_pairs)
        self.pairs = [q for q in pairs if q.preference != 0.5]
        self.clear = np.array([q.reference_gap is not None and q.reference_gap >= CLEAR_GAP for q in self.pairs],
                              dtype=bool)
        self.by_step = bool(self.pairs) and self.pairs[0].timestep is not None
        self.buckets = timestep_buckets(np.array([q.timestep for q in self.pairs])) if self.by_step else {}

    def baseline(self) -> dict[str, float] | None:
        """The step-unaware scorer (the rater) on the same step-pair previews: what the SPM has to beat."""
        if not self.by_step:
            return None
        correct = recorded_correct(rater_on_previews, self.pairs)
        return {f"rater_acc_steps_{k}": float(correct[m].mean()) for k, m in self.buckets.items() if m.any()}

    def __call__(self, step: int) -> dict[str, float] | None:
        record = None
        if self.pairs and self.by_step:
            correct = recorded_correct(self.run.raw_spm, self.pairs)
            record = {f"acc_steps_{k}": float(correct[m].mean()) for k, m in self.buckets.items() if m.any()}
            record.update({f"acc_clear_steps_{k}": float(correct[m & self.clear].mean())
                           for k, m in self.buckets.items() if (m & self.clear).any()})
            tqdm.write(f"step {step}: accuracy on step pairs " + " ".join(
                f"{k}:{v:.3f}" for k, v in record.items() if k.startswith("acc_steps_")))
        elif self.pairs:
            by_t = pairwise_correct(self.run.raw_spm, self.run.step_images, self.pairs, seed=self.seed)
            record = {f"acc_t{t}": float(c.mean()) for t, c in by_t.items()}
            if self.clear.any():
                record.update({f"acc_clear_t{t}": float(c[self.clear].mean()) for t, c in by_t.items()})
            tqdm.write(f"step {step}: accuracy " + " ".join(f"t={t}:{record[f'acc_t{t}']:.3f}" for t in by_t))
        self.run.accelerator.wait_for_everyone()
        return record


# ---------------------------------------------------------------------------------------------------- one step


def spm_step(run: SPMRun, p: SPMPreset, batch: list[PreferencePair], weights: torch.Tensor, micro: list[list[int]],
             t_and_noise: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]], clean_images: bool
             ) -> dict[str, float]:
    """One optimizer step on the global batch (this process's micro-batches, gradients accumulated and averaged
    over processes); `t_and_noise(indices)` draws each example's t and noise. Returns the step's log record."""
    acc, spm, world = run.accelerator, run.spm, run.accelerator.num_processes
    total_weight = weights.sum()
    run.optimizer.zero_grad(set_to_none=True)
    weighted_loss = torch.zeros((), device=acc.device)
    agree = torch.zeros((), device=acc.device)
    for j, idx in enumerate(micro):
        pairs = [batch[i] for i in idx]
        x, t = spm_inputs(pairs, run.step_images, *t_and_noise(idx), clean_images)
        label_0 = torch.tensor([q.label_0 for q in pairs], device=acc.device)
        label_1 = torch.tensor([q.label_1 for q in pairs], device=acc.device)
        w = weights[idx].to(acc.device)
        sync = contextlib.nullcontext() if j == len(micro) - 1 else acc.no_sync(spm)
        with sync, acc.autocast():
            s0, s1 = spm(x, run.raw_spm.tokenize([q.caption for q in pairs]), t.to(acc.device)).float().chunk(2)
            losses = pair_losses(s0, s1, label_0, label_1)
            # DDP averages gradients over processes, hence * world: the result is the global weighted mean.
            acc.backward((w * losses).sum() / total_weight * world)
        weighted_loss += (w * losses).sum().detach()
        agree += ((s0 > s1) == (label_0 > label_1))[label_0 != label_1].sum().detach()
    grad_norm = acc.clip_grad_norm_(spm.parameters(), p.max_grad_norm)
    run.optimizer.step()
    decisive = sum(q.label_0 != q.label_1 for q in batch)
    return {"loss": (acc.reduce(weighted_loss, "sum") / total_weight).item(),
            "agreement": acc.reduce(agree, "sum").item() / max(1, decisive),
            "lr": run.optimizer.param_groups[0]["lr"], "grad_norm": float(grad_norm)}


# ------------------------------------------------------------------------------------------------------- the run


def train_spm(data: Path | str, model: Path | str, out: Path | str, preset: str = "tiny", *,
              init: Path | str | None = None, tokenizer: Path | str | None = None,
              eval_data: Path | str | None = None, time_conditioning: bool = True, seed: int = 0,
              resume: bool = False, stop_after: int | None = None, overrides: dict[str, Any] | None = None,
              max_minutes: float | None = None, clean_images: bool = False) -> Path:
    """Train an SPM on the pairs in `data`, noising through the diffusion pipeline `model`; save it at `out`.

    `overrides` replaces preset fields (e.g. {"steps": 20}); `stop_after` ends this run after that many steps
    (a checkpoint is written there) so it can be continued with `resume=True`; `max_minutes` is a wall-clock budget
    after which the model trained so far is saved as the result. `clean_images` scores the pairs' images as they
    are, at t = 0, without the diffusion model: how PickScore itself was trained, the stage an SPM starts from
    (`--init`); evaluation still shows the model the step-t images.
    """
    if preset not in SPM_PRESETS:
        raise ValueError(f"--preset must be one of {sorted(SPM_PRESETS)}, got {preset!r}")
    p, out = replace(SPM_PRESETS[preset], **(overrides or {})), Path(out)
    ckpt_dir, log_path = out / CHECKPOINTS, out / "train_log.jsonl"
    acc = make_accelerator(p.mixed_precision)
    micro = process_share(acc, p.batch_size, p.micro_batch)
    torch.manual_seed(seed)  # only the SPM's fresh weights draw from the global generator
    run = setup_models(p, preset, acc, model, init, tokenizer, time_conditioning)
    data_set = PreferenceData(data, image_size=run.step_images.image_size)
    prompt_counts = data_set.prompt_counts()  # 1/(pairs of the prompt in the whole data) weights, as Pick-a-Pic
    if acc.is_main_process:
        print(f"{len(data_set)} pairs in {data}, {len(prompt_counts)} prompts; {acc.num_processes} process(es), "
              f"global batch {p.batch_size}, micro-batch {p.micro_batch}", file=sys.stderr)
    evaluation = SPMEvaluation(run, p, eval_data, data_set.carries_timesteps(), seed)
    refuse_foreign_checkpoints(ckpt_dir, resume)
    state = resume_state(acc, ckpt_dir, {"step": 0, "epoch": 0, "position": 0}, resume,
                         must_match={"seed": seed, "batch_size": p.batch_size})
    budget = TimeBudget(max_minutes)  # wall-clock, this run's, evaluation included

    def log(record: dict[str, Any] | None) -> None:
        if acc.is_main_process and record is not None:
            append_record(log_path, {**record, "elapsed_s": round(budget.wall_seconds(), 2)})

    if acc.is_main_process:
        trim_log(log_path, state["step"], resume)
    baseline = evaluation.baseline()
    if baseline is not None:
        log({"stage": "eval", "step": state["step"], **baseline})
    stream = PairStream(data_set, seed, state["epoch"], state["position"])
    num_t = p.train_timesteps or len(run.step_images.alphas)
    bar = tqdm(range(state["step"], p.steps), initial=state["step"], total=p.steps, desc="spm",
               disable=not acc.is_main_process, dynamic_ncols=True)
    done, out_of_time = state["step"], False

    for step in bar:
        set_lr(run.optimizer, p.lr * lr_factor(step, p.warmup))
        batch = stream.next_batch(p.batch_size)
        weights = torch.tensor([1.0 / prompt_counts.get(pair.caption, 1) for pair in batch])
        draw = partial(draw_t_and_noise, seed, step, latent_shape=run.step_images.latent_shape, num_timesteps=num_t)
        record = spm_step(run, p, batch, weights, micro, draw, clean_images)
        done = step + 1
        log({"step": done, **record, "epoch": stream.epoch})
        bar.set_postfix(loss=f"{record['loss']:.4f}", epoch=stream.epoch)
        if p.eval_every > 0 and done % p.eval_every == 0:
            log(_eval_record(evaluation, done))
        stopping = stop_after is not None and done - state["step"] >= stop_after
        if done % p.save_every == 0 or stopping:
            save_checkpoint(acc, ckpt_dir, done, {"step": done, "epoch": stream.epoch, "position": stream.position,
                                                  "seed": seed, "preset": preset, "config": asdict(p)},
                            p.keep_checkpoints)
        if stopping:
            break
        out_of_time = agreed(acc, budget.spent(budget.wall_seconds()))
        if out_of_time:
            break  # a wall-clock budget: the model so far is the result (training_info says so)
    bar.close()
    if acc.is_main_process:
        print(data_set.stats.report(), file=sys.stderr)

    if done >= p.steps or out_of_time:
        if p.eval_every > 0 and done % p.eval_every:
            log(_eval_record(evaluation, done))
        if acc.is_main_process:
            finish(run, p, out, evaluation.by_step, {
                "preset": preset, "seed": seed, "data": str(data), "rater_version": pairs_rater_version(data),
                "diffusion_model": str(model),
                "init": str(init) if init else None, "time_conditioning": time_conditioning,
                "clean_images": clean_images, "step_pairs": data_set.carries_timesteps(),
                "processes": acc.num_processes, "train_seconds": round(budget.wall_seconds(), 1),
                "config": asdict(p), "steps_done": done, "stopped_by_time_budget": out_of_time,
                "data_stats": {"read": data_set.stats.read, "skipped": dict(data_set.stats.skipped)}})
    acc.wait_for_everyone()
    return out


def _eval_record(evaluation: SPMEvaluation, step: int) -> dict[str, Any] | None:
    record = evaluation(step)
    return None if record is None else {"stage": "eval", "step": step, **record}


def finish(run: SPMRun, p: SPMPreset, out: Path, step_eval: bool, info: dict[str, Any]) -> None:
    """The result (main process): the SPM folder, `training_info.json` and the curves."""
    from .plots import save_curves

    run.raw_spm.save_pretrained(out)
    (out / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    keys = (("loss", "acc_steps_all", "acc_steps_early", "acc_clear_steps_early") if step_eval
            else ("loss", "acc_t0", "acc_t501", "acc_clear_t501"))
    save_curves(out / "train_log.jsonl", out / "train_curves.png", keys=keys, smooth=max(1, min(25, p.steps // 20)))
