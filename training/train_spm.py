"""Train the step-aware preference model (shared/SPO.md §1) on Pick-a-Pic-format pairs.

Read top to bottom: presets, what the SPM sees at step t, the loss, evaluation, the training loop (accelerate,
checkpoint/resume), and the entry point for `accelerate launch -m training.train_spm ...`.

Per pair and optimizer step: t ~ U{0..999}; both images are VAE-encoded and noised with the *same* noise at the
*same* t; one classifier-free-guided UNet pass (scale 5) gives the DDIM prediction of x0, which is decoded and
scored by the SPM at t. Step pairs (`spo data step-pairs`) already are such previews, of sibling candidates at a
step of SPO's sampler: they are scored as they are, at their recorded step. The loss is PickScore's cross-entropy
over the two image logits with the soft labels.

Reproducibility: every random draw of an example (t, noise) comes from a generator keyed by (seed, step, index of
the example in the global batch), the data order is a function of (seed, epoch), and the global batch is the same
set of pairs whatever the number of processes. So a run resumed from a checkpoint repeats the uninterrupted run's
loss sequence, and results do not depend on the number of GPUs (SPO.md §4.7).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .conditioning import PromptBatch, cfg_eps, encode_prompts
from .latents import decode_to_unit
from .preference_data import (
    CLEAR_GAP,
    PreferenceData,
    PreferencePair,
    generate_pairs,
    load_pairs,
    plan_pairs,
)
from .rater import rate
from .spm import StepAwarePreferenceModel, build_spm
from .spo import predicted_x0
from .step_pairs import generate_step_pairs, plan_step_pairs, timestep_buckets

EVAL_TIMESTEPS = (0, 251, 501, 751, 951)  # the set; the paper reports 701 instead of 751
EVAL_SEED = 10**9  # "step" key of evaluation examples, outside any training step


# ----------------------------------------------------------------------------------------------------------- presets

@dataclass(frozen=True)
class SPMPreset:
    clip: str  # "tiny" (from scratch) | "vit-h-14" (PickScore_v1's architecture, initialised from --init)
    batch_size: int  # pairs per optimizer step, summed over all processes
    micro_batch: int  # pairs per process per forward/backward (gradient accumulation makes up the rest)
    lr: float
    weight_decay: float
    warmup: int
    steps: int
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    guidance: float = 5.0  # CFG scale of the UNet pass that predicts x0
    train_timesteps: int = 0  # t ~ U{0..train_timesteps-1}; 0: the diffusion model's whole range (the reference)
    mixed_precision: str = "bf16"  # used on GPU only
    gradient_checkpointing: bool = False
    eval_every: int = 500
    eval_pairs: int = 500
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10


PRESETS: dict[str, SPMPreset] = {
    # The reference (SPO.md §1): 16 pairs/GPU x 4 GPUs, AdamW wd 0.3, 500 warm-up steps, then constant.
    "sd15": SPMPreset(clip="vit-h-14", batch_size=64, micro_batch=16, lr=3e-6, weight_decay=0.3, warmup=500,
                      steps=8000, gradient_checkpointing=True),
    "sdxl": SPMPreset(clip="vit-h-14", batch_size=64, micro_batch=16, lr=1e-6, weight_decay=0.3, warmup=500,
                      steps=7000, gradient_checkpointing=True),
    # The shapes world on CPU: a tiny CLIP, so a larger learning rate and a milder decay. From scratch on spo-tiny's
    # pairs it stays near loss ln 2 (issue 5: most pairs differ in details spo-tiny's VAE round trip erases; the rater
    # reads back 78% of its own preferences from t = 0 reconstructions). Start it like the paper's SPM starts from
    # PickScore: `spo data renders` + `--clean-images`, then `--init` (models/spo-tiny-spm/README.md).
    "tiny": SPMPreset(clip="tiny", batch_size=32, micro_batch=32, lr=5e-4, weight_decay=0.05, warmup=200,
                      steps=4000, eval_every=500, eval_pairs=300, save_every=250),
}


def lr_factor(step: int, warmup: int) -> float:
    """Linear warm-up, then constant (PickScore's schedule)."""
    return min(1.0, (step + 1) / max(1, warmup))


def example_generator(seed: int, step: int, index: int) -> torch.Generator:
    """The random source of one example, keyed by (seed, step, index in the global batch)."""
    state = np.random.SeedSequence([seed, step, index]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


# ------------------------------------------------------------------------------------- what the SPM sees at step t

class StepImages:
    """Clean pair images -> the decoded DDIM x0 prediction at step t, as SPO's sampler will show them to the SPM.

    Works for SD 1.5 and SDXL pipelines (SDXL's pooled text embeddings and size ids go in `added_cond_kwargs`),
    and for epsilon, v and sample prediction. The VAE stays in float32 (SDXL's VAE overflows in float16).
    """

    def __init__(self, pipe, guidance: float = 5.0, cache_size: int = 4096):
        self.pipe, self.guidance, self.cache_size = pipe, guidance, cache_size
        self.vae, self.unet = pipe.vae, pipe.unet
        self.alphas = pipe.scheduler.alphas_cumprod.float()
        self.scaling = self.vae.config.scaling_factor
        self.shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        self._text: dict[str, tuple[torch.Tensor, ...]] = {}
        size = self.unet.config.sample_size
        self.latent_shape = (self.unet.config.in_channels, size, size)
        self.image_size = size * pipe.vae_scale_factor

    def prompt_batch(self, captions: list[str]) -> PromptBatch:
        """Conditioning of `captions` (cached per caption: the text encoders are frozen)."""
        missing = sorted({c for c in captions if c not in self._text})
        if len(self._text) + len(missing) > self.cache_size:
            self._text.clear()  # any eviction policy is correct; the cache only saves time
        if missing:
            pb = encode_prompts(self.pipe, missing)
            for i, caption in enumerate(missing):
                self._text[caption] = (pb.cond[i], pb.uncond[i], {k: v[i] for k, v in pb.added_cond.items()},
                                       {k: v[i] for k, v in pb.added_uncond.items()})
        rows = [self._text[c] for c in captions]
        keys = rows[0][2].keys()
        return PromptBatch(list(captions), torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]),
                           {k: torch.stack([r[2][k] for r in rows]) for k in keys},
                           {k: torch.stack([r[3][k] for r in rows]) for k in keys})

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, captions: list[str], t: torch.Tensor, noise: torch.Tensor
                 ) -> torch.Tensor:
        """images: [images_0; images_1] in [-1, 1], (k*B, 3, H, W); captions, t, noise: one per pair (B).

        Returns the decoded x0 predictions in [0, 1] (the SPM's input range), same layout, float32.
        """
        device = self.unet.device
        k = images.shape[0] // len(captions)
        latents = (self.vae.encode(images.to(device, self.vae.dtype)).latent_dist.mean.float() - self.shift)
        latents = latents * self.scaling
        t_all = t.to(device).repeat(k)
        a = self.alphas.to(device)[t_all].view(-1, 1, 1, 1)
        x_t = a.sqrt() * latents + (1 - a).sqrt() * noise.to(device).float().repeat(k, 1, 1, 1)
        pb = self.prompt_batch(list(captions) * k)
        pred = cfg_eps(self.unet, x_t, t_all, pb, torch.arange(len(pb.prompts), device=device), self.guidance)
        x0 = predicted_x0(self.pipe.scheduler, pred, t_all, x_t)
        return decode_to_unit(self.vae, x0)


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def spm_inputs(pairs: list[PreferencePair], step_images: StepImages | None, t: torch.Tensor | None,
               noise: torch.Tensor | None, clean_images: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """What the SPM scores for a batch of pairs ([images_0; images_1] in [0, 1]) and at which t (one per pair).

    Step pairs (training/step_pairs.py) already are what SPO's sampler shows at their recorded step: as they are.
    `clean_images`: as they are at t = 0. Otherwise SPO.md §1's route: the same noise at the same t for both
    images, one UNet pass, the decoded x0 prediction.
    """
    images = to_tensor([q.image_0 for q in pairs] + [q.image_1 for q in pairs])
    recorded = [q.timestep for q in pairs]
    if any(r is not None for r in recorded):
        if clean_images or None in recorded:
            raise ValueError("step pairs (pairs with a timestep) are already previews at their step: they cannot be "
                             "mixed with clean-image pairs, nor trained with --clean-images")
        return (images + 1.0) / 2.0, torch.tensor(recorded, dtype=torch.long)
    if clean_images:
        return (images + 1.0) / 2.0, torch.zeros(len(pairs), dtype=torch.long)
    return step_images(images, [q.caption for q in pairs], t, noise), t


def draw_t_and_noise(seed: int, step: int, indices: list[int], latent_shape: tuple[int, ...],
                     num_timesteps: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    ts, noises = [], []
    for i in indices:
        g = example_generator(seed, step, i)
        ts.append(torch.randint(0, num_timesteps, (1,), generator=g))
        noises.append(torch.randn(latent_shape, generator=g))
    return torch.cat(ts), torch.stack(noises)


# ----------------------------------------------------------------------------------------------------------- loss

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


# ----------------------------------------------------------------------------------------------------------- eval

Scorer = Callable[[torch.Tensor, list[str], torch.Tensor], torch.Tensor]


def rater_on_previews(images: torch.Tensor, captions: list[str], timesteps: torch.Tensor) -> torch.Tensor:
    """The rater's total on the decoded step-t previews ([images_0; images_1] in [0, 1], one caption per pair): the
    step-unaware scorer an SPM has to beat (SPO's ablation "plain PickScore as step scorer")."""
    pixels = (images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255.0).round()
    return torch.tensor([rate(a, c).total for a, c in zip(pixels, list(captions) * 2, strict=True)])


@torch.no_grad()
def pairwise_correct(scorer: StepAwarePreferenceModel | Scorer, step_images: StepImages,
                     pairs: list[PreferencePair], timesteps: tuple[int, ...] = EVAL_TIMESTEPS, seed: int = 0,
                     batch: int = 32, progress: bool = False) -> dict[int, np.ndarray]:
    """Per t, whether the scorer (an SPM, or a function like `rater_on_previews`) scores the reference's preferred
    image higher, for each pair (ties must be removed).

    Each pair keeps the same noise at every t, so the columns differ only by how far the image is denoised.
    """
    correct: dict[int, list[bool]] = {t: [] for t in timesteps}
    spm = scorer if isinstance(scorer, StepAwarePreferenceModel) else None
    was_training = spm is not None and spm.training
    if spm is not None:
        spm.eval()
    bar = tqdm(total=len(pairs) * len(timesteps), desc="eval", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(pairs), batch):
        chunk = pairs[start:start + batch]
        images = to_tensor([p.image_0 for p in chunk] + [p.image_1 for p in chunk])
        captions = [p.caption for p in chunk]
        _, noise = draw_t_and_noise(seed, EVAL_SEED, list(range(start, start + len(chunk))), step_images.latent_shape)
        input_ids = spm.tokenize(captions) if spm is not None else None
        want = torch.tensor([p.preference > 0.5 for p in chunk])
        for t in timesteps:
            tt = torch.full((len(chunk),), t, dtype=torch.long)
            x = step_images(images, captions, tt, noise)
            scores = (spm(x.to(spm.device), input_ids, tt.to(spm.device)) if spm is not None
                      else scorer(x, captions, tt))
            s0, s1 = scores.float().cpu().chunk(2)
            correct[t] += ((s0 > s1) == want).tolist()
            bar.update(len(chunk))
    bar.close()
    if spm is not None:
        spm.train(was_training)
    return {t: np.array(v, dtype=bool) for t, v in correct.items()}


@torch.no_grad()
def recorded_correct(scorer: StepAwarePreferenceModel | Scorer, pairs: list[PreferencePair], batch: int = 64
                     ) -> np.ndarray:
    """Per step pair (ties removed), whether the scorer prefers the reference's image, scored at the pair's step."""
    spm = scorer if isinstance(scorer, StepAwarePreferenceModel) else None
    was_training = spm is not None and spm.training
    if spm is not None:
        spm.eval()
    correct: list[bool] = []
    for start in range(0, len(pairs), batch):
        chunk = pairs[start:start + batch]
        x, t = spm_inputs(chunk, None, None, None)
        captions = [q.caption for q in chunk]
        scores = (spm(x.to(spm.device), spm.tokenize(captions), t.to(spm.device)) if spm is not None
                  else scorer(x, captions, t))
        s0, s1 = scores.float().cpu().chunk(2)
        correct += ((s0 > s1) == torch.tensor([q.preference > 0.5 for q in chunk])).tolist()
    if spm is not None:
        spm.train(was_training)
    return np.array(correct, dtype=bool)


def heldout_pairs(pipe, n: int, seed: int = 4321, guidance: tuple[float, ...] = (5.0,),
                  steps: tuple[int, ...] = (20,), progress: bool = True) -> list[PreferencePair]:
    """Fresh shapes-world pairs on held-out prompts, with the rater's noiseless preference as reference."""
    plans = plan_pairs(n, seed, "heldout", guidance, steps)
    return [g.to_pair() for g in generate_pairs(pipe, plans, progress=progress)]


# ----------------------------------------------------------------------------------------------------------- loop

class PairStream:
    """Endless epochs over a `PreferenceData`; (epoch, position) is all a checkpoint needs to continue exactly."""

    def __init__(self, data: PreferenceData, seed: int, epoch: int = 0, position: int = 0):
        self.data, self.seed, self.epoch, self.position = data, seed, epoch, position
        self._it = data.stream(seed, epoch, position)

    def next_batch(self, n: int) -> list[PreferencePair]:
        batch: list[PreferencePair] = []
        empty_epochs = 0
        while len(batch) < n:
            try:
                self.position, pair = next(self._it)
                batch.append(pair)
                empty_epochs = 0
            except StopIteration:
                print(f"epoch {self.epoch}: {self.data.stats.report()}", file=sys.stderr)
                empty_epochs += 1
                if empty_epochs > 1 or (self.position == 0 and not batch):
                    raise RuntimeError(f"no readable pairs in {self.data.root}: {self.data.stats.report()}") from None
                self.epoch, self.position = self.epoch + 1, 0
                self._it = self.data.stream(self.seed, self.epoch, 0)
        return batch


def checkpoints(folder: Path) -> list[Path]:
    """Complete step checkpoints (trainer_state.json is written last), oldest first."""
    return sorted(p for p in folder.glob("step-*") if (p / "trainer_state.json").is_file())


def resume_state(accelerator, ckpt_dir: Path, state: dict, seed: int, batch_size: int, resume: bool) -> dict:
    """With `resume`, load the newest checkpoint into `accelerator` and return its trainer state (the keys of
    `state`); else `state` unchanged. Shared by the SPM and Diffusion-DPO trainers."""
    main = accelerator.is_main_process
    if not (resume and checkpoints(ckpt_dir)):
        if resume and main:
            print(f"no checkpoint in {ckpt_dir}: starting from step 0", file=sys.stderr)
        return state
    last = checkpoints(ckpt_dir)[-1]
    saved = json.loads((last / "trainer_state.json").read_text())
    # The data order and every draw are keyed by the seed and the global batch: they must not change.
    if saved["seed"] != seed or saved["config"]["batch_size"] != batch_size:
        raise ValueError(f"{last} was written with seed {saved['seed']} and batch size "
                         f"{saved['config']['batch_size']}; resume with the same values")
    accelerator.load_state(str(last))
    if main:
        print(f"resumed from {last} (step {saved['step']})", file=sys.stderr)
    return {k: saved[k] for k in state}


def trim_log(log_path: Path, step: int, resume: bool) -> None:
    """Start a run's jsonl log: empty, or (resuming) the earlier run's records up to the checkpoint's step."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    old = log_path.read_text().splitlines() if (resume and log_path.is_file()) else []
    log_path.write_text("".join(f"{r}\n" for r in old if json.loads(r).get("step", 0) <= step))


def train_spm(data: Path | str, model: Path | str, out: Path | str, preset: str = "tiny", *,
              init: Path | str | None = None, tokenizer: Path | str | None = None,
              eval_data: Path | str | None = None, time_conditioning: bool = True, seed: int = 0,
              resume: bool = False, stop_after: int | None = None, overrides: dict | None = None,
              max_minutes: float | None = None, clean_images: bool = False) -> Path:
    """Train an SPM on the pairs in `data`, noising through the diffusion pipeline `model`; save it at `out`.

    `overrides` replaces preset fields (e.g. {"steps": 20}); `stop_after` ends this run after that many steps
    (a checkpoint is written there) so it can be continued with `resume=True`; `max_minutes` is a wall-clock budget
    after which the model trained so far is saved as the result. `clean_images` scores the pairs' images as they
    are, at t = 0, without the diffusion model: how PickScore itself was trained, the stage an SPM starts from
    (`--init`); evaluation still shows the model the step-t images.
    """
    from accelerate import Accelerator

    from service.pipeline import load_pipeline

    if preset not in PRESETS:
        raise ValueError(f"--preset must be one of {sorted(PRESETS)}, got {preset!r}")
    p = replace(PRESETS[preset], **(overrides or {}))
    out = Path(out)
    ckpt_dir = out / "checkpoints"
    on_gpu = torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision=p.mixed_precision if on_gpu else "no", cpu=not on_gpu)  # cpu=True: gloo
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    if p.batch_size % world:
        raise ValueError(f"batch size {p.batch_size} is not divisible by the {world} processes")
    torch.manual_seed(seed)  # only the SPM's fresh weights draw from the global generator

    # The frozen diffusion model that produces the step-t images; half precision UNet/text encoders on GPU.
    pipe = load_pipeline(str(model), device=accelerator.device)
    if on_gpu:
        half = torch.bfloat16 if p.mixed_precision == "bf16" else torch.float16
        for name in ("unet", "text_encoder", "text_encoder_2"):
            if getattr(pipe, name, None) is not None:
                getattr(pipe, name).to(half)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False).eval()
    step_images = StepImages(pipe, p.guidance)

    data_set = PreferenceData(data, image_size=step_images.image_size)
    prompt_counts = data_set.prompt_counts()  # 1/(pairs of the prompt in the whole data) weights, as Pick-a-Pic
    if main:
        print(f"{len(data_set)} pairs in {data}, {len(prompt_counts)} prompts; {world} process(es), "
              f"global batch {p.batch_size}, micro-batch {p.micro_batch}", file=sys.stderr)

    spm = build_spm(preset if p.clip == "tiny" else "sd15", init=init, tokenizer=tokenizer,
                    time_conditioning=time_conditioning)
    if p.gradient_checkpointing:
        spm.enable_gradient_checkpointing()
    spm.train()
    decay = [q for q in spm.parameters() if q.ndim >= 2]  # matrices decay; biases, norms, logit_scale do not
    no_decay = [q for q in spm.parameters() if q.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": p.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=p.lr, betas=p.betas, eps=p.eps)
    spm, opt = accelerator.prepare(spm, opt)
    raw_spm: StepAwarePreferenceModel = accelerator.unwrap_model(spm)

    step_pairs = data_set.carries_timesteps()  # training/step_pairs.py data
    eval_set: list[PreferencePair] = []
    if main and p.eval_every > 0:
        if eval_data is not None:
            eval_set, stats = load_pairs(eval_data, p.eval_pairs, image_size=step_images.image_size)
            print(f"eval pairs from {eval_data}: {stats.report()}", file=sys.stderr)
        elif p.clip == "tiny" and step_pairs:
            eval_set = [g.to_pair() for g in generate_step_pairs(pipe, plan_step_pairs(p.eval_pairs, 4321, "heldout"))]
        elif p.clip == "tiny":
            eval_set = heldout_pairs(pipe, p.eval_pairs)

    state = resume_state(accelerator, ckpt_dir, {"step": 0, "epoch": 0, "position": 0}, seed, p.batch_size, resume)
    log_path = out / "train_log.jsonl"
    if main:
        trim_log(log_path, state["step"], resume)
    log_file = open(log_path, "a") if main else None  # noqa: SIM115 - closed at the end of the run
    started = time.time()

    def log(record: dict) -> None:
        if log_file is not None:
            log_file.write(json.dumps({**record, "elapsed_s": round(time.time() - started, 2)}) + "\n")
            log_file.flush()

    def save_checkpoint(step: int) -> None:
        path = ckpt_dir / f"step-{step:07d}"
        accelerator.save_state(str(path))  # every process: accelerate gathers what it needs (no hang, §4.5)
        if main:
            (path / "trainer_state.json").write_text(json.dumps(
                {"step": step, "epoch": stream.epoch, "position": stream.position, "seed": seed, "preset": preset,
                 "config": asdict(p)}) + "\n")
            for old_ckpt in checkpoints(ckpt_dir)[:-p.keep_checkpoints]:
                shutil.rmtree(old_ckpt)
        accelerator.wait_for_everyone()

    eval_set = [q for q in eval_set if q.preference != 0.5]
    clear = np.array([q.reference_gap is not None and q.reference_gap >= CLEAR_GAP for q in eval_set], dtype=bool)
    step_eval = bool(eval_set) and eval_set[0].timestep is not None
    if step_eval:
        buckets = timestep_buckets(np.array([q.timestep for q in eval_set]))
        baseline = recorded_correct(rater_on_previews, eval_set)  # the step-unaware scorer on the same previews
        log({"stage": "eval", "step": state["step"],
             **{f"rater_acc_steps_{k}": float(baseline[m].mean()) for k, m in buckets.items() if m.any()}})

    def evaluate(step: int) -> None:
        """Accuracy on the evaluation pairs at each t (step pairs: at their own step, by bucket), also on the clear
        ones (acc_clear_*) when gaps are known."""
        if main and eval_set and step_eval:
            correct = recorded_correct(raw_spm, eval_set)
            record = {f"acc_steps_{k}": float(correct[m].mean()) for k, m in buckets.items() if m.any()}
            record.update({f"acc_clear_steps_{k}": float(correct[m & clear].mean())
                           for k, m in buckets.items() if (m & clear).any()})
            log({"stage": "eval", "step": step, **record})
            tqdm.write(f"step {step}: accuracy on step pairs " + " ".join(
                f"{k}:{v:.3f}" for k, v in record.items() if k.startswith("acc_steps_")))
        elif main and eval_set:
            correct = pairwise_correct(raw_spm, step_images, eval_set, seed=seed)
            record = {f"acc_t{t}": float(c.mean()) for t, c in correct.items()}
            if clear.any():
                record.update({f"acc_clear_t{t}": float(c[clear].mean()) for t, c in correct.items()})
            log({"stage": "eval", "step": step, **record})
            tqdm.write(f"step {step}: accuracy " + " ".join(f"t={t}:{record[f'acc_t{t}']:.3f}" for t in correct))
        accelerator.wait_for_everyone()

    stream = PairStream(data_set, seed, state["epoch"], state["position"])
    mine = list(range(rank, p.batch_size, world))  # this process's share of every global batch
    micro = [mine[i:i + p.micro_batch] for i in range(0, len(mine), p.micro_batch)]
    num_t = p.train_timesteps or len(step_images.alphas)
    bar = tqdm(range(state["step"], p.steps), initial=state["step"], total=p.steps, desc="spm",
               disable=not main, dynamic_ncols=True)
    last_step = state["step"]
    out_of_time = False
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = p.lr * lr_factor(step, p.warmup)
        batch = stream.next_batch(p.batch_size)
        weights = torch.tensor([1.0 / prompt_counts.get(pair.caption, 1) for pair in batch])
        total_weight = weights.sum()
        opt.zero_grad(set_to_none=True)
        weighted_loss = torch.zeros((), device=accelerator.device)
        agree = torch.zeros((), device=accelerator.device)
        for j, idx in enumerate(micro):
            pairs = [batch[i] for i in idx]
            t, noise = draw_t_and_noise(seed, step, idx, step_images.latent_shape, num_t)
            x, t = spm_inputs(pairs, step_images, t, noise, clean_images)
            captions = [q.caption for q in pairs]
            label_0 = torch.tensor([q.label_0 for q in pairs], device=accelerator.device)
            label_1 = torch.tensor([q.label_1 for q in pairs], device=accelerator.device)
            w = weights[idx].to(accelerator.device)
            sync = contextlib.nullcontext() if j == len(micro) - 1 else accelerator.no_sync(spm)
            with sync, accelerator.autocast():
                s0, s1 = spm(x, raw_spm.tokenize(captions), t.to(accelerator.device)).float().chunk(2)
                losses = pair_losses(s0, s1, label_0, label_1)
                # DDP averages gradients over processes, hence * world: the result is the global weighted mean.
                loss = (w * losses).sum() / total_weight * world
                accelerator.backward(loss)
            weighted_loss += (w * losses).sum().detach()
            agree += ((s0 > s1) == (label_0 > label_1))[label_0 != label_1].sum().detach()
        grad_norm = accelerator.clip_grad_norm_(spm.parameters(), p.max_grad_norm)
        opt.step()
        last_step = step + 1

        batch_loss = (accelerator.reduce(weighted_loss, "sum") / total_weight).item()
        decisive = sum(q.label_0 != q.label_1 for q in batch)
        record = {"step": step + 1, "loss": batch_loss, "agreement": accelerator.reduce(agree, "sum").item() /
                  max(1, decisive), "lr": opt.param_groups[0]["lr"], "grad_norm": float(grad_norm),
                  "epoch": stream.epoch}
        log(record)
        bar.set_postfix(loss=f"{batch_loss:.4f}", epoch=stream.epoch)
        if p.eval_every > 0 and last_step % p.eval_every == 0:
            evaluate(last_step)
        if last_step % p.save_every == 0 or (stop_after is not None and last_step - state["step"] >= stop_after):
            save_checkpoint(last_step)
        if stop_after is not None and last_step - state["step"] >= stop_after:
            break
        if max_minutes is not None and time.time() - started > 60 * max_minutes:
            out_of_time = True  # a wall-clock budget: the model so far is the result (training_info says so)
            break
    bar.close()
    if main:
        print(data_set.stats.report(), file=sys.stderr)

    finished = last_step >= p.steps or out_of_time
    if finished:
        if p.eval_every > 0 and last_step % p.eval_every:
            evaluate(last_step)
        if main:
            raw_spm.save_pretrained(out)
            info = {"preset": preset, "seed": seed, "data": str(data), "diffusion_model": str(model),
                    "init": str(init) if init else None, "time_conditioning": time_conditioning,
                    "clean_images": clean_images, "step_pairs": step_pairs,
                    "processes": world, "train_seconds": round(time.time() - started, 1), "config": asdict(p),
                    "steps_done": last_step, "stopped_by_time_budget": out_of_time,
                    "data_stats": {"read": data_set.stats.read, "skipped": dict(data_set.stats.skipped)}}
            (out / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    if log_file is not None:
        log_file.close()
        if finished:
            from .plots import save_curves

            keys = (("loss", "acc_steps_all", "acc_steps_early", "acc_clear_steps_early") if step_eval
                    else ("loss", "acc_t0", "acc_t501", "acc_clear_t501"))
            save_curves(log_path, out / "train_curves.png", keys=keys,
                        smooth=max(1, min(25, p.steps // 20)))
    accelerator.wait_for_everyone()
    return out


if __name__ == "__main__":  # `accelerate launch -m training.train_spm --data ... --model ... --out ...`
    from service.cli import main as spo_main

    sys.exit(spo_main(["train", "spm", *sys.argv[1:]]))
