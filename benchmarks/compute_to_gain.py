"""Gain versus training compute for fine-tuning runs side by side (SPO vs Diffusion-DPO), one run of this script.

    python benchmarks/compute_to_gain.py --base models/spo-tiny --run spo=runs/spo-snap --run dpo=runs/dpo-snap \
        [--reference spo] [--extra-seconds dpo=783] [--n-heldout 256] [--previous OLD_OUT] [--out DIR]
    python benchmarks/compute_to_gain.py --report-only --out DIR      # redo the report from DIR/results.json

Each run is a trainer output folder made with `--snapshot-every N`: its snapshots/ plus the final weights. Every point
(the base model counts as 0 seconds for every run) generates the same held-out prompts x seeds (DDIM 20, CFG 5) and is
rated; its gain is the mean paired difference of the rater's `--metric` (its total by default; `quality`, the
detail-quality part, is what the rater-v1 results used) against the base images. The paper's
compute claim is read off these curves: the training seconds each run needs to reach base + half of the reference
run's final gain (at the first crossing, and from where the curve stays above: one lucky early point does not
decide that one; linear between points), and their ratios. `--extra-seconds` adds compute spent
outside the trainer (e.g. generating and labelling DPO's pairs, or training the SPM) to a second column.
`--previous DIR` adds the curves of an earlier run of this script (checked to have the same base images), so a new
method can be set against an old baseline without retraining it. Writes results.json (with the final points'
per-image scores), report.md and gain_vs_compute.png to --out.
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

from training.evaluate import (  # noqa: E402
    eval_items,
    first_crossing,
    generate_and_rate,
    paired_gain,
    settled_crossing,
    win_rate,
)
from training.rater import RATER_VERSION  # noqa: E402

METRICS = ("total", "quality", "alignment", "framing")


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
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="models/spo-tiny")
    parser.add_argument("--run", action="append", default=[], metavar="NAME=DIR")
    parser.add_argument("--reference", default=None, help="run whose final gain defines the target (default: first)")
    parser.add_argument("--extra-seconds", action="append", default=[], metavar="NAME=SECONDS")
    parser.add_argument("--n-heldout", type=int, default=256)
    parser.add_argument("--metric", choices=METRICS, default="total",
                        help="the rater's score the gain is measured in (default: total)")
    parser.add_argument("--out", default="runs/compute-to-gain")
    parser.add_argument("--report-only", action="store_true", help="redo report.md and the plot from OUT/results.json")
    parser.add_argument("--previous", default=None, metavar="DIR",
                        help="also show the runs of an earlier results.json (DIR/results.json) whose base images are "
                             "the same (checked: equal base score on the same held-out items, same metric and rater)")
    args = parser.parse_args()

    from service.worker.pipeline import load_pipeline

    out = Path(args.out)
    results = upgrade(json.loads((out / "results.json").read_text())) if args.report_only else None
    runs = {}
    for spec in args.run:
        name, sep, folder = spec.partition("=")
        if not sep or not (Path(folder) / "train_info.json").is_file():
            parser.error(f"argument --run: expected NAME=DIR of a finished trainer output, got {spec!r}")
        runs[name] = run_points(Path(folder))
    previous = None
    if args.previous:
        prev_path = Path(args.previous) / "results.json"
        if not prev_path.is_file():
            parser.error(f"argument --previous: no results.json in {args.previous!r}")
        previous = upgrade(json.loads(prev_path.read_text()))
        if previous["base"] != args.base or previous["n_heldout"] != args.n_heldout:
            parser.error(f"argument --previous: {prev_path} was made with --base {previous['base']} and "
                         f"--n-heldout {previous['n_heldout']}; use the same")
        if (previous["metric"], previous["rater_version"]) != (args.metric, RATER_VERSION):
            parser.error(f"argument --previous: {prev_path} measured {previous['metric']} with rater "
                         f"v{previous['rater_version']}; this run measures {args.metric} with v{RATER_VERSION}")
        clash = sorted(set(previous["runs"]) & set(runs))
        if clash:
            parser.error(f"argument --previous: run names {clash} are in {prev_path} too; rename them")
    names = list(results["runs"]) if results else list(runs) + list(previous["runs"] if previous else [])
    if not names:
        parser.error("argument --run: give at least one NAME=DIR (or --report-only with OUT/results.json)")
    reference = args.reference or (results["reference"] if results else names[0])
    if reference not in names:
        parser.error(f"argument --reference: {reference!r} is not one of the runs {names}")
    extra = {}
    for spec in args.extra_seconds:
        name, sep, value = spec.partition("=")
        if not sep or name not in names:
            parser.error(f"argument --extra-seconds: expected NAME=SECONDS for a run name, got {spec!r}")
        extra[name] = float(value)
    if results:
        write_report({**results, "reference": reference, "extra_seconds": extra or results.get("extra_seconds", {})},
                     out)
        return

    items = eval_items(0, args.n_heldout)
    _, base_records = generate_and_rate(load_pipeline(args.base), items, desc="base")
    base_q = [r[args.metric] for r in base_records]
    base_a = float(np.mean([r["alignment"] for r in base_records]))
    # Same items, same base weights: the base images must come out the same, or the old curves do not apply. Another
    # thread count may round a few pixels differently; 1e-4 is far below the gains' standard errors (~2e-3).
    base_shift = float(np.mean(base_q)) - previous["base_score"] if previous is not None else 0.0
    if abs(base_shift) > 1e-4:
        sys.exit(f"--previous: base {args.metric} {np.mean(base_q):.6f} differs from {previous['base_score']:.6f} "
                 f"in {args.previous}: the base images changed, rerun those runs instead")
    scores = {}  # (run, step) -> per-image scores, for head-to-head comparisons
    for name, points in runs.items():
        for point in points:
            _, records = generate_and_rate(load_pipeline(args.base, lora=point["lora"]), items,
                                           desc=f"{name} step {point['step']}")
            q = [r[args.metric] for r in records]
            scores[name, point["step"]] = q
            point["gain"], point["gain_se"] = paired_gain(q, base_q)
            point["score"] = float(np.mean(q))
            point["detail_quality"] = float(np.mean([r["quality"] for r in records]))
            point["alignment"] = float(np.mean([r["alignment"] for r in records]))
            point["win_rate"] = win_rate(q, base_q)
        points.insert(0, {"step": 0, "seconds": 0.0, "lora": None, "gain": 0.0, "gain_se": 0.0,
                          "score": float(np.mean(base_q)), "alignment": base_a})

    final_scores = {name: scores[name, points[-1]["step"]] for name, points in runs.items()}
    if previous is not None:
        runs.update(previous["runs"])
        final_scores.update(previous["final_scores"])
        extra = {**previous.get("extra_seconds", {}), **extra}
    with_images = [n for n in names if n in final_scores]  # older results.json files kept no per-image scores
    head_to_head = {f"{a} vs {b}": win_rate(final_scores[a], final_scores[b])
                    for i, a in enumerate(with_images) for b in with_images[i + 1:]}
    if previous is not None:
        head_to_head = {**previous["head_to_head"], **head_to_head}
    out.mkdir(parents=True, exist_ok=True)
    results = {"base": args.base, "n_heldout": args.n_heldout, "reference": reference, "extra_seconds": extra,
               "metric": args.metric, "rater_version": RATER_VERSION,
               "base_score": float(np.mean(base_q)), "base_alignment": base_a, "runs": runs,
               "head_to_head": head_to_head, "final_scores": final_scores,
               "previous": args.previous, "previous_base_quality_shift": base_shift}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    write_report(results, out)


def write_report(results: dict, out: Path) -> None:
    """report.md and gain_vs_compute.png from results.json: the time each run needs to reach base + half of the
    reference run's final gain, as the first crossing and as the point from which it stays above."""
    runs, reference, extra = results["runs"], results["reference"], results["extra_seconds"]
    target = runs[reference][-1]["gain"] / 2
    if target <= 0:
        print(f"{reference} ends no better than base (gain {2 * target:+.4f}): there is no half gain to reach")
    reach = {}
    for name, points in runs.items():
        curve = ([p["seconds"] for p in points], [p["gain"] for p in points])
        reach[name] = {"first": first_crossing(*curve, target) if target > 0 else None,
                       "settled": settled_crossing(*curve, target) if target > 0 else None}

    def minutes(s: float | None, name: str, with_data: bool = False) -> str:
        return "not reached" if s is None else f"{(s + (extra.get(name, 0.0) if with_data else 0.0)) / 60:.1f} min"

    base_q, metric = results["base_score"], results["metric"]
    outside = ", ".join(f"{k}: {v:.0f} s" for k, v in extra.items())
    lines = [f"Rater v{results['rater_version']}, metric: {metric}. "
             f"Target: base {metric} {base_q:.4f} + half of {reference}'s final gain ({2 * target:+.4f}) = "
             f"{base_q + target:.4f}; {results['n_heldout']} held-out images per point. Time to half gain: training "
             f"seconds at the first crossing / from where the curve stays above (linear between points); 'incl. data' "
             f"adds compute spent outside the trainer ({outside or 'none'}).",
             "", f"| run | final step | train time | {metric} | gain (95%) | alignment | win-rate vs base (95%) "
             "| half gain, first | half gain, stays | stays, incl. data |", "|---" * 10 + "|"]
    for name, points in runs.items():
        f, w, r = points[-1], points[-1]["win_rate"], reach[name]
        lines.append(f"| {name} | {f['step']} | {f['seconds'] / 60:.1f} min | {f['score']:.4f} | "
                     f"{f['gain']:+.4f} ± {1.96 * f['gain_se']:.4f} | {f['alignment']:.3f} | "
                     f"{w['win_rate']:.3f} [{w['ci_low']:.3f}, {w['ci_high']:.3f}] | {minutes(r['first'], name)} | "
                     f"{minutes(r['settled'], name)} | {minutes(r['settled'], name, with_data=True)} |")
    lines += ["", f"Head to head, final weights ({metric}, ties half):", ""]
    lines += [f"- {k}: {v['win_rate']:.3f} [{v['ci_low']:.3f}, {v['ci_high']:.3f}]"
              for k, v in results["head_to_head"].items()]
    ref = reach[reference]
    for name in runs:
        if name == reference:
            continue
        for how in ("first", "settled"):
            if reach[name][how] and ref[how]:
                with_data = (reach[name][how] + extra.get(name, 0)) / (ref[how] + extra.get(reference, 0))
                lines.append(f"- compute to half gain ({how}), {name} / {reference}: "
                             f"{reach[name][how] / ref[how]:.2f}x training only, {with_data:.2f}x incl. data")
    report = "\n".join(lines) + "\n"
    (out / "report.md").write_text(report)
    print(report)
    save_plot(runs, target, metric, out / "gain_vs_compute.png")


def upgrade(results: dict) -> dict:
    """Read a results.json from before metrics were selectable: those measured the quality part with rater v1."""
    if "metric" in results:
        return results
    results = {**results, "metric": "quality", "rater_version": 1, "base_score": results.pop("base_quality"),
               "final_scores": results.pop("final_quality", {}), "head_to_head": results.pop("head_to_head_quality")}
    for points in results["runs"].values():
        for point in points:
            point["score"] = point.pop("quality")
    return results


def save_plot(runs: dict[str, list[dict]], target: float, metric: str, path: Path) -> None:
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
    ax.set_ylabel(f"{metric} gain over base (paired mean, 95%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
