"""Diffusion-DPO (Wallace et al. 2023, arXiv 2311.12908), the baseline SPO is measured against (docs/spo.md §6).

Setup, the loss, one optimizer step, the loop, outputs.

Diffusion-DPO trains on *final-image* preference pairs (here: the Pick-a-Pic-format pairs `spo data pairs` writes, the
same data the step-aware preference model learns from). Per pair: both images are VAE-encoded, noised with the *same*
noise at the *same* timestep t, and the policy (the UNet with a LoRA) and the reference (the same UNet with its LoRA
disabled) predict the noise, text-conditioned only (no classifier-free guidance in the loss; as in the reference
code, 20% of the pairs get the empty caption, which trains the unconditional branch that sampling's CFG uses). With
mse = ||target - prediction||^2 averaged over the latent,

    L = -log sigmoid(-beta/2 * ((mse_w - mse_l) - (ref_mse_w - ref_mse_l)))

so the policy is pushed to denoise the winner better, and the loser worse, than the reference does. Ties are skipped;
the labels decide which image is the winner.

The LoRA has the same rank and target modules as the SPO preset of the same name, so that SPO and Diffusion-DPO can be
compared at equal parameter budget and, with `max_minutes`, at equal wall-clock budget.

Reproducibility is as in `train_spm`: the data order is a function of (seed, epoch), every draw of an example (t,
noise, caption drop, flips) comes from a generator keyed by (seed, step, index in the global batch), and the global
batch is the same set of pairs whatever the number of processes; so a resumed run (OUT/checkpoints/step-N/, N counting
optimizer steps) ends with exactly the LoRA of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .conditioning import condition
from .evaluate import heldout_rating
from .lora import add_lora, pipeline_kind, reference_model, register_lora_state_hooks, save_result, save_snapshot
from .preference_data import PairStream, PreferenceData, PreferencePair, pairs_rater_version
from .presets import DPO_PRESETS, DPOPreset
from .run import (
    CHECKPOINTS,
    TimeBudget,
    agreed,
    append_record,
    example_generator,
    lr_factor,
    make_accelerator,
    process_share,
    refuse_foreign_checkpoints,
    resume_state,
    save_checkpoint,
    set_lr,
    trim_log,
    weight_dtype,
)
from .step_images import to_tensor

if TYPE_CHECKING:
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, SchedulerMixin

    from service.worker.pipeline import Pipeline

# ------------------------------------------------------------------------------------------------------------- loss


def diffusion_dpo_loss(model_mse_w: torch.Tensor, model_mse_l: torch.Tensor, ref_mse_w: torch.Tensor,
                       ref_mse_l: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair Diffusion-DPO loss and its logit `-beta/2 * ((mse_w - mse_l) - (ref_mse_w - ref_mse_l))`.

    The logit is the implicit reward margin of the winner (positive: the policy prefers the winner more than the
    reference does); the caller averages the loss and reads the implicit accuracy from the logit.
    """
    logit = -0.5 * beta * ((model_mse_w - model_mse_l) - (ref_mse_w - ref_mse_l))
    return -F.logsigmoid(logit), logit


def implicit_accuracy(logit: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs whose implicit reward ranks the winner first; an exact tie counts 1/2 (0.5 at step 0,
    where the LoRA is still the identity)."""
    return ((logit > 0).float() + 0.5 * (logit == 0).float()).mean()


# ----------------------------------------------------------------------------------------------------------- data


def next_decisive(stream: PairStream, n: int) -> tuple[list[PreferencePair], int]:
    """The next `n` pairs that are not ties, and how many ties were skipped on the way."""
    batch: list[PreferencePair] = []
    ties = 0
    while len(batch) < n:
        pair = stream.next_batch(1)[0]
        if pair.is_tie:
            ties += 1
            if ties > len(stream.data) + n:  # two passes without a decisive pair: the data holds none
                raise RuntimeError(f"no decisive (non-tie) pairs in {stream.data.root}")
            continue
        batch.append(pair)
    return batch, ties


def winner_first(pairs: list[PreferencePair]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [-1, 1] as (winners, losers), the winner being the image with the larger label."""
    wins = [p.image_0 if p.label_0 > p.label_1 else p.image_1 for p in pairs]
    loses = [p.image_1 if p.label_0 > p.label_1 else p.image_0 for p in pairs]
    return to_tensor(wins), to_tensor(loses)


@torch.no_grad()
def encode_images(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> scaled latents (posterior mean, minus the VAE's shift, times its scaling), float32."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    mean = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mean.float()
    return (mean - shift) * vae.config.scaling_factor


def draw_example(seed: int, step: int, index: int, latent_shape: tuple[int, ...], num_timesteps: int,
                 p: DPOPreset) -> dict[str, Any]:
    """Every random choice of one example, from its own generator: t, noise, caption drop, flips of win / lose."""
    g = example_generator(seed, step, index)
    t = int(torch.randint(0, num_timesteps, (1,), generator=g))
    noise = torch.randn(latent_shape, generator=g)
    u = torch.rand(3, generator=g).tolist()
    return {"t": t, "noise": noise, "drop": u[0] < p.caption_dropout, "flip_w": p.hflip and u[1] < 0.5,
            "flip_l": p.hflip and u[2] < 0.5}


# ----------------------------------------------------------------------------------------------------------- step


def pair_mse(unet: torch.nn.Module, scheduler: SchedulerMixin, latents: torch.Tensor, noise: torch.Tensor,
             t: torch.Tensor, embeds: torch.Tensor, added: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Per-sample mean squared error of the UNet's prediction (epsilon, v or sample, as the scheduler trains).

    `dtype` is the frozen weights' dtype (passed in: a DDP-wrapped UNet has no `.dtype`).
    """
    x_t = scheduler.add_noise(latents, noise, t)
    kind = scheduler.config.prediction_type
    target = {"epsilon": noise, "sample": latents}.get(kind)
    if target is None:
        target = scheduler.get_velocity(latents, noise, t)
    pred = unet(x_t.to(dtype), t, encoder_hidden_states=embeds.to(dtype),
                added_cond_kwargs={k: v.to(dtype) for k, v in added.items()} or None).sample
    return (pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, pred.ndim)))


def micro_batch_losses(accelerator: Accelerator, unet: torch.nn.Module, pipe: Pipeline,
                       pairs: list[PreferencePair], draws: list[dict[str, Any]], beta: float
                       ) -> dict[str, torch.Tensor]:
    """Forward pass of the policy and the reference on [winners; losers]: per-pair losses, logits and MSEs."""
    device = accelerator.device
    wins, loses = winner_first(pairs)
    wins = torch.stack([im.flip(-1) if d["flip_w"] else im for im, d in zip(wins, draws, strict=True)])
    loses = torch.stack([im.flip(-1) if d["flip_l"] else im for im, d in zip(loses, draws, strict=True)])
    latents = encode_images(pipe.vae, torch.cat([wins, loses]))
    noise = torch.stack([d["noise"] for d in draws]).to(device).repeat(2, 1, 1, 1)  # the same noise for w and l
    t = torch.tensor([d["t"] for d in draws], device=device).repeat(2)  # ... at the same t
    with torch.no_grad():
        embeds, added = condition(pipe, ["" if d["drop"] else p.caption for p, d in zip(pairs, draws, strict=True)])
    embeds, added = embeds.repeat(2, 1, 1), {k: v.repeat(2, *[1] * (v.ndim - 1)) for k, v in added.items()}
    scheduler, dtype = pipe.scheduler, accelerator.unwrap_model(unet).dtype  # the frozen weights' dtype
    with accelerator.autocast():
        mse_w, mse_l = pair_mse(unet, scheduler, latents, noise, t, embeds, added, dtype).chunk(2)
        with torch.no_grad(), reference_model(accelerator.unwrap_model(unet), lora=True) as ref:
            ref_w, ref_l = pair_mse(ref, scheduler, latents, noise, t, embeds, added, dtype).chunk(2)
    losses, logits = diffusion_dpo_loss(mse_w, mse_l, ref_w, ref_l, beta)
    return {"losses": losses, "logits": logits.detach(), "mse_w": mse_w.detach(), "mse_l": mse_l.detach(),
            "ref_w": ref_w, "ref_l": ref_l}


# ------------------------------------------------------------------------------------------------------------ setup


@dataclass
class DPORun:
    """The frozen pipeline, the UNet with its LoRA (as `accelerator.prepare` returned it) and the optimizer."""

    accelerator: Accelerator
    pipe: Pipeline
    unet: torch.nn.Module
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    latent_shape: tuple[int, ...]
    num_timesteps: int


def setup_models(p: DPOPreset, accelerator: Accelerator, base: Path) -> DPORun:
    """Frozen weights in half precision on GPU (the VAE stays fp32: SDXL's overflows in fp16), the LoRA in fp32;
    checkpoints hold only the LoRA and the optimizer state."""
    from service.worker.pipeline import load_pipeline

    dtype = weight_dtype(accelerator)
    pipe = load_pipeline(str(base), device=accelerator.device)
    pipe.set_progress_bar_config(disable=True)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False).eval()
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).to(dtype=dtype)
    unet = pipe.unet
    params = add_lora(unet, p.lora_rank, p.lora_targets, dtype)
    if p.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(params, lr=p.lr, betas=p.adam_betas, weight_decay=p.weight_decay, eps=p.adam_eps)
    prepared, optimizer = accelerator.prepare(unet, optimizer)
    register_lora_state_hooks(accelerator)
    size = unet.config.sample_size
    return DPORun(accelerator, pipe, prepared, optimizer, params, (unet.config.in_channels, size, size),
                  pipe.scheduler.config.num_train_timesteps)


# --------------------------------------------------------------------------------------------------------- one step


def dpo_step(run: DPORun, p: DPOPreset, batch: list[PreferencePair], micro: list[list[int]], seed: int, step: int
             ) -> dict[str, Any]:
    """One optimizer step on the global batch (this process's micro-batches, gradients accumulated and averaged
    over processes); returns the step's log record (global batch means)."""
    acc, unet, world = run.accelerator, run.unet, run.accelerator.num_processes
    sums = {k: torch.zeros((), device=acc.device) for k in ("loss", "acc", "mse_w", "mse_l", "ref")}
    for j, idx in enumerate(micro):
        draws = [draw_example(seed, step, i, run.latent_shape, run.num_timesteps, p) for i in idx]
        sync = acc.no_sync(unet) if j < len(micro) - 1 else contextlib.nullcontext()
        with sync:
            r = micro_batch_losses(acc, unet, run.pipe, [batch[i] for i in idx], draws, p.beta)
            # DDP averages gradients over processes, hence * world: the result is the global batch mean.
            acc.backward(r["losses"].sum() / p.batch_size * world)
        sums["loss"] += r["losses"].detach().sum()
        sums["acc"] += implicit_accuracy(r["logits"]) * len(idx)
        sums["mse_w"] += r["mse_w"].sum()
        sums["mse_l"] += r["mse_l"].sum()
        sums["ref"] += (r["ref_w"] + r["ref_l"]).sum() / 2
    grad_norm = acc.clip_grad_norm_(run.params, p.max_grad_norm)  # pre-clip norm; the LoRA grads are clipped
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    totals = {k: acc.reduce(v, "sum").item() / p.batch_size for k, v in sums.items()}
    return {"loss": totals["loss"], "implicit_acc": totals["acc"], "model_mse_w": totals["mse_w"],
            "model_mse_l": totals["mse_l"], "ref_mse": totals["ref"], "grad_norm": float(grad_norm),
            "lr": run.optimizer.param_groups[0]["lr"]}


# ------------------------------------------------------------------------------------------------------- the run


def train_dpo(preset: str, data: Path | str, base: Path | str, out: Path | str, *, seed: int = 42,
              resume: bool = False, max_minutes: float | None = None, stop_after: int | None = None,
              snapshot_every: int = 0, overrides: dict[str, Any] | None = None) -> Path:
    """Fine-tune a LoRA on `base` with Diffusion-DPO on the pairs in `data`; writes the LoRA and its manifest entry.

    `overrides` replaces preset fields (e.g. {"steps": 20, "beta": 2500}); `stop_after` ends this run after that many
    steps with a checkpoint (continue with `resume=True`); `max_minutes` is a wall-clock budget on the training steps
    (summed over resumed runs; held-out evaluation and checkpoint writing not counted), at which the LoRA trained so
    far is the result and `train_info.json` says it stopped on the budget. `snapshot_every` keeps the LoRA every N
    steps in OUT/snapshots/ with the training seconds spent (gain-versus-compute curves).
    """
    if preset not in DPO_PRESETS:
        raise ValueError(f"--preset must be one of {sorted(DPO_PRESETS)}, got {preset!r}")
    p, out, base = replace(DPO_PRESETS[preset], **(overrides or {})), Path(out), Path(base)
    ckpt_dir, log_path = out / CHECKPOINTS, out / "dpo_log.jsonl"
    acc = make_accelerator(p.mixed_precision)
    main = acc.is_main_process
    micro = process_share(acc, p.batch_size, p.micro_batch)
    torch.manual_seed(seed)  # only the LoRA's initial weights draw from the global generator
    run = setup_models(p, acc, base)
    data_set = PreferenceData(data, image_size=run.latent_shape[-1] * run.pipe.vae_scale_factor)
    if main:
        print(f"{len(data_set)} pairs in {data}; {acc.num_processes} process(es), global batch {p.batch_size}, "
              f"micro-batch {p.micro_batch}, LoRA rank {p.lora_rank}, beta {p.beta:g}", file=sys.stderr)
    refuse_foreign_checkpoints(ckpt_dir, resume)
    state = resume_state(acc, ckpt_dir, {"step": 0, "epoch": 0, "position": 0, "train_seconds": 0.0,
                                         "ties_skipped": 0}, resume, must_match={"seed": seed,
                                                                                 "batch_size": p.batch_size})
    if main:
        trim_log(log_path, state["step"], resume)
    stream = PairStream(data_set, seed, state["epoch"], state["position"])
    budget = TimeBudget(max_minutes, state["train_seconds"])  # the training steps only
    bar = tqdm(total=p.steps, initial=state["step"], desc="dpo", disable=not main, dynamic_ncols=True)
    started_here, out_of_time = state["step"], budget.spent()  # a resumed run may have spent its budget
    run.unet.train()

    while state["step"] < p.steps and not out_of_time:
        step, before = state["step"], budget.counted
        with budget.counting():
            set_lr(run.optimizer, p.lr * lr_factor(step, p.warmup))
            batch, ties = next_decisive(stream, p.batch_size)
            record = dpo_step(run, p, batch, micro, seed, step)
        state.update(step=step + 1, train_seconds=budget.counted, ties_skipped=state["ties_skipped"] + ties)
        record = {"step": step + 1, **record, "epoch": stream.epoch, "step_s": round(budget.counted - before, 4),
                  "train_seconds": round(budget.counted, 2)}
        if p.eval_every and (state["step"] % p.eval_every == 0 or state["step"] == p.steps):
            if main:
                run.unet.eval()
                record.update({f"heldout_{k}": v for k, v in heldout_rating(run.pipe).items()})
                run.unet.train()
            acc.wait_for_everyone()
        if main:
            append_record(log_path, record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['implicit_acc']:.2f}", epoch=stream.epoch)
        bar.update(1)
        out_of_time = agreed(acc, budget.spent())  # the main process decides for everyone (clocks differ)
        stopping = stop_after is not None and state["step"] - started_here >= stop_after
        if state["step"] % p.save_every == 0 or stopping or out_of_time:
            save_checkpoint(acc, ckpt_dir, state["step"], {**state, "epoch": stream.epoch,
                                                           "position": stream.position, "seed": seed,
                                                           "preset": preset, "config": asdict(p)}, p.keep_checkpoints)
        if snapshot_every and state["step"] % snapshot_every == 0 and main:
            save_snapshot(run.pipe, acc.unwrap_model(run.unet), out, state["step"], state["train_seconds"])
        if stopping or out_of_time:
            break
    bar.close()
    if main:
        print(data_set.stats.report(), file=sys.stderr)

    acc.wait_for_everyone()
    if (state["step"] >= p.steps or out_of_time) and main:
        finish(run, p, out, base, {
            "steps": state["step"], "planned_steps": p.steps, "processes": acc.num_processes,
            "seconds": round(budget.counted, 1), "wall_seconds": round(budget.wall_seconds(), 1),
            "max_minutes": max_minutes, "stopped_by_time_budget": out_of_time, "data": str(data),
            "rater_version": pairs_rater_version(data),
            "pairs_seen": state["step"] * p.batch_size, "ties_skipped": state["ties_skipped"],
            "data_stats": {"read": data_set.stats.read, "skipped": dict(data_set.stats.skipped)}},
            {"method": "diffusion-dpo", "preset": preset, "seed": seed, **asdict(p)})
    acc.wait_for_everyone()
    acc.end_training()
    return out


def finish(run: DPORun, p: DPOPreset, out: Path, base: Path, info: dict[str, Any], config: dict[str, Any]) -> None:
    """The result (main process): `train_info.json`, the LoRA with its manifest entry and config, the curves.

    `seconds` in the info: the training steps only, summed over resumed runs (what the budget counts);
    `wall_seconds`: this run's loop including held-out evaluation and checkpoints.
    """
    from .plots import save_curves

    (out / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    save_result(run.pipe, run.accelerator.unwrap_model(run.unet), out, False, base, pipeline_kind(run.pipe), config,
                "dpo_config.json")
    save_curves(out / "dpo_log.jsonl", out / "dpo_curves.png",
                keys=("loss", "implicit_acc", "heldout_total", "heldout_quality"),
                smooth=max(1, min(25, p.steps // 20)))
