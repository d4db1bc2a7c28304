"""The shapes world: procedural 64x64 captioned images that let the whole system be trained and judged on a CPU.

One filled shape of one colour on a uniform background of another colour. Some (shape colour, shape, background)
combinations are held out of every training set so that evaluation can test composition, not memory.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 4  # render at 4x and downsample: anti-aliased, crisp edges like a clean photo of a flat shape

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 215, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# (shape colour, shape, background colour). Every colour and shape still occurs in training in other combinations.
HELD_OUT: tuple[tuple[str, str, str], ...] = (
    ("red", "circle", "blue"),
    ("green", "square", "yellow"),
    ("blue", "triangle", "white"),
    ("yellow", "circle", "black"),
    ("white", "square", "red"),
    ("black", "triangle", "green"),
    ("red", "triangle", "yellow"),
    ("blue", "square", "black"),
    ("white", "circle", "green"),
    ("yellow", "triangle", "blue"),
)

ALL_COMBOS: tuple[tuple[str, str, str], ...] = tuple(
    (fg, shape, bg) for fg in COLOURS for shape in SHAPES for bg in COLOURS if fg != bg
)
TRAIN_COMBOS: tuple[tuple[str, str, str], ...] = tuple(c for c in ALL_COMBOS if c not in HELD_OUT)


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    background: str
    cx: float  # centre, pixels
    cy: float
    size: float  # half-extent (radius / half side), pixels

    @property
    def caption(self) -> str:
        return caption_for(self.colour, self.shape, self.background)


def caption_for(colour: str, shape: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def parse_caption(caption: str) -> tuple[str, str, str]:
    """Inverse of `caption_for`; raises ValueError for captions outside the world."""
    words = caption.strip().lower().split()
    if len(words) != 7 or words[0] != "a" or words[3:5] != ["on", "a"] or words[6] != "background":
        raise ValueError(f"not a shapes-world caption: {caption!r}")
    colour, shape, background = words[1], words[2], words[5]
    if colour not in COLOURS or background not in COLOURS or shape not in SHAPES:
        raise ValueError(f"unknown colour or shape in caption: {caption!r}")
    return colour, shape, background


def vocabulary() -> list[str]:
    """Every word a shapes-world caption can contain (the tokenizer makes each a single token)."""
    return sorted({"a", "on", "background", *COLOURS, *SHAPES})


def sample_scene(rng: random.Random, combos: tuple[tuple[str, str, str], ...] = TRAIN_COMBOS) -> Scene:
    colour, shape, background = rng.choice(combos)
    size = rng.uniform(10.0, 22.0)
    margin = size + 2.0
    cx = rng.uniform(margin, IMAGE_SIZE - margin)
    cy = rng.uniform(margin, IMAGE_SIZE - margin)
    return Scene(colour, shape, background, cx, cy, size)


def shape_polygon(shape: str, cx: float, cy: float, size: float) -> list[tuple[float, float]] | None:
    """Vertices of a polygonal shape (None for the circle). The triangle is equilateral, upright, centred on its
    bounding box so that `size` is its half-width like the square's."""
    if shape == "square":
        return [(cx - size, cy - size), (cx + size, cy - size), (cx + size, cy + size), (cx - size, cy + size)]
    if shape == "triangle":
        h = size * 3**0.5  # height of an equilateral triangle of side 2*size
        return [(cx, cy - h / 2), (cx + size, cy + h / 2), (cx - size, cy + h / 2)]
    if shape == "circle":
        return None
    raise ValueError(f"unknown shape {shape!r}")


def render_mask(shape: str, cx: float, cy: float, size: float, height: int = IMAGE_SIZE, width: int = IMAGE_SIZE,
                supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Anti-aliased coverage in [0, 1], shape (height, width)."""
    s = supersample
    canvas = Image.new("L", (width * s, height * s), 0)
    draw = ImageDraw.Draw(canvas)
    poly = shape_polygon(shape, cx, cy, size)
    if poly is None:
        draw.ellipse([(cx - size) * s, (cy - size) * s, (cx + size) * s, (cy + size) * s], fill=255)
    else:
        draw.polygon([(x * s, y * s) for x, y in poly], fill=255)
    small = canvas.resize((width, height), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def render(scene: Scene) -> np.ndarray:
    """uint8 RGB image, shape (64, 64, 3)."""
    cover = render_mask(scene.shape, scene.cx, scene.cy, scene.size)[..., None]
    fg = np.array(COLOURS[scene.colour], dtype=np.float32)
    bg = np.array(COLOURS[scene.background], dtype=np.float32)
    img = cover * fg + (1.0 - cover) * bg
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


Combos = tuple[tuple[str, str, str], ...]


def iter_samples(seed: int, combos: Combos = TRAIN_COMBOS) -> Iterator[tuple[Scene, np.ndarray]]:
    """Endless deterministic stream of (scene, image) for a seed."""
    rng = random.Random(seed)
    while True:
        scene = sample_scene(rng, combos)
        yield scene, render(scene)


def make_arrays(n: int, seed: int, combos: tuple[tuple[str, str, str], ...] = TRAIN_COMBOS
                ) -> tuple[np.ndarray, list[Scene]]:
    """n images as a uint8 array (n, 64, 64, 3) plus their scenes."""
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    scenes: list[Scene] = []
    for i, (scene, img) in zip(range(n), iter_samples(seed, combos), strict=False):
        images[i] = img
        scenes.append(scene)
    return images, scenes


def write_dataset(out: Path, n: int, seed: int = 0, split: str = "train") -> Path:
    """Write PNGs plus `metadata.jsonl` (file_name, caption and the scene), the layout of a diffusers/HF imagefolder."""
    if n < 1:
        raise ValueError("--n must be >= 1")
    combos = {"train": TRAIN_COMBOS, "heldout": HELD_OUT, "all": ALL_COMBOS}[split]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "metadata.jsonl", "w") as meta:
        for i, (scene, img) in zip(range(n), iter_samples(seed, combos), strict=False):
            name = f"{i:06d}.png"
            Image.fromarray(img).save(out / name)
            meta.write(json.dumps({"file_name": name, "caption": scene.caption, **asdict(scene)}) + "\n")
    return out
