"""Generic preference pairs: shapes-world renders with drawn defects, labelled by the rater.

SPO's step-aware preference model does not start from scratch: it wraps PickScore, a CLIP already fine-tuned on a
large generic preference set (Pick-a-Pic) before it ever sees a noisy image (docs/spo.md §1). The toy's tiny CLIP has no
such start, and spo-tiny's own pairs are too few and too subtle to learn what "quality" is from nothing
(benchmarks/results/spm-ceiling-cpu-2026-11-26).
This module is the toy's Pick-a-Pic: cheap renders of the shapes world, each with its own random mix of the defects
the rater's quality part measures (a blurred edge, a wobbly outline, a blotchy or noisy background, stray specks)
and now and then a wrong colour or shape, paired by prompt and labelled by the rater with the same Bradley-Terry
noise as the model-made pairs. `spo train spm --clean-images` on them gives a tiny "PickScore"; the SPM is then
trained from it (`--init`) on the diffusion model's pairs, as in the paper.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from .preference_data import GeneratedPair, PairPlan, plan_pairs, write_shards
from .shapes import COLOURS, IMAGE_SIZE, SHAPES, parse_caption, render_mask, sample_scene

RENDER_MODEL = "shapes-render"  # the "model" column of render pairs


@dataclass(frozen=True)
class Defects:
    """How much of each defect one render gets (0: none)."""

    blur: float  # Gaussian sigma in pixels, applied to the whole image (crispness)
    warp: float  # peak displacement of the outline in pixels, smooth random field (regularity)
    blotches: float  # amplitude of smooth background colour variation, RGB units (uniformity)
    noise: float  # per-pixel Gaussian noise, RGB units (uniformity)
    specks: int  # stray blobs (clean)
    wrong: str  # "" or which caption part is rendered wrong: "colour" | "shape" | "background" (alignment)


def draw_defects(rng: random.Random) -> Defects:
    """Each defect is absent about half the time and otherwise of a random strength, so pairs range from nearly
    equal to plainly different, like the images of two different models."""
    def maybe(p: float, lo: float, hi: float) -> float:
        return rng.uniform(lo, hi) if rng.random() < p else 0.0

    wrong = rng.choice(("colour", "shape", "background")) if rng.random() < 0.1 else ""
    specks = rng.choice((1, 1, 2, 3)) if rng.random() < 0.3 else 0
    return Defects(blur=maybe(0.5, 0.3, 1.6), warp=maybe(0.6, 0.3, 3.0), blotches=maybe(0.4, 3.0, 30.0),
                   noise=maybe(0.3, 2.0, 12.0), specks=specks, wrong=wrong)


def _smooth_field(rng: np.random.Generator, sigma: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """A smooth random field with peak magnitude 1."""
    f = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma, mode="wrap")
    return f / max(float(np.abs(f).max()), 1e-6)


def render_with_defects(caption: str, seed: int, defects: Defects | None = None) -> tuple[np.ndarray, Defects]:
    """One 64x64 uint8 render for `caption` with its own scene and defects, all drawn from `seed` (the defects
    unless given)."""
    rng = random.Random(seed)
    colour, shape, background = parse_caption(caption)
    drawn = draw_defects(rng)  # drawn either way, so a given `defects` changes nothing else about the render
    defects = drawn if defects is None else defects
    if defects.wrong == "colour":
        colour = rng.choice([c for c in COLOURS if c not in (colour, background)])
    elif defects.wrong == "shape":
        shape = rng.choice([s for s in SHAPES if s != shape])
    elif defects.wrong == "background":
        background = rng.choice([c for c in COLOURS if c not in (colour, background)])
    scene = sample_scene(rng, ((colour, shape, background),))
    np_rng = np.random.default_rng(seed)

    cover = render_mask(scene.shape, scene.cx, scene.cy, scene.size)
    if defects.warp > 0:
        grid = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float64)
        sigma = rng.uniform(2.5, 6.0)
        dy, dx = _smooth_field(np_rng, sigma), _smooth_field(np_rng, sigma)
        cover = ndimage.map_coordinates(cover, [grid[0] + defects.warp * dy, grid[1] + defects.warp * dx],
                                        order=1, mode="constant", cval=0.0)
    fg = np.array(COLOURS[colour], dtype=np.float64)
    bg = np.broadcast_to(np.array(COLOURS[background], dtype=np.float64), (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
    if defects.blotches > 0:
        bg += defects.blotches * np.stack([_smooth_field(np_rng, rng.uniform(3.0, 8.0)) for _ in range(3)], -1)
    img = cover[..., None] * fg + (1.0 - cover[..., None]) * bg
    for _ in range(defects.specks):
        r = rng.uniform(0.7, 2.5)
        # Specks sit away from the shape, as spo-tiny's stray blobs do.
        for _try in range(20):
            y, x = rng.uniform(4, IMAGE_SIZE - 4), rng.uniform(4, IMAGE_SIZE - 4)
            if (y - scene.cy) ** 2 + (x - scene.cx) ** 2 > (scene.size + 4 + r) ** 2:
                break
        speck = render_mask("circle", x, y, r)[..., None]
        tint = fg if rng.random() < 0.6 else np.array(COLOURS[rng.choice(list(COLOURS))], dtype=np.float64)
        img = speck * tint + (1.0 - speck) * img
    if defects.blur > 0:
        img = ndimage.gaussian_filter(img, (defects.blur, defects.blur, 0), mode="nearest")
    if defects.noise > 0:
        img = img + np_rng.normal(0.0, defects.noise, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), defects


def render_pairs(plans: list[PairPlan]) -> Iterator[GeneratedPair]:
    """Both images of each planned pair (the plan's two seeds drive scene and defects), rated by the rater."""
    for plan in plans:
        yield GeneratedPair.rated(plan, render_with_defects(plan.caption, plan.seed_0)[0],
                                  render_with_defects(plan.caption, plan.seed_1)[0])


def plan_render_pairs(n: int, seed: int = 0, split: str = "train") -> list[PairPlan]:
    """The same prompt/seed/label-draw plan as model-made pairs (no CFG scale or step count)."""
    return [PairPlan(p.index, p.caption, p.seed_0, p.seed_1, p.u_label, 0.0, 0.0, 0, 0)
            for p in plan_pairs(n, seed, split)]


def write_render_pairs(out: Path | str, n: int, *, temperature: float = 0.005, seed: int = 0, split: str = "train",
                       tie_rate: float = 0.0) -> dict:
    """`n` labelled render pairs as Pick-a-Pic parquet shards at `out` (`spo data renders`); returns the summary."""
    plans = plan_render_pairs(n, seed, split)
    return write_shards(out, plans, render_pairs, model_name=RENDER_MODEL, temperature=temperature,
                        tie_rate=tie_rate, record=dict(model=RENDER_MODEL, split=split, seed=seed))
