"""Evaluation on the shapes world: generate for fixed prompts x seeds, rate every image, summarise, save grids.

Used for the base model's quality report (`spo eval base`) and by the fine-tuning comparisons.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from .rater import RATER_VERSION, rate
from .shapes import HELD_OUT, TRAIN_COMBOS, caption_for

if TYPE_CHECKING:

    from service.worker.pipeline import Pipeline

    from .spm import StepAwarePreferenceModel


@dataclass(frozen=True)
class EvalItem:
    split: str  # "train" | "heldout"
    caption: str
    seed: int


def eval_items(n_train: int, n_heldout: int, seed: int = 1234) -> list[EvalItem]:
    """Fixed prompts x seeds: training combinations cycled in a shuffled order, held-out ones cycled in order."""
    rng = random.Random(seed)
    train = list(TRAIN_COMBOS)
    rng.shuffle(train)
    items = [EvalItem("train", caption_for(*train[i % len(train)]), 10_000 + i) for i in range(n_train)]
    items += [EvalItem("heldout", caption_for(*HELD_OUT[i % len(HELD_OUT)]), 20_000 + i) for i in range(n_heldout)]
    return items


def generate_and_rate(pipe: Pipeline, items: list[EvalItem], steps: int = 20, guidance: float = 5.0,
                      batch: int = 48, desc: str = "eval") -> tuple[list[np.ndarray], list[dict]]:
    from service.worker.pipeline import generate
    from service.worker.runner import ImageRequest

    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    images: list[np.ndarray] = []
    records: list[dict] = []
    for start in tqdm(range(0, len(items), batch), desc=desc, dynamic_ncols=True):
        chunk = items[start:start + batch]
        out = generate(pipe, [ImageRequest(it.caption, it.seed) for it in chunk], steps=steps, guidance=guidance,
                       width=size, height=size)
        for it, img in zip(chunk, out, strict=True):
            images.append(img)
            rating = rate(img, it.caption).as_dict()
            records.append({"split": it.split, "caption": it.caption, "seed": it.seed, **rating})
    return images, records


def summarise(records: list[dict]) -> dict[str, dict[str, float]]:
    """Per split: rates of each alignment part being right, all three right, and mean quality parts."""
    out: dict[str, dict[str, float]] = {}
    for split in sorted({r["split"] for r in records}):
        rs = [r for r in records if r["split"] == split]
        both = [r["background"] == 1.0 and r["colour"] == 1.0 for r in rs]
        out[split] = {"images": len(rs), "colours_right": float(np.mean(both))}
        for key in ("background", "colour", "shape", "all_right", "alignment", "uniformity", "crispness", "clean",
                    "regularity", "quality", "size", "placement", "framing", "total"):
            out[split][key] = float(np.mean([float(r[key]) for r in rs]))
    return out


def heldout_rating(pipe: Pipeline, n: int = 20, seed: int = 777) -> dict[str, float]:
    """Mean rater parts on held-out prompts with fixed seeds (DDIM 20, CFG 5): the curve to watch during
    fine-tuning (SPO and Diffusion-DPO log it every `eval_every`)."""
    import torch

    items = [EvalItem("heldout", caption_for(*HELD_OUT[i % len(HELD_OUT)]), seed + i) for i in range(n)]
    with torch.no_grad():
        _, records = generate_and_rate(pipe, items, batch=n, desc="held-out eval")
    s = summarise(records)["heldout"]
    return {"total": s["total"], "framing": s["framing"], "quality": s["quality"], "alignment": s["alignment"],
            "all_right": s["all_right"]}


def labelled_grid(images: list[np.ndarray], labels: list[str], cols: int = 8, scale: int = 2) -> Image.Image:
    """Images scaled up with a caption line under each, for reading results at a glance."""
    h, w, _ = images[0].shape
    tile_w, tile_h = w * scale, h * scale + 22
    rows = (len(images) + cols - 1) // cols
    canvas = Image.new("RGB", (cols * (tile_w + 4) + 4, rows * (tile_h + 4) + 4), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        r, c = divmod(i, cols)
        x, y = 4 + c * (tile_w + 4), 4 + r * (tile_h + 4)
        canvas.paste(Image.fromarray(img).resize((w * scale, h * scale), Image.Resampling.NEAREST), (x, y))
        words = label.replace(" background", "").replace("a ", "").split()
        draw.text((x + 1, y + h * scale + 1), " ".join(words[:2]), fill="black")
        draw.text((x + 1, y + h * scale + 11), " ".join(words[2:]), fill="gray")
    return canvas


def write_report(out: Path, title: str, summary: dict, records: list[dict], extra: dict | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"summary": summary, "rater_version": RATER_VERSION, **(extra or {}),
                                                  "images": records}, indent=1))
    cols = ["images", "background", "colour", "shape", "colours_right", "all_right", "uniformity", "crispness",
            "clean", "regularity", "quality"]
    lines = [f"# {title}", "", "| split | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for split, s in summary.items():
        cells = [f"{int(s[c])}" if c == "images" else f"{s[c]:.3f}" for c in cols]
        lines.append(f"| {split} | " + " | ".join(cells) + " |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out / "report.md"


def evaluate_base(model: Path, out: Path, n_train: int = 240, n_heldout: int = 200, steps: int = 20,
                  guidance: float = 5.0) -> dict:
    """Quality of a base model on training and held-out combinations (DDIM, fixed seeds)."""
    from service.worker.pipeline import load_pipeline

    pipe = load_pipeline(str(model))
    items = eval_items(n_train, n_heldout)
    images, records = generate_and_rate(pipe, items, steps=steps, guidance=guidance)
    summary = summarise(records)
    write_report(out, f"Base model quality: {model}", summary, records,
                 {"model": str(model), "steps": steps, "guidance": guidance})
    for split in ("train", "heldout"):
        idx = [i for i, r in enumerate(records) if r["split"] == split][:32]
        labelled_grid([images[i] for i in idx], [records[i]["caption"] for i in idx]).save(out / f"grid_{split}.png")
    return summary


def win_rate(ours: list[float], theirs: list[float], z: float = 1.96) -> dict[str, float]:
    """Paired win-rate (ties count half) with a Wilson score interval at confidence z."""
    if len(ours) != len(theirs) or not ours:
        raise ValueError("win_rate needs two non-empty lists of equal length")
    a, b = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    n = len(a)
    p = float(((a > b) + 0.5 * (a == b)).mean())
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return {"win_rate": p, "ci_low": centre - half, "ci_high": centre + half, "n": n,
            "wins": int((a > b).sum()), "ties": int((a == b).sum()), "losses": int((a < b).sum())}


def paired_gain(ours: list[float], base: list[float]) -> tuple[float, float]:
    """Mean paired difference (same prompts and seeds) and its standard error: far tighter than comparing means."""
    d = np.asarray(ours) - np.asarray(base)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))


def first_crossing(seconds: list[float], gains: list[float], target: float) -> float | None:
    """Seconds at which the piecewise-linear gain curve first reaches `target` (None if it never does)."""
    for i in range(1, len(seconds)):
        if gains[i] >= target:
            s0, s1, g0, g1 = seconds[i - 1], seconds[i], gains[i - 1], gains[i]
            return s1 if g1 == g0 else s0 + (target - g0) / (g1 - g0) * (s1 - s0)
    return None


def settled_crossing(seconds: list[float], gains: list[float], target: float) -> float | None:
    """Seconds from which the curve stays at or above `target` to its end (None if it ends below): unlike the first
    crossing, one lucky early point does not decide it."""
    if gains[-1] < target:
        return None
    i = len(gains) - 1
    while i > 0 and gains[i - 1] >= target:
        i -= 1
    return seconds[0] if i == 0 else first_crossing(seconds[i - 1:], gains[i - 1:], target)


def evaluate_models(models: dict[str, tuple[str, str | None]], out: Path, n_heldout: int = 256, n_train: int = 0,
                    steps: int = 20, guidance: float = 5.0, grid_rows: int = 8) -> dict:
    """Generate the same prompts x seeds with every model (the first is the baseline), rate, compare, report.

    `models` maps a display name to (base pipeline folder, LoRA or None).
    """
    from service.worker.pipeline import load_pipeline

    items = eval_items(n_train, n_heldout)
    images: dict[str, list[np.ndarray]] = {}
    records: dict[str, list[dict]] = {}
    for name, (base, lora) in models.items():
        pipe = load_pipeline(base, lora=lora)
        images[name], records[name] = generate_and_rate(pipe, items, steps=steps, guidance=guidance, desc=name)
    names = list(models)
    baseline = names[0]
    summary = {name: summarise(records[name]) for name in names}
    comparisons = {}
    for name in names[1:]:
        comparisons[name] = {key: win_rate([r[key] for r in records[name]], [r[key] for r in records[baseline]])
                             for key in ("quality", "alignment", "framing", "total")}
    out.mkdir(parents=True, exist_ok=True)
    result = {"rater_version": RATER_VERSION, "models": {n: {"base": b, "lora": lo} for n, (b, lo) in models.items()},
              "steps": steps,
              "guidance": guidance, "summary": summary, f"vs_{baseline}": comparisons,
              "images": {n: records[n] for n in names}}
    (out / "results.json").write_text(json.dumps(result, indent=1))

    lines = [f"# Evaluation: {', '.join(names)}", "",
             f"{len(items)} images per model (DDIM {steps} steps, CFG {guidance}, fixed seeds).", "",
             "| model | split | background | colour | shape | all right | uniformity | crispness | clean | regularity "
             "| quality | alignment | size | placement | framing | total |", "|---" * 16 + "|"]
    for name in names:
        for split, s in summary[name].items():
            lines.append(f"| {name} | {split} | " + " | ".join(f"{s[k]:.3f}" for k in (
                "background", "colour", "shape", "all_right", "uniformity", "crispness", "clean", "regularity",
                "quality", "alignment", "size", "placement", "framing", "total")) + " |")
    keys = ("quality", "alignment", "framing", "total")
    lines += ["", f"Win-rate against {baseline} (rater v{RATER_VERSION}; ties count half; 95% Wilson interval):", "",
              "| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, comp in comparisons.items():
        cells = [f"{comp[k]['win_rate']:.3f} [{comp[k]['ci_low']:.3f}, {comp[k]['ci_high']:.3f}]" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (out / "report.md").write_text("\n".join(lines) + "\n")

    # Side by side: one row per prompt, one column per model.
    rows = list(range(0, len(items), max(1, len(items) // grid_rows)))[:grid_rows]
    tiles = [images[name][i] for i in rows for name in names]
    labels = [f"{name}: {records[name][i]['caption']}" for i in rows for name in names]
    labelled_grid(tiles, labels, cols=len(names)).save(out / "side_by_side.png")
    return result


# ------------------------------------------------------------------------------------- any prompts, a preference model


def load_preference_model(path: Path | str, processor: Path | str | None = None) -> StepAwarePreferenceModel:
    """A preference model to judge images by: an SPM folder (scored at t = 0) or a CLIP / PickScore-format folder
    (`processor`: the folder with its tokenizer and preprocessor config, when the model folder has none)."""
    from .spm import SPM_CONFIG, SPMConfig, StepAwarePreferenceModel

    if (Path(path) / SPM_CONFIG).is_file():
        return StepAwarePreferenceModel.from_pretrained(path).eval()
    return StepAwarePreferenceModel.from_clip(path, SPMConfig(time_conditioning=False), tokenizer=processor).eval()


def evaluate_prompts(models: dict[str, tuple[str, str | None]], prompts: list[str], out: Path,
                     scorer: StepAwarePreferenceModel, seeds: int = 1, steps: int = 20, guidance: float = 5.0,
                     batch: int = 8, device: str = "cpu", scorer_name: str = "preference model",
                     grid_rows: int = 8) -> dict:
    """Every model draws the same prompts x seeds; a preference model scores each image; each model's win-rate
    against the first (Wilson interval) and mean paired score gain (standard error) are reported.

    For prompts the shapes-world rater cannot judge: any CLIP-style preference model (PickScore format or an SPM).
    """
    import gc

    import torch

    from service.worker.pipeline import generate, load_pipeline
    from service.worker.runner import ImageRequest

    items = [(prompt, 1000 + j) for prompt in prompts for j in range(seeds)]
    scorer = scorer.to(device)
    scores: dict[str, list[float]] = {}
    thumbs: dict[str, list[np.ndarray]] = {}
    for name, (base, lora) in models.items():
        pipe = load_pipeline(base, lora=lora, device=device)
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        scores[name], thumbs[name] = [], []
        for start in tqdm(range(0, len(items), batch), desc=name, dynamic_ncols=True):
            chunk = items[start:start + batch]
            images = generate(pipe, [ImageRequest(p, s) for p, s in chunk], steps=steps, guidance=guidance,
                              width=size, height=size)
            pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255.0).to(device)
            with torch.no_grad():
                scores[name] += scorer.score(pixels, [p for p, _ in chunk], 0).tolist()
            for image in images:
                if len(thumbs[name]) < grid_rows:
                    thumbs[name].append(np.asarray(Image.fromarray(image).resize((128, 128))))
        del pipe
        gc.collect()
    names = list(models)
    baseline = names[0]
    comparisons = {}
    for name in names[1:]:
        gain, se = paired_gain(scores[name], scores[baseline])
        comparisons[name] = {**win_rate(scores[name], scores[baseline]), "mean_gain": gain, "gain_se": se}
    out.mkdir(parents=True, exist_ok=True)
    mean_score = {n: float(np.mean(scores[n])) for n in names}
    result = {"metric": scorer_name, "prompts": len(prompts), "seeds_per_prompt": seeds, "steps": steps,
              "guidance": guidance, "models": {n: {"base": b, "lora": lo} for n, (b, lo) in models.items()},
              "mean_score": mean_score, f"vs_{baseline}": comparisons,
              "images": [{"prompt": p, "seed": s, **{n: scores[n][i] for n in names}}
                         for i, (p, s) in enumerate(items)]}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Evaluation: {', '.join(names)}", "",
             f"{len(prompts)} prompts x {seeds} seed(s) per model (DDIM {steps} steps, CFG {guidance}), scored by "
             f"{scorer_name}.", "", f"| model | mean score | win-rate vs {baseline} (95% Wilson) | mean gain (se) |",
             "|---|---|---|---|", f"| {baseline} | {mean_score[baseline]:.3f} | | |"]
    for name, c in comparisons.items():
        lines.append(f"| {name} | {mean_score[name]:.3f} | {c['win_rate']:.3f} [{c['ci_low']:.3f}, "
                     f"{c['ci_high']:.3f}] ({c['wins']} / {c['ties']} / {c['losses']}) | {c['mean_gain']:+.3f} "
                     f"({c['gain_se']:.3f}) |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    rows = min(len(t) for t in thumbs.values())
    tiles = [thumbs[n][i] for i in range(rows) for n in names]
    labels = [f"{n}: {items[i][0]}" for i in range(rows) for n in names]
    labelled_grid(tiles, labels, cols=len(names), scale=1).save(out / "side_by_side.png")
    return result
