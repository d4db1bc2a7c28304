"""Curves and image grids saved as PNG next to the numbers they explain."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image


def image_grid(images: list[np.ndarray] | np.ndarray, cols: int, pad: int = 2, scale: int = 1) -> Image.Image:
    """Tile equally sized RGB uint8 images into one picture (row-major)."""
    images = [np.asarray(im) for im in images]
    h, w, _ = images[0].shape
    rows = (len(images) + cols - 1) // cols
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        canvas[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = im
    grid = Image.fromarray(canvas)
    if scale != 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
    return grid


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
