"""SPO fine-tuning (SPO.md §2-§4), one file, top to bottom: presets, scorers, the loop, checkpoints, outputs.

Each iteration: (1) sample a batch of prompts with the step-wise resampler using the current policy, (2) the
step-aware preference model scores candidates mid-trajectory and `compare` keeps clear win/lose pairs, (3) a fixed
number of optimizer steps on those pairs with the SPO loss, the reference being the same UNet with its LoRA adapter
disabled. The reference implementation's defects (SPO.md §4) are fixed here: clipping really clips, the previous
timestep comes from the scheduler's list, log-probs are fp32, no UNet copy for the reference, every process saves its
state, any fine-tune type saves, a fixed number of optimizer steps per batch, seeds independent of world size.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .conditioning import PromptBatch, cfg_eps, encode_prompts
from .latents import decode_to_uint8, decode_to_unit
from .sampler import StepPairs, ddim_lookahead, spo_sample
from .shapes import HELD_OUT, TRAIN_COMBOS, caption_for
from .spo import ddim_step_log_prob, spo_loss


@dataclass(frozen=True)
class SPOPreset:
    kind: str  # "sd15" | "sdxl"
    lora_rank: int = 4
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    lr: float = 6e-5
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    prompts_per_batch: int = 10  # per process
    epochs: int = 10
    num_steps: int = 20
    guidance: float = 5.0
    eta: float = 1.0
    num_candidates: int = 4
    divert_start_step: int = 4
    inner_steps: int = 0
    threshold: float = 0.3
    beta: float = 10.0
    clip_eps: float = 0.1
    pairs_per_step: int = 10  # pairs in one optimizer step's minibatch
    optimizer_steps_per_batch: int = 1  # fixed, whatever the number of kept pairs
    grad_accumulation: int = 1
    mixed_precision: str = "fp16"
    gradient_checkpointing: bool = False
    eval_every: int = 50  # batches; held-out rater evaluation (shapes world only)
    checkpoint_every: int = 100


PRESETS: dict[str, SPOPreset] = {
    # SPO.md §3: reference SD 1.5 config (4 GPUs x 10 prompts, 10 epochs over 4k prompts).
    "sd15": SPOPreset(kind="sd15"),
    # SDXL: rank 64, lr 1e-5, batch 2 with accumulation 2, K = 2, threshold 0.4, inner steps 3 (fp16-fix VAE).
    "sdxl": SPOPreset(kind="sdxl", lora_rank=64, lr=1e-5, prompts_per_batch=2, grad_accumulation=2,
                      num_candidates=2, threshold=0.4, inner_steps=3, pairs_per_step=2, gradient_checkpointing=True),
    # spo-tiny on 2 CPU cores. lr: the reference's 6e-5; at 3e-4 the policy/reference ratios blew up after ~35 batches
    # and the images broke (benchmarks/results/spo-tiny-rater-2026-11-26).
    "tiny": SPOPreset(kind="sd15", lr=6e-5, prompts_per_batch=8, epochs=6, pairs_per_step=16,
                      optimizer_steps_per_batch=2, mixed_precision="no", eval_every=10, checkpoint_every=10),
}
PRESETS["tiny-xl"] = replace(PRESETS["tiny"], kind="sdxl", num_candidates=2, threshold=0.4, inner_steps=3)
PRESETS["smoke"] = replace(PRESETS["tiny"], prompts_per_batch=2, epochs=1, num_steps=6, divert_start_step=2,
                           pairs_per_step=4, eval_every=0, checkpoint_every=2, threshold=0.0)


# -- Scorers: what the sampler calls to judge candidates from their predicted clean latents. -----------------------

ScoreFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def spm_scorer(vae, spm, prompts: list[str], batch: int = 64) -> ScoreFn:
    """Decode each candidate's predicted x0 and score it with the step-aware preference model at its timestep."""

    @torch.no_grad()
    def score(x0: torch.Tensor, prompt_index: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, len(x0), batch):
            images = decode_to_unit(vae, x0[i:i + batch])
            texts = [prompts[j] for j in prompt_index[i:i + batch].tolist()]
            out.append(spm.score(images, texts, t[i:i + batch]).float())
        return torch.cat(out)

    return score


def rater_scorer(vae, prompts: list[str], scale: float = 20.0) -> ScoreFn:
    """Ablation / testing: the shapes-world rater on decoded x0 (a step-unaware scorer), scaled to logit units."""
    from .rater import rate

    @torch.no_grad()
    def score(x0: torch.Tensor, prompt_index: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        images = decode_to_uint8(vae, x0)
        return torch.tensor([scale * rate(img, prompts[j]).total for img, j in zip(images, prompt_index.tolist(),
                                                                                  strict=True)])

    return score


def lookahead_rater_scorer(pipe, unet, prompts: list[str], guidance: float, steps: int = 4,
                           scale: float = 100.0) -> ScoreFn:
    """Oracle ablation: a candidate's worth measured, not guessed. Each candidate latent is finished with a short
    deterministic DDIM run (eta = 0, `steps` UNet calls, the current policy) and the rater scores the final image.

    Not a preference model: it separates "the SPO loop cannot improve this model" from "the scorer is blind"
    (benchmarks/step_signal.py shows the rater on x0 previews is blind before the last steps). Costs `steps` extra
    UNet calls per comparison.
    """
    batch = encode_prompts(pipe, prompts)
    rate_final = rater_scorer(pipe.vae, prompts, scale)

    def eps_fn(x, t, idx):
        return cfg_eps(unet, x, t, batch, idx, guidance)

    @torch.no_grad()
    def score(latents: torch.Tensor, prompt_index: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        final, _ = ddim_lookahead(pipe.scheduler, eps_fn, latents, int(t.reshape(-1)[0]), prompt_index, steps)
        return rate_final(final, prompt_index, t)

    score.scores_latents = True  # the sampler passes the candidates' noisy latents, not their x0 previews
    return score


# -- Model plumbing. ------------------------------------------------------------------------------------------------


def pair_log_probs(unet, scheduler, pairs: StepPairs, batch: PromptBatch, p: SPOPreset) -> tuple[torch.Tensor, ...]:
    """log p(x_prev | x_t) of win and lose transitions under the current UNet (win and lose in one call)."""
    x = torch.cat([pairs.x_t_win, pairs.x_t_lose])
    t = torch.cat([pairs.timestep, pairs.timestep])
    idx = torch.cat([pairs.prompt_index, pairs.prompt_index])
    eps = cfg_eps(unet, x, t, batch, idx, p.guidance)
    prev = torch.cat([pairs.x_prev_win, pairs.x_prev_lose])
    logp = ddim_step_log_prob(scheduler, eps, t, x, prev, p.eta)
    return logp.chunk(2)


def add_lora(unet, p: SPOPreset, weight_dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    """Freeze the UNet (in `weight_dtype`: half precision on GPU, as diffusers' LoRA scripts) and add a LoRA that
    trains in fp32; returns the trainable parameters as a list (clipping must see them after the optimizer)."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.to(dtype=weight_dtype)
    unet.add_adapter(LoraConfig(r=p.lora_rank, lora_alpha=p.lora_rank, init_lora_weights="gaussian",
                                target_modules=list(p.lora_targets)))
    params = [q for q in unet.parameters() if q.requires_grad]
    for q in params:
        q.data = q.data.float()
    return params


class reference_model:  # noqa: N801 - used as a context manager, reads like a phrase
    """Within this block the UNet is the frozen reference: LoRA adapters disabled (no second UNet in memory)."""

    def __init__(self, unet, lora: bool, ref_unet=None) -> None:
        self.unet, self.lora, self.ref_unet = unet, lora, ref_unet

    def __enter__(self):
        if self.lora:
            self.unet.disable_adapters()
            return self.unet
        return self.ref_unet

    def __exit__(self, *exc) -> None:
        if self.lora:
            self.unet.enable_adapters()


# -- Training. ------------------------------------------------------------------------------------------------------


def sample_step_pairs(accelerator, pipe, unet, p: SPOPreset, score_fn: ScoreFn, prompts: list[str],
                      latents: torch.Tensor, generators: list[torch.Generator]):
    """Step 1 of an SPO iteration: sample with the current policy and the step-wise resampler.

    Returns the sampler's result, the prompts' conditioning and the seconds spent sampling vs scoring.
    """
    started = time.perf_counter()
    unet.eval()
    pb = encode_prompts(pipe, prompts)
    spent = [0.0]

    def timed_score(x0, idx, t):
        s0 = time.perf_counter()
        scores = score_fn(x0, idx, t)
        spent[0] += time.perf_counter() - s0
        return scores

    timed_score.scores_latents = getattr(score_fn, "scores_latents", False)

    def eps_fn(x, t, idx):
        return cfg_eps(unet, x, t, pb, idx, p.guidance)

    with torch.no_grad(), accelerator.autocast():
        result = spo_sample(pipe.scheduler, eps_fn, timed_score, latents * pipe.scheduler.init_noise_sigma,
                            num_steps=p.num_steps, num_candidates=p.num_candidates,
                            divert_start_step=p.divert_start_step, inner_steps=p.inner_steps, threshold=p.threshold,
                            eta=p.eta, generator=generators)
    return result, pb, {"scoring_s": spent[0], "sampling_s": time.perf_counter() - started - spent[0]}


def train_on_pairs(accelerator, unet, optimizer, params: list, scheduler, pairs: StepPairs, pb: PromptBatch,
                   p: SPOPreset, generator: torch.Generator, ref_unet=None):
    """Step 2: a fixed number of optimizer steps on minibatches drawn from the kept pairs.

    The reference is the same UNet with its LoRA disabled, or `ref_unet` for a full fine-tune.
    Returns the losses and the win/lose probability ratios (policy / reference) of every step.
    """
    losses, ratios_w, ratios_l = [], [], []
    unet.train()
    for _ in range(p.optimizer_steps_per_batch):
        sel = torch.randint(len(pairs), (p.pairs_per_step,), generator=generator).to(pairs.timestep.device)
        mini = StepPairs(*(getattr(pairs, f)[sel] for f in StepPairs.__dataclass_fields__))
        with accelerator.accumulate(unet):
            with accelerator.autocast():
                logp_w, logp_l = pair_log_probs(unet, scheduler, mini, pb, p)
                with torch.no_grad(), reference_model(accelerator.unwrap_model(unet), ref_unet is None,
                                                      ref_unet) as ref:
                    ref_w, ref_l = pair_log_probs(ref, scheduler, mini, pb, p)
            loss = spo_loss(logp_w, ref_w, logp_l, ref_l, p.beta, p.clip_eps)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, p.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        ratios_w.append(torch.exp(logp_w - ref_w).detach().float())
        ratios_l.append(torch.exp(logp_l - ref_l).detach().float())
    return losses, ratios_w, ratios_l


def _generators(seed: int, epoch: int, indices: list[int], salt: int) -> list[torch.Generator]:
    """One generator per prompt, from (seed, epoch, global prompt index): independent of world size and batching."""
    def mix(i: int) -> int:
        digest = hashlib.blake2b(f"{seed}/{epoch}/{i}/{salt}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") & (2**63 - 1)

    return [torch.Generator().manual_seed(mix(i)) for i in indices]


def _prompt_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


@torch.no_grad()
def heldout_rating(pipe, n: int = 20, seed: int = 777) -> dict[str, float]:
    """Mean rater parts on held-out prompts with fixed seeds (DDIM 20, CFG 5): the curve to watch during training."""
    from .evaluate import EvalItem, generate_and_rate, summarise

    items = [EvalItem("heldout", caption_for(*HELD_OUT[i % len(HELD_OUT)]), seed + i) for i in range(n)]
    _, records = generate_and_rate(pipe, items, batch=n, desc="held-out eval")
    s = summarise(records)["heldout"]
    return {"quality": s["quality"], "alignment": s["alignment"], "all_right": s["all_right"]}


def train_spo(
    preset: str,
    base: Path,
    out: Path,
    *,
    spm: Path | None = None,
    scorer: str = "spm",
    prompts: list[str] | None = None,
    seed: int = 42,
    full_unet: bool = False,
    resume: bool = False,
    max_batches: int | None = None,
    max_minutes: float | None = None,
    snapshot_every: int = 0,
    overrides: dict | None = None,
) -> Path:
    """Fine-tune `base` with SPO; writes a diffusers LoRA (or UNet folder) and a served-model manifest entry.

    `max_minutes` budgets the training compute (sampling, scoring, optimizer steps; summed over resumed runs), not
    held-out evaluation or snapshots; `snapshot_every` keeps the weights every N batches in OUT/snapshots/.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from service.pipeline import load_pipeline

    from .plots import save_curves

    if preset not in PRESETS:
        raise ValueError(f"--preset must be one of {sorted(PRESETS)}, got {preset!r}")
    p = replace(PRESETS[preset], **(overrides or {}))
    out = Path(out)
    ckpt_dir = out / "checkpoint"
    cpu = not torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision="no" if cpu else p.mixed_precision,
                              gradient_accumulation_steps=p.grad_accumulation, cpu=cpu)
    set_seed(seed)  # the same on every process: sampling noise is per prompt (below), not per device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    pipe = load_pipeline(str(base), device=accelerator.device)
    pipe.vae.to(dtype=weight_dtype)
    for enc in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if enc is not None:
            enc.requires_grad_(False).to(dtype=weight_dtype)
    unet = pipe.unet
    ref_unet = None
    if full_unet:
        import copy

        ref_unet = copy.deepcopy(unet).requires_grad_(False).to(dtype=weight_dtype)
        unet.requires_grad_(True)
    else:
        add_lora(unet, p, weight_dtype)
    if p.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = [q for q in unet.parameters() if q.requires_grad]  # a list: clipping must see them after the optimizer
    optimizer = torch.optim.AdamW(params, lr=p.lr, betas=p.adam_betas, weight_decay=p.weight_decay, eps=p.adam_eps)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    scheduler = pipe.scheduler

    prompts = prompts or [caption_for(*c) for c in TRAIN_COMBOS]
    if scorer == "spm":
        if spm is None:
            raise ValueError("--spm is required with --scorer spm")
        from .spm import StepAwarePreferenceModel

        model = StepAwarePreferenceModel.from_pretrained(spm).to(accelerator.device).eval()
        score_fn_for = lambda batch_prompts: spm_scorer(pipe.vae, model, batch_prompts)  # noqa: E731
    elif scorer == "rater":
        score_fn_for = lambda batch_prompts: rater_scorer(pipe.vae, batch_prompts)  # noqa: E731
    elif scorer == "lookahead":
        score_fn_for = lambda batch_prompts: lookahead_rater_scorer(pipe, unet, batch_prompts, p.guidance)  # noqa: E731
    else:
        raise ValueError(f"--scorer must be spm, rater or lookahead, got {scorer!r}")

    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = p.prompts_per_batch * world
    batches_per_epoch = max(1, len(prompts) // global_batch)
    total_batches = p.epochs * batches_per_epoch
    if max_batches is not None:
        total_batches = min(total_batches, max_batches)

    state = {"batch": 0, "last_pairs": None, "prior_seconds": 0.0}  # prior: training seconds of resumed runs
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "spo_log.jsonl"
    if resume and (ckpt_dir / "progress.json").is_file():
        accelerator.load_state(str(ckpt_dir))
        progress = json.loads((ckpt_dir / "progress.json").read_text())
        state["batch"], state["prior_seconds"] = progress["batch"], progress.get("train_seconds", 0.0)
        state["last_pairs"] = torch.load(ckpt_dir / f"last_pairs_{rank}.pt", weights_only=False)
        lines = log_path.read_text().splitlines() if log_path.exists() else []
        log_path.write_text("".join(x + "\n" for x in lines if json.loads(x)["batch"] < state["batch"]))
    elif log_path.exists():
        log_path.unlink()

    def log(record: dict) -> None:
        if accelerator.is_main_process:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    bar = tqdm(total=total_batches, initial=state["batch"], desc="spo", dynamic_ncols=True,
               disable=not accelerator.is_main_process)
    latent_shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    started_at, untimed = time.time(), 0.0  # untimed: held-out evaluation and snapshots, not training compute

    def train_seconds() -> float:
        return state["prior_seconds"] + time.time() - started_at - untimed

    while state["batch"] < total_batches:
        if max_minutes is not None and train_seconds() > 60 * max_minutes:
            tqdm.write(f"time budget of {max_minutes} min reached after {state['batch']} batches")
            break  # a wall-clock budget (equal-compute comparisons): the LoRA so far is the result
        b = state["batch"]
        epoch, in_epoch = divmod(b, batches_per_epoch)
        order = _prompt_order(len(prompts), seed, epoch)
        chunk = order[in_epoch * global_batch:(in_epoch + 1) * global_batch]
        mine = chunk[rank::world]  # this process's prompts, by global index
        batch_prompts = [prompts[i] for i in mine]

        # 1. Sample with the current policy, scoring candidates along the way.
        latents = torch.stack([torch.randn(latent_shape, generator=g) for g in _generators(seed, epoch, mine, 0)])
        result, pb, timings = sample_step_pairs(accelerator, pipe, unet, p, score_fn_for(batch_prompts),
                                                batch_prompts, latents.to(accelerator.device),
                                                _generators(seed, epoch, mine, 1))

        # 2. A fixed number of optimizer steps on this batch's kept pairs (the previous batch's if none were kept).
        started = time.perf_counter()
        if result.pairs is not None:
            state["last_pairs"] = (result.pairs, pb)
        losses, ratios_w, ratios_l = [], [], []
        if state["last_pairs"] is not None:
            losses, ratios_w, ratios_l = train_on_pairs(accelerator, unet, optimizer, params, scheduler,
                                                        *state["last_pairs"], p, _generators(seed, epoch, [b], 2)[0],
                                                        ref_unet)
        timings["training_s"] = time.perf_counter() - started

        rw = torch.cat(ratios_w) if ratios_w else torch.ones(1)
        rl = torch.cat(ratios_l) if ratios_l else torch.ones(1)
        record = {"batch": b, "epoch": epoch, "loss": float(np.mean(losses)) if losses else math.nan,
                  "keep_rate": result.keep_rate, "pairs": len(result.pairs) if result.pairs else 0,
                  "ratio_win_mean": rw.mean().item(), "ratio_lose_mean": rl.mean().item(),
                  "ratio_abs_dev_max": max((rw - 1).abs().max().item(), (rl - 1).abs().max().item()), **timings}
        state["batch"] += 1
        if p.eval_every and (state["batch"] % p.eval_every == 0 or state["batch"] == total_batches):
            unet.eval()
            eval_started = time.time()
            record.update({f"heldout_{k}": v for k, v in heldout_rating(pipe).items()})
            untimed += time.time() - eval_started
        log(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", keep=f"{result.keep_rate:.2f}",
                        ratio=f"{record['ratio_win_mean']:.3f}/{record['ratio_lose_mean']:.3f}")
        bar.update(1)
        if p.checkpoint_every and state["batch"] % p.checkpoint_every == 0:
            accelerator.wait_for_everyone()
            accelerator.save_state(str(ckpt_dir))  # every process saves its own state (no main-only hang)
            torch.save(state["last_pairs"], ckpt_dir / f"last_pairs_{rank}.pt")
            if accelerator.is_main_process:
                (ckpt_dir / "progress.json").write_text(json.dumps({"batch": state["batch"],
                                                                    "train_seconds": train_seconds()}))
        if snapshot_every and state["batch"] % snapshot_every == 0:
            snapshot_started = time.time()
            if accelerator.is_main_process:
                save_snapshot(pipe, accelerator.unwrap_model(unet), out, state["batch"], train_seconds(), full_unet)
            accelerator.wait_for_everyone()
            untimed += time.time() - snapshot_started
    bar.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_result(pipe, accelerator.unwrap_model(unet), out, full_unet, base, p.kind,
                    {"method": "spo", "preset": preset, "seed": seed, "scorer": scorer,
                     "spm": str(spm) if spm else None, **asdict(p)})
        (out / "train_info.json").write_text(json.dumps(
            {"batches": state["batch"], "planned_batches": total_batches, "processes": world,
             "seconds": round(train_seconds(), 1),
             "wall_seconds": round(time.time() - started_at, 1), "max_minutes": max_minutes,
             "stopped_by_time_budget": state["batch"] < total_batches}, indent=2) + "\n")
        keys = ("loss", "keep_rate", "ratio_win_mean", "ratio_lose_mean", "heldout_quality")
        if log_path.exists():
            save_curves(log_path, out / "spo_curves.png", keys=keys, smooth=5, step_key="batch")
    accelerator.end_training()
    return out


def save_result(pipe, unet, out: Path, full_unet: bool, base: Path, kind: str, config: dict,
                config_name: str = "spo_config.json") -> None:
    """A diffusers-format LoRA (or a UNet folder), the served-model manifest entry that serves it, and the run's
    config. Shared by the SPO and Diffusion-DPO trainers so that both produce the same, servable outputs."""
    import yaml

    name = out.name
    save_weights(pipe, unet, out, full_unet)
    if full_unet:
        entry = {"name": name, "kind": kind, "base": str(base), "unet": str(out / "unet")}
    else:
        entry = {"name": name, "kind": kind, "base": str(base), "lora": str(out), "lora_scale": 1.0}
    (out / config_name).write_text(json.dumps(config, indent=2) + "\n")
    (out / "manifest_entry.yaml").write_text(yaml.safe_dump({"models": [entry]}, sort_keys=False))


def save_weights(pipe, unet, folder: Path, full_unet: bool) -> None:
    """The trained weights alone: a diffusers LoRA (`pipe.load_lora_weights(folder)`) or `folder/unet`."""
    if full_unet:
        unet.save_pretrained(folder / "unet")
        return
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    type(pipe).save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)


def save_snapshot(pipe, unet, out: Path, step: int, train_seconds: float, full_unet: bool = False) -> Path:
    """The weights as they are after `step` with the training seconds spent to get there: the points of a
    gain-versus-compute curve (`benchmarks/compute_to_gain.py`)."""
    folder = out / "snapshots" / f"{step:06d}"
    save_weights(pipe, unet, folder, full_unet)
    (folder / "snapshot.json").write_text(json.dumps({"step": step, "train_seconds": round(train_seconds, 1)}) + "\n")
    return folder


if __name__ == "__main__":  # `accelerate launch -m training.train_spo --preset tiny --spm ... --out ...`
    import sys

    from service.cli import main as spo_main

    sys.exit(spo_main(["train", "spo", *sys.argv[1:]]))
