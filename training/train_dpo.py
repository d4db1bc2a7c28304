"""Diffusion-DPO (Wallace et al. 2023, arXiv 2311.12908), the baseline SPO is measured against (shared/SPO.md §6).

One file, top to bottom: presets, the loss, one optimizer step, checkpoints, the loop, outputs.

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
batch is the same set of pairs whatever the number of processes; so a resumed run ends with exactly the LoRA of an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .conditioning import condition
from .preference_data import PreferenceData, PreferencePair
from .train_spm import PairStream, checkpoints, example_generator, lr_factor, resume_state, to_tensor, trim_log
from .train_spo import PRESETS as SPO_PRESETS
from .train_spo import add_lora, heldout_rating, reference_model, save_result, save_snapshot

# ----------------------------------------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class DPOPreset:
    lora_rank: int
    lora_targets: tuple[str, ...]
    beta: float = 5000.0  # beta_dpo: the KL penalty; the loss uses beta / 2 (Wallace et al. eq. 14)
    batch_size: int = 2048  # decisive pairs per optimizer step, summed over all processes
    micro_batch: int = 8  # pairs per process per forward/backward (gradient accumulation makes up the rest)
    steps: int = 2000
    lr: float = 2.048e-5
    warmup: int = 500  # linear warm-up, then constant
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    caption_dropout: float = 0.2  # the reference code trains 20% of the pairs with the empty caption
    hflip: bool = True  # random horizontal flip of each image
    mixed_precision: str = "fp16"  # used on GPU only
    gradient_checkpointing: bool = False
    eval_every: int = 0  # steps between held-out rater evaluations (shapes world only; 0: never)
    save_every: int = 100  # steps between checkpoints
    keep_checkpoints: int = 2


def _lora_of(spo_preset: str) -> dict:
    """The LoRA budget of the SPO preset of the same name: the comparison is at equal rank and target modules."""
    p = SPO_PRESETS[spo_preset]
    return {"lora_rank": p.lora_rank, "lora_targets": p.lora_targets}


PRESETS: dict[str, DPOPreset] = {
    # The reference run (SalesforceAIResearch/DiffusionDPO, launchers/sd15.sh and train.py defaults): effective batch
    # 2048 pairs (16 GPUs x 1 x 128 accumulation), 2000 steps, beta_dpo 5000, lr 1e-8 scaled by the batch (--scale_lr)
    # = 2.048e-5, constant after 500 warm-up steps, AdamW wd 1e-2, grad-norm clip 1.0, 20% empty captions, h-flips,
    # fp16. It fine-tunes the whole UNet; here a LoRA with SPO's rank 4 (LoRA ports such as diffusers'
    # research_projects/diffusion_dpo default to beta 2500: `--beta` overrides).
    "sd15": DPOPreset(**_lora_of("sd15")),
    # launchers/sdxl.sh: the same with 200 warm-up steps (and Adafactor for the full UNet; AdamW suits a LoRA).
    # SPO's SDXL LoRA has rank 64. One pair of 1024^2 images per pass, with gradient checkpointing.
    "sdxl": DPOPreset(**_lora_of("sdxl"), warmup=200, micro_batch=1, gradient_checkpointing=True),
    # spo-tiny on 2 CPU cores: SPO tiny's learning rate, a small batch, held-out rater curves.
    "tiny": DPOPreset(**_lora_of("tiny"), batch_size=16, micro_batch=16, steps=1500, lr=3e-4, warmup=50,
                      hflip=False, mixed_precision="no", eval_every=100, save_every=100),
}
PRESETS["tiny-xl"] = replace(PRESETS["tiny"], **_lora_of("tiny-xl"))
# A few steps of everything, for tests: every code path (caption drop, flips, accumulation, checkpoints).
PRESETS["smoke"] = replace(PRESETS["tiny"], **_lora_of("smoke"), batch_size=4, micro_batch=2, steps=4, warmup=1,
                           hflip=True, eval_every=0, save_every=2)


# ----------------------------------------------------------------------------------------------------------- loss


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
def encode_images(vae, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> scaled latents (posterior mean, minus the VAE's shift, times its scaling), float32."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    mean = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mean.float()
    return (mean - shift) * vae.config.scaling_factor


def draw_example(seed: int, step: int, index: int, latent_shape: tuple[int, ...], num_timesteps: int,
                 p: DPOPreset) -> dict:
    """Every random choice of one example, from its own generator: t, noise, caption drop, flips of win / lose."""
    g = example_generator(seed, step, index)
    t = int(torch.randint(0, num_timesteps, (1,), generator=g))
    noise = torch.randn(latent_shape, generator=g)
    u = torch.rand(3, generator=g).tolist()
    return {"t": t, "noise": noise, "drop": u[0] < p.caption_dropout, "flip_w": p.hflip and u[1] < 0.5,
            "flip_l": p.hflip and u[2] < 0.5}


# ----------------------------------------------------------------------------------------------------------- step


def pair_mse(unet, scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor,
             added: dict, dtype: torch.dtype) -> torch.Tensor:
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


def micro_batch_losses(accelerator, unet, pipe, pairs: list[PreferencePair], draws: list[dict],
                       beta: float) -> dict[str, torch.Tensor]:
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


# ------------------------------------------------------------------------------------------------------- checkpoints


def _register_lora_state_hooks(accelerator) -> None:
    """Checkpoints hold only the LoRA (fp32) with the optimizer state, not a copy of the frozen UNet (GBs for SDXL)."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    def save_hook(models, weights, output_dir) -> None:
        if accelerator.is_main_process:
            lora = get_peft_model_state_dict(accelerator.unwrap_model(models[0]))
            save_file({k: v.detach().cpu().contiguous() for k, v in lora.items()},
                      Path(output_dir) / "lora.safetensors")
        weights.clear()  # nothing else of the model goes into the checkpoint

    def load_hook(models, input_dir) -> None:
        model = models.pop()
        result = set_peft_model_state_dict(accelerator.unwrap_model(model),
                                           load_file(Path(input_dir) / "lora.safetensors"))
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"checkpoint {input_dir} does not match this LoRA: {result.unexpected_keys[:3]} ...")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# ----------------------------------------------------------------------------------------------------------- loop


def train_dpo(preset: str, data: Path | str, base: Path | str, out: Path | str, *, seed: int = 42,
              resume: bool = False, max_minutes: float | None = None, stop_after: int | None = None,
              snapshot_every: int = 0, overrides: dict | None = None) -> Path:
    """Fine-tune a LoRA on `base` with Diffusion-DPO on the pairs in `data`; writes the LoRA and its manifest entry.

    `overrides` replaces preset fields (e.g. {"steps": 20, "beta": 2500}); `stop_after` ends this run after that many
    steps with a checkpoint (continue with `resume=True`); `max_minutes` is a wall-clock budget on the training steps
    (summed over resumed runs; held-out evaluation and checkpoint writing not counted), at which the LoRA trained so
    far is the result and `train_info.json` says it stopped on the budget. `snapshot_every` keeps the LoRA every N
    steps in OUT/snapshots/ with the training seconds spent (gain-versus-compute curves).
    """
    from accelerate import Accelerator
    from accelerate.utils import broadcast

    from service.pipeline import load_pipeline

    if preset not in PRESETS:
        raise ValueError(f"--preset must be one of {sorted(PRESETS)}, got {preset!r}")
    p = replace(PRESETS[preset], **(overrides or {}))
    out, base = Path(out), Path(base)
    ckpt_dir = out / "checkpoints"
    on_gpu = torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision=p.mixed_precision if on_gpu else "no", cpu=not on_gpu)
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    if p.batch_size % world:
        raise ValueError(f"batch size {p.batch_size} is not divisible by the {world} processes")
    torch.manual_seed(seed)  # only the LoRA's initial weights draw from the global generator
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    # The model: frozen weights in half precision on GPU (the VAE stays fp32: SDXL's overflows in fp16), LoRA in fp32.
    pipe = load_pipeline(str(base), device=accelerator.device)
    pipe.set_progress_bar_config(disable=True)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False).eval()
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).to(dtype=weight_dtype)
    unet = pipe.unet
    params = add_lora(unet, p, weight_dtype)
    if p.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(params, lr=p.lr, betas=p.adam_betas, weight_decay=p.weight_decay, eps=p.adam_eps)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    _register_lora_state_hooks(accelerator)

    size = pipe.unet.config.sample_size
    latent_shape = (pipe.unet.config.in_channels, size, size)
    num_t = pipe.scheduler.config.num_train_timesteps
    data_set = PreferenceData(data, image_size=size * pipe.vae_scale_factor)
    if main:
        print(f"{len(data_set)} pairs in {data}; {world} process(es), global batch {p.batch_size}, micro-batch "
              f"{p.micro_batch}, LoRA rank {p.lora_rank}, beta {p.beta:g}", file=sys.stderr)

    state = {"step": 0, "epoch": 0, "position": 0, "train_seconds": 0.0, "ties_skipped": 0}
    if not resume and checkpoints(ckpt_dir):  # a later --resume would pick up the other run's checkpoints
        raise FileExistsError(f"{ckpt_dir} holds checkpoints of an earlier run: resume it or choose another --out")
    state = resume_state(accelerator, ckpt_dir, state, seed, p.batch_size, resume)
    log_path = out / "dpo_log.jsonl"
    if main:
        trim_log(log_path, state["step"], resume)

    stream = PairStream(data_set, seed, state["epoch"], state["position"])

    def save_checkpoint(step: int) -> None:
        path = ckpt_dir / f"step-{step:07d}"
        accelerator.save_state(str(path))  # every process: accelerate writes what each must (no main-only hang)
        if main:
            (path / "trainer_state.json").write_text(json.dumps(
                {**state, "step": step, "epoch": stream.epoch, "position": stream.position, "seed": seed,
                 "preset": preset, "config": asdict(p)}) + "\n")
            for old_ckpt in checkpoints(ckpt_dir)[:-p.keep_checkpoints]:
                shutil.rmtree(old_ckpt)
        accelerator.wait_for_everyone()

    mine = list(range(rank, p.batch_size, world))  # this process's share of every global batch
    micro = [mine[i:i + p.micro_batch] for i in range(0, len(mine), p.micro_batch)]
    bar = tqdm(total=p.steps, initial=state["step"], desc="dpo", disable=not main, dynamic_ncols=True)
    started_here, loop_started = state["step"], time.perf_counter()
    out_of_time = max_minutes is not None and state["train_seconds"] > 60 * max_minutes  # a resumed, spent budget
    unet.train()
    while state["step"] < p.steps and not out_of_time:
        step = state["step"]
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = p.lr * lr_factor(step, p.warmup)
        batch, ties = next_decisive(stream, p.batch_size)
        sums = {k: torch.zeros((), device=accelerator.device) for k in ("loss", "acc", "mse_w", "mse_l", "ref")}
        for j, idx in enumerate(micro):
            draws = [draw_example(seed, step, i, latent_shape, num_t, p) for i in idx]
            sync = accelerator.no_sync(unet) if j < len(micro) - 1 else contextlib.nullcontext()
            with sync:
                r = micro_batch_losses(accelerator, unet, pipe, [batch[i] for i in idx], draws, p.beta)
                # DDP averages gradients over processes, hence * world: the result is the global batch mean.
                accelerator.backward(r["losses"].sum() / p.batch_size * world)
            sums["loss"] += r["losses"].detach().sum()
            sums["acc"] += implicit_accuracy(r["logits"]) * len(idx)
            sums["mse_w"] += r["mse_w"].sum()
            sums["mse_l"] += r["mse_l"].sum()
            sums["ref"] += (r["ref_w"] + r["ref_l"]).sum() / 2
        grad_norm = accelerator.clip_grad_norm_(params, p.max_grad_norm)  # pre-clip norm; the LoRA grads are clipped
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_s = time.perf_counter() - t0
        state["step"] = step + 1
        state["train_seconds"] += step_s
        state["ties_skipped"] += ties

        totals = {k: accelerator.reduce(v, "sum").item() / p.batch_size for k, v in sums.items()}
        record = {"step": state["step"], "loss": totals["loss"], "implicit_acc": totals["acc"],
                  "model_mse_w": totals["mse_w"], "model_mse_l": totals["mse_l"], "ref_mse": totals["ref"],
                  "grad_norm": float(grad_norm), "lr": optimizer.param_groups[0]["lr"], "epoch": stream.epoch,
                  "step_s": round(step_s, 4), "train_seconds": round(state["train_seconds"], 2)}
        if p.eval_every and (state["step"] % p.eval_every == 0 or state["step"] == p.steps):
            if main:
                unet.eval()
                record.update({f"heldout_{k}": v for k, v in heldout_rating(pipe).items()})
                unet.train()
            accelerator.wait_for_everyone()
        if main:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['implicit_acc']:.2f}", epoch=stream.epoch)
        bar.update(1)

        if max_minutes is not None:  # the main process decides for everyone (clocks differ)
            flag = torch.tensor([float(state["train_seconds"] > 60 * max_minutes)], device=accelerator.device)
            out_of_time = bool(broadcast(flag).item())
        stopping = stop_after is not None and state["step"] - started_here >= stop_after
        if state["step"] % p.save_every == 0 or stopping or out_of_time:
            save_checkpoint(state["step"])
        if snapshot_every and state["step"] % snapshot_every == 0 and main:
            save_snapshot(pipe, accelerator.unwrap_model(unet), out, state["step"], state["train_seconds"])
        if stopping or out_of_time:
            break
    bar.close()
    if main:
        print(data_set.stats.report(), file=sys.stderr)

    finished = state["step"] >= p.steps or out_of_time
    accelerator.wait_for_everyone()
    if finished and main:
        # `seconds`: the training steps only, summed over resumed runs (what the budget counts); `wall_seconds`: this
        # run's loop including held-out evaluation and checkpoints (what `train_spo`'s budget counts).
        info = {"steps": state["step"], "planned_steps": p.steps, "processes": world,
                "seconds": round(state["train_seconds"], 1),
                "wall_seconds": round(time.perf_counter() - loop_started, 1), "max_minutes": max_minutes,
                "stopped_by_time_budget": out_of_time, "data": str(data), "pairs_seen": state["step"] * p.batch_size,
                "ties_skipped": state["ties_skipped"],
                "data_stats": {"read": data_set.stats.read, "skipped": dict(data_set.stats.skipped)}}
        (out / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
        from diffusers import StableDiffusionXLPipeline

        kind = "sdxl" if isinstance(pipe, StableDiffusionXLPipeline) else "sd15"
        save_result(pipe, accelerator.unwrap_model(unet), out, False, base, kind,
                    {"method": "diffusion-dpo", "preset": preset, "seed": seed, **asdict(p)}, "dpo_config.json")
        from .plots import save_curves

        save_curves(log_path, out / "dpo_curves.png", keys=("loss", "implicit_acc", "heldout_quality"),
                    smooth=max(1, min(25, p.steps // 20)))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


if __name__ == "__main__":  # `accelerate launch -m training.train_dpo --data ... --model ... --out ...`
    from service.cli import main as spo_main

    sys.exit(spo_main(["train", "dpo", *sys.argv[1:]]))
