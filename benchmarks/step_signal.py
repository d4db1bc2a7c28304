"""Where in sampling does a candidate's choice matter, and does a final-image judge see it? One run, side by side.

    python benchmarks/step_signal.py [--model models/spo-tiny] [--prompts 32] [--continuations 3] [--part framing]
                                     [--spm NAME=DIR ...] [--json FILE]

For each branch step s of a 20-step eta = 1 DDIM trajectory (CFG 5), K = 4 candidates x_{s+1} are drawn from the same
parent (as SPO's step-wise resampler does). Two things are measured per candidate:
  * what a step-unaware scorer sees: the rater on the decoded DDIM x0 prediction at the next step (docs/spo.md
    §2.3), and
  * what the choice is worth: one rater part of the final image (`--part`: the visual-quality part by default, or
    framing, alignment, the total), averaged over `--continuations` independent continuations of that candidate.
It prints, per step, the within-group rank correlation of the two, how often the scorer's best candidate ends better
than its worst, and how much of the final quality's variance lies between candidates (what a choice at this step can
change) versus within a candidate (what later steps decide). A step-aware preference model has to learn the second
column from the first's inputs; where the correlation is ~0, a final-image judge on x0 predictions trains on noise.
Each `--spm` adds the same two columns for a step-aware preference model scoring the same previews at their timestep:
how well it sees what the choice is worth, next to the rater on the previews.
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
from scipy.stats import spearmanr  # noqa: E402

from service.worker.pipeline import load_pipeline  # noqa: E402
from training.conditioning import cfg_eps, encode_prompts  # noqa: E402
from training.evaluate import eval_items  # noqa: E402
from training.latents import decode_to_uint8, decode_to_unit  # noqa: E402
from training.rater import RATER_VERSION, rate  # noqa: E402
from training.spo import ddim_step, predicted_x0  # noqa: E402

K = 4
STEPS = 20
GUIDANCE = 5.0


def agreement(scores: np.ndarray, value: np.ndarray) -> tuple[float, float]:
    """Of (K, n) candidate scores against what each candidate is worth: the within-group rank correlation, and how
    often the top-scored candidate ends better than the bottom-scored one."""
    best, worst, cols = scores.argmax(0), scores.argmin(0), np.arange(scores.shape[1])
    corr = float(np.nanmean([spearmanr(scores[:, p], value[:, p]).statistic for p in cols]))
    return corr, float((value[best, cols] > value[worst, cols]).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/spo-tiny")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--continuations", type=int, default=3)
    parser.add_argument("--branch-steps", default="2,4,6,8,10,12,14,16,18")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--part", choices=["quality", "framing", "alignment", "total"], default="quality",
                        help="the rater part (v2) a candidate's final image is worth, and the x0 view is scored by")
    parser.add_argument("--spm", action="append", default=[], metavar="NAME=DIR",
                        help="also score the previews with this step-aware preference model (repeatable)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from training.spm import StepAwarePreferenceModel

    spms = {}
    for spec in args.spm:
        name, sep, folder = spec.partition("=")
        if not sep or not (Path(folder) / "spm_config.json").is_file():
            parser.error(f"argument --spm: expected NAME=DIR of an SPM folder, got {spec!r}")
        spms[name] = StepAwarePreferenceModel.from_pretrained(folder).eval()

    pipe = load_pipeline(args.model)
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    ts = scheduler.timesteps
    prompts = [item.caption for item in eval_items(args.prompts, 0, seed=99)]
    batch = encode_prompts(pipe, prompts)
    n, m = len(prompts), args.continuations
    g = torch.Generator().manual_seed(args.seed)

    def eps(x: torch.Tensor, step: int, rows: torch.Tensor) -> torch.Tensor:
        return cfg_eps(pipe.unet, x, ts[step].expand(len(x)), batch, rows, GUIDANCE)

    def part_and_total(latents: torch.Tensor, rows: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        images = decode_to_uint8(pipe.vae, latents)
        ratings = [rate(image, prompts[j]) for image, j in zip(images, rows.tolist(), strict=True)]
        return np.array([getattr(r, args.part) for r in ratings]), np.array([r.total for r in ratings])

    start = time.perf_counter()
    rows_out = []
    print(f"{args.model}: {n} prompts, K = {K} candidates, {m} continuations each, DDIM {STEPS} eta 1, CFG {GUIDANCE}")
    print(f"{'step':>4} | {'t':>3} | {'rank corr (x0 view, final)':>26} | {'P(best ends better)':>19} | "
          f"{'final ' + args.part + ' var between':>25} | {'within':>8}"
          + "".join(f" | {name + ' corr':>12} | {name + ' P(best)':>14}" for name in spms))
    with torch.no_grad():
        rows = torch.arange(n)
        x = torch.randn(n, 4, *(pipe.unet.config.sample_size,) * 2, generator=g)
        parents = {}
        for i in range(STEPS):  # one shared trajectory; its states are the parents
            parents[i] = x
            x = ddim_step(scheduler, eps(x, i, rows), ts[i], x, 1.0, generator=g)
        for s in (int(v) for v in args.branch_steps.split(",")):
            e = eps(parents[s], s, rows)
            cand = torch.cat([ddim_step(scheduler, e, ts[s], parents[s], 1.0, generator=g) for _ in range(K)])
            crows = rows.repeat(K)
            view = predicted_x0(scheduler, eps(cand, s + 1, crows), ts[s + 1], cand) if s + 1 < STEPS else cand
            view_total = part_and_total(view, crows)[1]  # a step-unaware scorer: the rater's total on the preview
            spm_scores = {}
            if spms:  # the same previews, decoded once for every SPM
                unit = decode_to_unit(pipe.vae, view)
                t_view = ts[s + 1] if s + 1 < STEPS else torch.tensor(0)
                spm_scores = {name: spm.score(unit, [prompts[j] for j in crows.tolist()], t_view.expand(len(unit)))
                              .float().numpy().reshape(K, n) for name, spm in spms.items()}
            y, yrows = cand.repeat(m, 1, 1, 1), crows.repeat(m)
            for j in range(s + 1, STEPS):
                y = ddim_step(scheduler, eps(y, j, yrows), ts[j], y, 1.0, generator=g)
            final_q = part_and_total(y, yrows)[0].reshape(m, K, n)
            view_total = view_total.reshape(K, n)
            value = final_q.mean(0)  # (K, n): what each candidate is worth
            corr, better = agreement(view_total, value)
            seen = {name: agreement(sc, value) for name, sc in spm_scores.items()}
            # Between-candidate variance of the value, minus the part the finite continuation average adds.
            within = float(final_q.var(0, ddof=1).mean())
            between = max(float(value.var(0, ddof=1).mean()) - within / m, 0.0)
            rows_out.append({"step": s, "t": int(ts[s]), "rank_corr": corr, "p_best_ends_better": better,
                             "between_var": between, "within_var": within,
                             "spm": {name: {"rank_corr": c, "p_best_ends_better": b} for name, (c, b) in seen.items()}})
            print(f"{s:>4} | {int(ts[s]):>3} | {corr:>+26.3f} | {better:>19.2f} | {between:>25.5f} | {within:>8.5f}"
                  + "".join(f" | {c:>+12.3f} | {b:>14.2f}" for c, b in seen.values()), flush=True)
    print(f"{time.perf_counter() - start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "prompts": n, "k": K, "continuations": m,
                                               "part": args.part, "rater_version": RATER_VERSION,
                                               "spm": dict(spec.split("=", 1) for spec in args.spm),
                                               "rows": rows_out}, indent=2))


if __name__ == "__main__":
    main()
