"""Train the spo-tiny base models from scratch on the shapes world: first the VAE, then UNet + text encoder(s).

Read top to bottom: presets, data, VAE stage, latent cache, denoiser stage, save. The result is a plain diffusers
pipeline folder (`StableDiffusionPipeline` or `StableDiffusionXLPipeline`) that needs nothing from this project.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from . import architectures as arch
from .conditioning import condition
from .plots import save_curves
from .presets import BASE_PRESETS, BasePreset
from .shapes import make_arrays

Log = Callable[[dict[str, Any]], None]  # one record of the training log

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTokenizer


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def train_vae(vae: AutoencoderKL, images: np.ndarray, p: BasePreset, gen: torch.Generator, log: Log) -> AutoencoderKL:
    opt = torch.optim.AdamW(vae.parameters(), lr=p.vae_lr, weight_decay=0.0)
    vae.train()
    bar = tqdm(range(p.vae_steps), desc="vae", dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = p.vae_lr * _lr_factor(step, p.warmup, p.vae_steps)
        x = _to_tensor(images[torch.randint(len(images), (p.vae_batch,), generator=gen).numpy()])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        mse = F.mse_loss(recon, x)
        loss = mse + F.l1_loss(recon, x) + p.vae_kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        psnr = 10 * math.log10(4.0 / max(mse.item(), 1e-10))  # images span [-1, 1]: peak-to-peak 2
        bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{psnr:.1f}dB")
        log({"stage": "vae", "step": step, "loss": loss.item(), "psnr": psnr, "lr": opt.param_groups[0]["lr"]})
    vae.eval()
    return vae


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    """Posterior means of every image (unscaled); the denoiser stage trains on these, so the VAE runs once."""
    out = [vae.encode(_to_tensor(images[i:i + batch])).latent_dist.mean
           for i in tqdm(range(0, len(images), batch), desc="encode latents", dynamic_ncols=True)]
    return torch.cat(out)


def build_pipeline(kind: str, vae: AutoencoderKL, tokenizer: CLIPTokenizer, text_encoders: list[torch.nn.Module],
                   unet: UNet2DConditionModel) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    scheduler = arch.sd_scheduler()
    if kind == "sd15":
        return StableDiffusionPipeline(vae=vae, text_encoder=text_encoders[0], tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    # Empty prompts are encoded like any other text (as in SD 1.5) rather than zeroed: the denoiser learned the
    # unconditional branch from empty captions.
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoders[0], text_encoder_2=text_encoders[1],
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=False)


def train_denoiser(pipe: StableDiffusionPipeline | StableDiffusionXLPipeline, latents: torch.Tensor,
                   captions: list[str], p: BasePreset, gen: torch.Generator, log: Log) -> None:
    unet, encoders = pipe.unet, [m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m]
    trainable = [unet, *encoders]
    params = [q for m in trainable for q in m.parameters()]
    # EMA decay min(ema_decay, (1 + n) / (10 + n)) at update n (diffusers' schedule; its first update copies).
    ema = EMAModel(params, decay=p.ema_decay)
    opt = torch.optim.AdamW(params, lr=p.unet_lr, weight_decay=1e-2)
    alphas = pipe.scheduler.alphas_cumprod
    for m in trainable:
        m.train()
    bar = tqdm(range(p.unet_steps), desc=f"{p.kind} denoiser", dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = p.unet_lr * _lr_factor(step, p.warmup, p.unet_steps)
        idx = torch.randint(len(latents), (p.unet_batch,), generator=gen)
        drop = torch.rand(p.unet_batch, generator=gen) < p.caption_dropout
        batch_captions = ["" if d else captions[i] for i, d in zip(idx.tolist(), drop.tolist(), strict=True)]
        x0 = latents[idx] * pipe.vae.config.scaling_factor
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, len(alphas), (p.unet_batch,), generator=gen)
        xt = pipe.scheduler.add_noise(x0, noise, t)
        embeds, added = condition(pipe, batch_captions)
        pred = unet(xt, t, encoder_hidden_states=embeds, added_cond_kwargs=added or None).sample
        # Min-SNR-gamma weighting (Hang et al. 2023): faster, steadier convergence for epsilon prediction.
        snr = alphas[t] / (1 - alphas[t])
        weight = torch.clamp(snr, max=p.min_snr_gamma) / snr
        loss = (weight * F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.step(params)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        log({"stage": "denoiser", "step": step, "loss": loss.item(), "grad_norm": float(grad_norm),
             "lr": opt.param_groups[0]["lr"]})
    ema.copy_to(params)
    for m in trainable:
        m.eval()


def store_unet_fp16(folder: Path) -> None:
    """Rewrite the UNet's weights in fp16: half the size (the committed models stay small); diffusers loads them
    into fp32 modules by default, and the images differ by about 0.01/255."""
    from safetensors.torch import load_file, save_file

    for f in Path(folder).glob("*.safetensors"):
        save_file({k: v.half() if v.is_floating_point() else v for k, v in load_file(f).items()}, f,
                  metadata={"format": "pt"})


def train_base(preset: str, out: Path, seed: int = 0, vae_from: Path | None = None) -> Path:
    """Train a tiny SD-architecture model from scratch and save it as a diffusers pipeline folder at `out`."""
    if preset not in BASE_PRESETS:
        raise ValueError(f"--preset must be one of {sorted(BASE_PRESETS)}, got {preset!r}")
    p = BASE_PRESETS[preset]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    started = time.time()
    log_path = out / "train_log.jsonl"
    log_file = open(log_path, "w")  # noqa: SIM115 - closed at the end of the run

    def log(record: dict) -> None:
        record["elapsed_s"] = round(time.time() - started, 2)
        log_file.write(json.dumps(record) + "\n")

    images, scenes = make_arrays(p.n_images, seed)
    captions = [s.caption for s in scenes]
    tokenizer = arch.write_tokenizer(out / "tokenizer")

    if vae_from is not None:
        vae = AutoencoderKL.from_pretrained(vae_from)
    else:
        vae = train_vae(arch.build_vae(p.widths), images, p, gen, log)
    latents = encode_latents(vae, images)
    if vae_from is None:
        vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    del images

    if p.kind == "sd15":
        encoders = [arch.build_sd15_text_encoder(tokenizer, p.widths)]
        unet = arch.build_sd15_unet(p.widths)
    else:
        encoders = list(arch.build_sdxl_text_encoders(tokenizer, p.widths))
        unet = arch.build_sdxl_unet(p.widths)
    pipe = build_pipeline(p.kind, vae, tokenizer, encoders, unet)
    pipe.set_progress_bar_config(disable=True)
    train_denoiser(pipe, latents, captions, p, gen, log)
    log_file.close()

    pipe.save_pretrained(out, safe_serialization=True)
    store_unet_fp16(out / "unet")
    info = {"preset": preset, "seed": seed, "vae_from": str(vae_from) if vae_from else None,
            "train_seconds": round(time.time() - started, 1), "config": asdict(p),
            "scaling_factor": vae.config.scaling_factor}
    (out / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    save_curves(log_path, out / "train_curves.png")
    return out
