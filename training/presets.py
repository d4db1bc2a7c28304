"""Every trainer's presets, in one light module (dataclasses only, no torch): the command line lists them without
importing a model library.

`BASE_PRESETS`, `SPM_PRESETS`, `SPO_PRESETS`, `DPO_PRESETS`: name -> frozen dataclass. A trainer takes a preset by
name and replaces single fields with `overrides`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

# ------------------------------------------------------------------------------------------------- base models


@dataclass(frozen=True)
class TinyWidths:
    """Widths of the tiny SD-architecture models (training/architectures.py builds them)."""

    vae_channels: tuple[int, ...] = (16, 32, 64, 64)
    unet_channels: tuple[int, ...] = (64, 128)
    unet_layers_per_block: int = 2
    text_hidden: int = 64
    text_layers: int = 2


@dataclass(frozen=True)
class BasePreset:
    kind: str  # "sd15" | "sdxl"
    n_images: int = 30_000
    vae_steps: int = 1_200
    vae_batch: int = 24
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 1_800
    unet_batch: int = 64
    unet_lr: float = 6e-4
    warmup: int = 100
    caption_dropout: float = 0.1  # empty caption -> the unconditional branch used by classifier-free guidance
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.995
    widths: TinyWidths = field(default_factory=TinyWidths)


BASE_PRESETS: dict[str, BasePreset] = {
    "tiny": BasePreset(kind="sd15"),
    # The SDXL twin reuses spo-tiny's VAE (`--vae models/spo-tiny/vae`) and trains only the denoiser.
    "tiny-xl": BasePreset(kind="sdxl", unet_steps=1_200, widths=TinyWidths(unet_layers_per_block=1)),
    # A few steps of everything: for tests and for checking a setup.
    "smoke": BasePreset(kind="sd15", n_images=256, vae_steps=3, vae_batch=4, unet_steps=3, unet_batch=4, warmup=1,
                        widths=TinyWidths(vae_channels=(8, 8, 16, 16), unet_channels=(32, 32),
                                          unet_layers_per_block=1, text_hidden=32, text_layers=1)),
}
BASE_PRESETS["smoke-xl"] = replace(BASE_PRESETS["smoke"], kind="sdxl")


# ------------------------------------------------------------------------------------- step-aware preference model


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


SPM_PRESETS: dict[str, SPMPreset] = {
    # The reference (docs/spo.md §1): 16 pairs/GPU x 4 GPUs, AdamW wd 0.3, 500 warm-up steps, then constant.
    "sd15": SPMPreset(clip="vit-h-14", batch_size=64, micro_batch=16, lr=3e-6, weight_decay=0.3, warmup=500,
                      steps=8000, gradient_checkpointing=True),
    "sdxl": SPMPreset(clip="vit-h-14", batch_size=64, micro_batch=16, lr=1e-6, weight_decay=0.3, warmup=500,
                      steps=7000, gradient_checkpointing=True),
    # The shapes world on CPU: a tiny CLIP, so a larger learning rate and a milder decay. From scratch on spo-tiny's
    # pairs it stays near loss ln 2: most pairs differ in details spo-tiny's VAE round trip erases (measurements in
    # benchmarks/results/spm-ceiling-cpu-2026-11-26). Start it like the paper's SPM starts from PickScore:
    # `spo data renders` + `--clean-images`, then `--init` (models/spo-tiny-spm/README.md).
    "tiny": SPMPreset(clip="tiny", batch_size=32, micro_batch=32, lr=5e-4, weight_decay=0.05, warmup=200,
                      steps=4000, eval_every=500, eval_pairs=300, save_every=250),
}


# ------------------------------------------------------------------------------------------------------------- SPO


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
    continue_from: str = "random"  # the step-wise resampler's pick: "random" (the method) or "winner" (ablation)
    divert_start_step: int = 4
    inner_steps: int = 0
    threshold: float = 0.3
    beta: float = 10.0
    clip_eps: float = 0.1
    # Every kept pair of a batch is trained on once, spread over a fixed number of optimizer steps (the same on every
    # process, whatever each kept), each step's pairs in passes of `micro_batch` pairs with gradients accumulated.
    micro_batch: int = 10  # pairs per process per forward/backward pass (a memory bound; the reference's 10)
    optimizer_steps_per_batch: int = 1  # fixed, whatever the number of kept pairs
    mixed_precision: str = "fp16"
    vae_fp32: bool = False  # decode the scored previews in fp32, outside autocast (an SDXL VAE without the fp16 fix)
    gradient_checkpointing: bool = False
    eval_every: int = 50  # batches; held-out rater evaluation (shapes world only)
    checkpoint_every: int = 100  # batches


SPO_PRESETS: dict[str, SPOPreset] = {
    # docs/spo.md §3: reference SD 1.5 config (4 GPUs x 10 prompts, 10 epochs over 4k prompts).
    "sd15": SPOPreset(kind="sd15"),
    # SDXL: rank 64, lr 1e-5, batch 2 with accumulation 2, K = 2, threshold 0.4, inner steps 3 (fp16-fix VAE).
    # The reference's "batch 2, accumulation 2" is here a micro-batch of 2 pairs, accumulated over all kept pairs.
    "sdxl": SPOPreset(kind="sdxl", lora_rank=64, lr=1e-5, prompts_per_batch=2, num_candidates=2, threshold=0.4,
                      inner_steps=3, micro_batch=2, gradient_checkpointing=True),
    # spo-tiny on 2 CPU cores. lr: the reference's 6e-5; at 3e-4 the policy/reference ratios blew up and
    # the images broke (benchmarks/results/spo-tiny-rater-2026-11-26).
    "tiny": SPOPreset(kind="sd15", lr=6e-5, prompts_per_batch=8, epochs=6, micro_batch=16,
                      optimizer_steps_per_batch=2, mixed_precision="no", eval_every=10, checkpoint_every=10),
}
SPO_PRESETS["tiny-xl"] = replace(SPO_PRESETS["tiny"], kind="sdxl", num_candidates=2, threshold=0.4, inner_steps=3)
SPO_PRESETS["smoke"] = replace(SPO_PRESETS["tiny"], prompts_per_batch=2, epochs=1, num_steps=6, divert_start_step=2,
                               micro_batch=4, eval_every=0, checkpoint_every=2, threshold=0.0)


# ------------------------------------------------------------------------------------------------- Diffusion-DPO


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


def _lora_of(spo_preset: str) -> dict[str, Any]:
    """The LoRA budget of the SPO preset of the same name: the comparison is at equal rank and target modules."""
    p = SPO_PRESETS[spo_preset]
    return {"lora_rank": p.lora_rank, "lora_targets": p.lora_targets}


DPO_PRESETS: dict[str, DPOPreset] = {
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
DPO_PRESETS["tiny-xl"] = replace(DPO_PRESETS["tiny"], **_lora_of("tiny-xl"))
# A few steps of everything, for tests: every code path (caption drop, flips, accumulation, checkpoints).
DPO_PRESETS["smoke"] = replace(DPO_PRESETS["tiny"], **_lora_of("smoke"),
                               batch_size=4, micro_batch=2, steps=4, warmup=1, hflip=True, eval_every=0, save_every=2)
