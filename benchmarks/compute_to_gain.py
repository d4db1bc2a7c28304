"""Gain versus training compute for fine-tuning runs side by side (SPO vs Diffusion-DPO), one run of this script.

    python benchmarks/compute_to_gain.py --base models/spo-tiny --run spo=runs/spo-snap --run dpo=runs/dpo-snap \
        [--reference spo] [--extra-seconds dpo=783] [--n-heldout 256] [--out DIR]

Each run is a trainer output folder made with `--snapshot-every N`: its snapshots/ plus the final weights. Every point
(the base model counts as 0 seconds for every run) generates the same held-out prompts x seeds (DDIM 20, CFG 5) and is
rated; its gain is the mean paired difference of the rater's quality part against the base images. The paper's
compute claim is read off these curves: the training seconds each run needs to reach base + half of the reference
run's final gain (first crossing, linear between points), and their ratio. `--extra-seconds` adds compute spent
outside the trainer (e.g. generating and labelling DPO's pairs) to a second column. Writes results.json, report.md and
gain_vs_compute.png to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from training.evaluate import eval_items, first_crossing, generate_and_rate, paired_gain, win_rate  # noqa: E402


def run_points(folder: Path) -> list[dict]:
    """The run's snapshots and its final weights, by training seconds: [{"step", "seconds", "lora"}]."""
    points = []
    for snap in sorted((folder / "snapshots").glob("*/snapshot.json")):
        meta = json.loads(snap.read_text())
        points.append({"step": meta["step"], "seconds": meta["train_seconds"], "lora": str(snap.parent)})
    info = json.loads((folder / "train_info.json").read_text())
    final_step = info.get("steps", info.get("batches"))
    if not points or points[-1]["step"] != final_step:
        points.append({"step": final_step, "seconds": info["seconds"], "lora": str(folder)})
    if not points:
        raise SystemExit(f"--run: {folder} has neither snapshots nor final weights")
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="models/spo-tiny")
    parser.add_argument("--run", action="append", required=True, metavar="NAME=DIR")
    parser.add_argument("--reference", default=None, help="run whose final gain defines the target (default: first)")
    parser.add_argument("--extra-seconds", action="append", default=[], metavar="NAME=SECONDS")
    parser.add_argument("--n-heldout", type=int, default=256)
    parser.add_argument("--out", default="runs/compute-to-gain")
    args = parser.parse_args()

    from service.pipeline import load_pipeline

    runs = {}
    for spec in args.run:
        name, sep, folder = spec.partition("=")
        if not sep or not (Path(folder) / "train_info.json").is_file():
            parser.error(f"argument --run: expected NAME=DIR of a finished trainer output, got {spec!r}")
        runs[name] = run_points(Path(folder))
    reference = args.reference or next(iter(runs))
    if reference not in runs:
        parser.error(f"argument --reference: {reference!r} is not one of the runs {sorted(runs)}")
    extra = {}
    for spec in args.extra_seconds:
        name, sep, value = spec.partition("=")
        if not sep or name not in runs:
            parser.error(f"argument --extra-seconds: expected NAME=SECONDS for a run name, got {spec!r}")
        extra[name] = float(value)

    items = eval_items(0, args.n_heldout)
    _, base_records = generate_and_rate(load_pipeline(args.base), items, desc="base")
    base_q = [r["quality"] for r in base_records]
    base_a = float(np.mean([r["alignment"] for r in base_records]))
    quality = {}  # (run, step) -> per-image quality, for head-to-head comparisons
    for name, points in runs.items():
        for point in points:
            _, records = generate_and_rate(load_pipeline(args.base, lora=point["lora"]), items,
                                           desc=f"{name} step {point['step']}")
            q = [r["quality"] for r in records]
            quality[name, point["step"]] = q
            point["gain"], point["gain_se"] = paired_gain(q, base_q)
            point["quality"] = float(np.mean(q))
            point["alignment"] = float(np.mean([r["alignment"] for r in records]))
            point["win_rate"] = win_rate(q, base_q)
        points.insert(0, {"step": 0, "seconds": 0.0, "lora": None, "gain": 0.0, "gain_se": 0.0,
                          "quality": float(np.mean(base_q)), "alignment": base_a})

    target = runs[reference][-1]["gain"] / 2
    if target <= 0:
        print(f"{reference} ends no better than base (gain {2 * target:+.4f}): there is no half gain to reach")
    summary = {}
    for name, points in runs.items():
        seconds = None
        if target > 0:
            seconds = first_crossing([p["seconds"] for p in points], [p["gain"] for p in points], target)
        summary[name] = {"final": points[-1], "seconds_to_half_gain": seconds,
                         "extra_seconds": extra.get(name, 0.0)}
    names = list(runs)
    head_to_head = {f"{a} vs {b}": win_rate(quality[a, runs[a][-1]["step"]], quality[b, runs[b][-1]["step"]])
                    for i, a in enumerate(names) for b in names[i + 1:]}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(
        {"base": args.base, "n_heldout": args.n_heldout, "reference": reference, "target_gain": target,
         "base_quality": float(np.mean(base_q)), "base_alignment": base_a, "runs": runs, "summary": summary,
         "head_to_head_quality": head_to_head}, indent=1) + "\n")

    def minutes(s: float | None) -> str:
        return "not reached" if s is None else f"{s / 60:.1f} min"

    lines = [f"Target: base quality {np.mean(base_q):.4f} + half of {reference}'s final gain "
             f"({2 * target:+.4f}) = {np.mean(base_q) + target:.4f}; {args.n_heldout} held-out images per point.", "",
             "| run | final step | train time | quality | gain (95%) | alignment | win-rate vs base (95%) "
             "| time to half gain | incl. data |", "|---" * 9 + "|"]
    for name, s in summary.items():
        f, w = s["final"], s["final"]["win_rate"]
        reach = s["seconds_to_half_gain"]
        lines.append(f"| {name} | {f['step']} | {f['seconds'] / 60:.1f} min | {f['quality']:.4f} | "
                     f"{f['gain']:+.4f} ± {1.96 * f['gain_se']:.4f} | {f['alignment']:.3f} | "
                     f"{w['win_rate']:.3f} [{w['ci_low']:.3f}, {w['ci_high']:.3f}] | {minutes(reach)} | "
                     f"{minutes(None if reach is None else reach + s['extra_seconds'])} |")
    lines += ["", "Head to head, final weights (quality part, ties half):", ""]
    lines += [f"- {k}: {v['win_rate']:.3f} [{v['ci_low']:.3f}, {v['ci_high']:.3f}]" for k, v in head_to_head.items()]
    times = {n: s["seconds_to_half_gain"] for n, s in summary.items()}
    for name in names:
        if name != reference and times[name] and times[reference]:
            with_data = (times[name] + extra.get(name, 0)) / (times[reference] + extra.get(reference, 0))
            lines.append(f"- compute to half gain, {name} / {reference}: {times[name] / times[reference]:.2f}x "
                         f"(training only), {with_data:.2f}x (incl. data)")
    report = "\n".join(lines) + "\n"
    (out / "report.md").write_text(report)
    print(report)
    save_plot(runs, target, out / "gain_vs_compute.png")


def save_plot(runs: dict[str, list[dict]], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in runs.items():
        x = [p["seconds"] / 60 for p in points]
        y = [p["gain"] for p in points]
        ax.errorbar(x, y, yerr=[1.96 * p["gain_se"] for p in points], marker="o", capsize=3, label=name)
    ax.axhline(target, color="grey", linestyle="--", label="half of the reference's final gain")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xlabel("training compute (minutes, this machine)")
    ax.set_ylabel("quality gain over base (paired mean, 95%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
