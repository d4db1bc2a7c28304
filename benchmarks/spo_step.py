"""Seconds and peak GPU memory of one SPO iteration, split into sampling / scoring / training (device tool).

SD 1.5's architecture with random weights (UNet, VAE, CLIP-L text encoder; the step-aware preference model is
PickScore's CLIP ViT-H/14), fp16 mixed precision, LoRA rank 4, the sd15 preset otherwise: 2 prompts per batch,
K = 4 candidates, 20 DDIM steps, branching from step 4. Runs the trainer's own functions
(`sample_step_pairs`, `train_on_pairs`), so what is timed is what `spo train spo` does. One warm-up iteration, then
`--iters` timed ones; JSON to $OUT/spo_step.json (or --out).

    python benchmarks/spo_step.py [--iters 3] [--prompts 2] [--candidates 4]

Scores from a random SPM are random, so the pair-keep rate is whatever the threshold lets through; the threshold is
set below 0 so that every comparison yields a pair and the training step always has work (the worst case for time).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=2, help="prompts per batch (sample batch)")
    parser.add_argument("--candidates", type=int, default=4, help="K")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--latent", type=int, default=64, help="latent side (64 = 512x512 images)")
    parser.add_argument("--device", default="cuda", help="cpu only to check the script itself (fp32, slow)")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "spo_step.json"))
    args = parser.parse_args()
    gpu = args.device.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        sys.exit("benchmarks/spo_step.py needs a CUDA GPU (--device cpu only checks the script)")
    from accelerate import Accelerator

    from training.architectures import build_random_sd15_pipeline
    from training.lora import add_lora
    from training.presets import SPO_PRESETS
    from training.scorers import spm_scorer
    from training.spm import build_spm
    from training.train_spo import sample_step_pairs, train_on_pairs

    torch.backends.cuda.matmul.allow_tf32 = True
    p = replace(SPO_PRESETS["sd15"], prompts_per_batch=args.prompts, num_candidates=args.candidates,
                num_steps=args.steps, threshold=-1.0)
    accelerator = Accelerator(mixed_precision="fp16" if gpu else "no", cpu=not gpu)
    dtype = torch.float16 if gpu else torch.float32
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build_random_sd15_pipeline(Path(tmp) / "tokenizer")
        spm = build_spm("sd15", tokenizer=Path(tmp) / "tokenizer")
    pipe.to(accelerator.device, dtype)
    spm = spm.to(accelerator.device, dtype).eval()
    unet = pipe.unet
    params = add_lora(unet, p.lora_rank, p.lora_targets, dtype)
    optimizer = torch.optim.AdamW(params, lr=p.lr)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    prompts = ["a red circle on a blue background", "a green square on a white background"] * args.prompts
    prompts = prompts[:args.prompts]
    score_fn = spm_scorer(pipe.vae, spm, prompts)
    shape = (args.prompts, 4, args.latent, args.latent)

    rows = []
    for i in range(args.iters + 1):
        sync()
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        gens = [torch.Generator().manual_seed(1000 * i + j) for j in range(args.prompts)]
        latents = torch.randn(shape, generator=torch.Generator().manual_seed(i)).to(accelerator.device)
        result, pb, timings = sample_step_pairs(accelerator, pipe, unet, p, score_fn, prompts, latents, gens)
        sync()
        sampling_peak = torch.cuda.max_memory_allocated() if gpu else 0
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        losses, _, _ = train_on_pairs(accelerator, unet, optimizer, params, pipe.scheduler, result.pairs, pb, p,
                                      torch.Generator().manual_seed(i))
        sync()
        timings["training_s"] = time.perf_counter() - started
        row = {"iteration": i, "warmup": i == 0, **{k: round(v, 4) for k, v in timings.items()},
               "total_s": round(sum(timings.values()), 4), "pairs": len(result.pairs),
               "peak_gib_sampling_scoring": round(sampling_peak / 2**30, 2),
               "peak_gib_training": round((torch.cuda.max_memory_allocated() if gpu else 0) / 2**30, 2),
               "loss": losses[-1]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    timed = [r for r in rows if not r["warmup"]]
    summary = {k: round(sum(r[k] for r in timed) / len(timed), 3)
               for k in ("sampling_s", "scoring_s", "training_s", "total_s")}
    summary.update(peak_gib=max(max(r["peak_gib_sampling_scoring"], r["peak_gib_training"]) for r in timed),
                   gpu=torch.cuda.get_device_name() if gpu else 'cpu', torch=torch.__version__, prompts=args.prompts,
                   candidates=args.candidates, steps=args.steps, divert_start_step=p.divert_start_step,
                   micro_batch=p.micro_batch, optimizer_steps=p.optimizer_steps_per_batch, lora_rank=p.lora_rank)
    Path(args.out).write_text(json.dumps({"summary": summary, "iterations": rows}, indent=2))
    print("SPO iteration (mean of timed): " + ", ".join(f"{k} {summary[k]:.2f} s" for k in
                                                        ("sampling_s", "scoring_s", "training_s", "total_s"))
          + f", peak {summary['peak_gib']} GiB on {summary['gpu']}")


if __name__ == "__main__":
    main()
