"""Training curves saved as PNG next to the numbers they explain (image grids: diffusers' `make_image_grid`)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np


def save_curves(log_path: Path, out_png: Path, keys: tuple[str, ...] = ("loss", "psnr"), smooth: int = 25,
                step_key: str = "step") -> Path:
    """One panel per (stage, key) found in a jsonl training log, with a moving average over `smooth` records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
    for line in Path(log_path).read_text().splitlines():
        rec = json.loads(line)
        for k in keys:
            if k in rec and rec[k] is not None and not (isinstance(rec[k], float) and np.isnan(rec[k])):
                series[(rec.get("stage", "train"), k)].append((rec[step_key], rec[k]))
    if not series:
        return out_png
    fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 3.4), squeeze=False)
    for ax, ((stage, key), pts) in zip(axes[0], sorted(series.items()), strict=True):
        steps, vals = np.array(pts).T
        ax.plot(steps, vals, alpha=0.3, lw=0.8)
        if len(vals) >= smooth:
            ax.plot(steps[smooth - 1:], np.convolve(vals, np.ones(smooth) / smooth, mode="valid"), lw=1.5)
        ax.set_title(f"{stage}: {key}")
        ax.set_xlabel(step_key)
        if key == "loss" and (vals > 0).all():
            ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
