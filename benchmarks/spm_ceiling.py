"""How well can any scorer of a step-t preview agree with the final images' preference? `spo eval spm`'s ceiling.

    python benchmarks/spm_ceiling.py [--model models/spo-tiny] [--pairs 200] [--completions 4] [--json FILE]

`spo eval spm` takes a held-out pair of finished images, noises both to step t with the same noise, denoises them in
one CFG UNet pass to the DDIM x0 prediction, decodes, and asks the SPM which image the rater prefers. On the very same
pairs and noise (the eval's plans and seeds), this script measures these references side by side, per t:

  * rater, encoded: the rater on the eval's previews, made from the images through the VAE encoder (the column
    "rater on previews" of `spo eval spm`);
  * rater, own latents: the same, but noising the latents the sampler actually produced instead of re-encoded
    images (SPO's sampler never encodes; the gap between the two columns is what the toy VAE's encoder loses);
  * posterior completions: from each noised latent x_t, sampling is finished `--completions` times (DDIM, eta = 1)
    and the rater's mean total of the finished images is compared: the diffusion model's own estimate of
    E[rating | x_t]. With `--completion-settings fixed` every image is finished at CFG 5 on the 20-step schedule
    (what SPO's sampler does), which knows only x_t, like an SPM; with `own` each image is finished with the CFG
    scale and step count it was made with, side information no scorer has: an upper reference, not a bound.
With `--spm DIR` the SPM is scored on both kinds of previews too.
Accuracy is over pairs the rater does not tie, and over the clear ones (rater gap >= 0.05), as in `spo eval spm`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import DDIMScheduler  # noqa: E402

from service.cli_args import float_list, int_list, number_list  # noqa: E402
from service.worker.pipeline import load_pipeline  # noqa: E402
from training.conditioning import PromptBatch, cfg_eps  # noqa: E402
from training.evaluate_spm import EVAL_SEED, EVAL_TIMESTEPS, rater_on_previews  # noqa: E402
from training.latents import decode_to_uint8, decode_to_unit  # noqa: E402
from training.preference_data import CLEAR_GAP, by_setting, plan_pairs  # noqa: E402
from training.rater import rate  # noqa: E402
from training.spm import StepAwarePreferenceModel  # noqa: E402
from training.spo import ddim_step, predicted_x0  # noqa: E402
from training.step_images import StepImages, draw_t_and_noise  # noqa: E402


@torch.no_grad()
def own_latents(pipe, plans) -> tuple[torch.Tensor, list[tuple[float, int]]]:
    """The scaled final latents of both images of every pair ([images_0; images_1]) and each image's (CFG, steps):
    the same calls and seeds as the eval's images (`by_setting`), stopped before the VAE decodes."""
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor

    def make(requests, *, steps: int, guidance: float) -> list[torch.Tensor]:
        return list(pipe(prompt=[r.prompt for r in requests], num_inference_steps=steps, guidance_scale=guidance,
                         width=size, height=size, generator=[torch.Generator().manual_seed(r.seed) for r in requests],
                         output_type="latent").images.float())

    made = list(by_setting(plans, make))
    latents = torch.stack([z for _, z, _ in made] + [z for _, _, z in made])
    settings = [(p.guidance_0, p.steps_0) for p in plans] + [(p.guidance_1, p.steps_1) for p in plans]
    return latents, settings


@torch.no_grad()
def completions_mean(pipe, x_t: torch.Tensor, t: int, pb: PromptBatch,
                     settings: list[tuple[float, int]], m: int, seed: int) -> np.ndarray:
    """Mean rater total of `m` independent eta = 1 DDIM finishes of each x_t with its (CFG, steps) setting."""
    totals = np.zeros(len(x_t))
    for scale, count in sorted(set(settings)):
        idx = torch.tensor([i for i, s in enumerate(settings) if s == (scale, count)])
        scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        scheduler.set_timesteps(count)
        later = [int(s) for s in scheduler.timesteps if int(s) < t]
        scheduler.timesteps = torch.tensor([t] + later) if t > 0 else torch.tensor([], dtype=torch.long)
        for j in range(m):
            g = torch.Generator().manual_seed(seed + 7919 * j + count * 31 + int(scale * 10))
            x = x_t[idx]
            for s in scheduler.timesteps.tolist():
                eps = cfg_eps(pipe.unet, x, torch.full((len(x),), s), pb, idx, scale)
                x = ddim_step(scheduler, eps, s, x, 1.0, generator=g)
            images = decode_to_uint8(pipe.vae, x)
            totals[idx.numpy()] += [rate(im, pb.prompts[i]).total / m
                                    for im, i in zip(images, idx.tolist(), strict=True)]
    return totals


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/spo-tiny")
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--completions", type=int, default=4, help="finishes per noised latent; 0: no such column")
    parser.add_argument("--spm", action="append", default=[], metavar="DIR",
                        help="also score both kinds of previews with this SPM (repeatable)")
    parser.add_argument("--guidance", type=float_list, default=(1.5, 3.0, 5.0, 7.5),
                        help="as given to `spo eval spm --guidance`")
    parser.add_argument("--steps", type=int_list, default=(4, 6, 8, 12, 20), help="as given to `spo eval spm --steps`")
    parser.add_argument("--seed", type=int, default=4321, help="`spo eval spm`'s seed: the same pairs and noise")
    parser.add_argument("--completion-settings", choices=["fixed", "own"], default="fixed",
                        help="finish at CFG 5 / 20 steps (fixed), or with each image's own CFG and step count")
    parser.add_argument("--timesteps", type=number_list(int, "timesteps", minimum=0), default=EVAL_TIMESTEPS)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    start = time.perf_counter()
    pipe = load_pipeline(args.model)
    step_images = StepImages(pipe)
    plans = plan_pairs(args.pairs, args.seed, "heldout", args.guidance, args.steps)
    n = len(plans)
    latents, settings = own_latents(pipe, plans)
    captions = [p.caption for p in plans] * 2
    images = decode_to_uint8(pipe.vae, latents)
    totals = np.array([rate(im, c).total for im, c in zip(images, captions, strict=True)])
    decisive = totals[:n] != totals[n:]
    clear = decisive & (np.abs(totals[:n] - totals[n:]) >= CLEAR_GAP)
    want = totals[:n] > totals[n:]
    _, noise = draw_t_and_noise(args.seed, EVAL_SEED, list(range(n)), step_images.latent_shape)
    noise2 = noise.repeat(2, 1, 1, 1)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    pb = step_images.prompt_batch(captions)
    print(f"{args.model}: {n} held-out pairs ({decisive.sum()} decisive, {clear.sum()} clear), "
          f"{args.completions} completions; {time.perf_counter() - start:.0f} s to generate")

    def accuracy(s: np.ndarray) -> tuple[float, float]:
        right = (s[:n] > s[n:]) == want
        return float(right[decisive].mean()), float(right[clear].mean())

    spms = {Path(path).name: StepAwarePreferenceModel.from_pretrained(path).eval() for path in args.spm}
    scorers = {"rater": rater_on_previews, **{name: spm.score for name, spm in spms.items()}}
    names = [f"{scorer}, {route}" for scorer in scorers for route in ("encoded", "own latents")]
    if args.completions:
        names.append(f"completions ({args.completion_settings} settings)")
    rows = []
    print("| t | " + " | ".join(names) + " |  (all / clear)\n" + "|---" * (len(names) + 1) + "|", flush=True)
    for t in args.timesteps:
        tt = torch.full((n,), t, dtype=torch.long)
        a = step_images.alphas[t]
        x_t = a.sqrt() * latents + (1 - a).sqrt() * noise2
        eps = cfg_eps(pipe.unet, x_t, tt.repeat(2), pb, torch.arange(2 * n), step_images.guidance)
        previews = {"encoded": step_images(pixels, captions[:n], tt, noise),  # what `spo eval spm` shows
                    "own latents": decode_to_unit(pipe.vae, predicted_x0(pipe.scheduler, eps, tt.repeat(2), x_t))}
        row = {"t": t}
        for scorer, score in scorers.items():
            for route, x in previews.items():
                row[f"{scorer}, {route}"] = accuracy(score(x, captions[:n], tt).float().numpy())
        if args.completions:
            finish = settings if args.completion_settings == "own" else [(5.0, 20)] * len(settings)
            row[names[-1]] = accuracy(completions_mean(pipe, x_t, t, pb, finish, args.completions,
                                                       args.seed + t))
        rows.append(row)
        print(f"| {t} | " + " | ".join(f"{row[k][0]:.3f} / {row[k][1]:.3f}" for k in names) + " |", flush=True)
    print(f"{time.perf_counter() - start:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "model": args.model, "pairs": n, "decisive": int(decisive.sum()), "clear": int(clear.sum()),
            "clear_gap": CLEAR_GAP, "completions": args.completions,
            "completion_settings": args.completion_settings, "guidance": list(args.guidance), "steps": list(args.steps),
            "seed": args.seed, "spm": args.spm, "cells": "(accuracy over decisive pairs, over clear pairs)",
            "rows": rows},
            indent=2) + "\n")


if __name__ == "__main__":
    main()
