"""How much the rater tells spo-tiny's seeds of one prompt apart: rater v1 against v2, side by side, in one run.

    python benchmarks/rater_spread.py [--model models/spo-tiny] [--prompts 4] [--seeds 48] [--out DIR]

Generates `prompts` x `seeds` images (DDIM 20 steps, CFG 5, the setting SPO samples at), rates each with both rater
versions and prints, per part, its 5th..95th percentile over the images and, for v1 and v2 totals, the share of
same-prompt seed pairs whose totals differ by >= 0.05 (the pairs whose preference labels carry signal rather than
Bradley-Terry noise), and the ratio v2 / v1. Writes results.json, a histogram PNG of the framing inputs (area share,
centre offset) and a grid of one prompt's images ordered by their v2 framing to --out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from service.worker.pipeline import generate, load_pipeline  # noqa: E402
from service.worker.runner import ImageRequest  # noqa: E402
from training.rater import PREFERRED_AREA, Rating, rate  # noqa: E402
from training.shapes import TRAIN_COMBOS, caption_for  # noqa: E402

PARTS = ("alignment", "quality", "crispness", "regularity", "clean", "uniformity", "size", "placement", "framing")
CLEAR = 0.05


def clear_share(totals: dict[str, list[float]]) -> float:
    """Share of same-prompt pairs whose totals differ by at least CLEAR."""
    gaps = [abs(a - b) for values in totals.values() for a, b in itertools.combinations(values, 2)]
    return float(np.mean(np.array(gaps) >= CLEAR))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "spo-tiny"))
    parser.add_argument("--prompts", type=int, default=4, help="training-combination prompts, spread over the combos")
    parser.add_argument("--seeds", type=int, default=48, help="seeds per prompt")
    parser.add_argument("--batch", type=int, default=16, help="images per pipeline call")
    parser.add_argument("--first-seed", type=int, default=10_000, help="seeds are first-seed .. first-seed + seeds - 1")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json and the PNGs")
    args = parser.parse_args()

    pipe = load_pipeline(args.model)
    step = max(1, len(TRAIN_COMBOS) // args.prompts)
    prompts = [caption_for(*TRAIN_COMBOS[i * step]) for i in range(args.prompts)]
    requests = [ImageRequest(p, args.first_seed + s) for p in prompts for s in range(args.seeds)]
    images: list[np.ndarray] = []
    with torch.inference_mode():
        for i in tqdm(range(0, len(requests), args.batch), desc="generate", unit="call"):
            images += generate(pipe, requests[i:i + args.batch], steps=20, guidance=5.0, width=64, height=64)
    ratings = {v: [rate(im, r.prompt, version=v) for im, r in zip(images, requests, strict=True)] for v in (1, 2)}

    parts = {}
    for part in PARTS:
        values = np.array([getattr(r, part) for r in ratings[2]])
        parts[part] = {"p5": float(np.percentile(values, 5)), "p95": float(np.percentile(values, 95)),
                       "mean": float(values.mean())}
    shares = {}
    for v in (1, 2):
        totals: dict[str, list[float]] = {}
        for r, req in zip(ratings[v], requests, strict=True):
            totals.setdefault(req.prompt, []).append(r.total)
        shares[v] = clear_share(totals)
        parts[f"total v{v}"] = {"p5": float(np.percentile(sum(totals.values(), []), 5)),
                                "p95": float(np.percentile(sum(totals.values(), []), 95)),
                                "mean": float(np.mean(sum(totals.values(), [])))}

    print(f"{len(images)} images: {args.prompts} prompts x {args.seeds} seeds from {args.first_seed}, DDIM 20, CFG 5 "
          f"({args.model})")
    print("| part | 5th pct | 95th pct | mean |\n|---|---|---|---|")
    for part, s in parts.items():
        print(f"| {part} | {s['p5']:.3f} | {s['p95']:.3f} | {s['mean']:.3f} |")
    print(f"same-prompt seed pairs with totals >= {CLEAR} apart: v1 {shares[1]:.1%}, v2 {shares[2]:.1%} "
          f"(v2 / v1 = {shares[2] / max(shares[1], 1e-9):.1f}x)")

    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        inputs = np.array([(r.area, r.centre_offset) for r in ratings[2]])
        (args.out / "results.json").write_text(json.dumps(
            {"model": args.model, "prompts": prompts, "seeds": args.seeds, "parts_v2": parts,
             "clear_pairs": {"v1": shares[1], "v2": shares[2]}, "clear_gap": CLEAR,
             "area_share_p5_p95": [float(np.percentile(inputs[:, 0], q)) for q in (5, 95)],
             "centre_offset_p5_p95": [float(np.percentile(inputs[:, 1], q)) for q in (5, 95)]}, indent=1))
        save_pictures(args.out, images, ratings[2], inputs, args.seeds)
    return 0


def save_pictures(out: Path, images: list[np.ndarray], ratings: list[Rating], inputs: np.ndarray, seeds: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from diffusers.utils import make_image_grid
    from PIL import Image

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    axes[0].hist(inputs[:, 0], bins=30)
    axes[0].axvline(PREFERRED_AREA, color="k", ls="--")
    axes[0].set_xlabel("shape's share of the frame (dashed: preferred)")
    axes[1].hist(inputs[:, 1], bins=30)
    axes[1].set_xlabel("centre offset (half-widths)")
    axes[2].hist([r.framing for r in ratings], bins=30)
    axes[2].set_xlabel("framing score (v2)")
    fig.tight_layout()
    fig.savefig(out / "framing_spread.png", dpi=100)
    order = np.argsort([r.framing for r in ratings[:seeds]])  # the first prompt's seeds, worst to best framing
    tiles = [Image.fromarray(images[i]).resize((96, 96), Image.Resampling.NEAREST) for i in order]
    cols = 12
    tiles = tiles[: (len(tiles) // cols) * cols]
    make_image_grid(tiles, rows=len(tiles) // cols, cols=cols).save(out / "first_prompt_by_framing.png")


if __name__ == "__main__":
    sys.exit(main())
