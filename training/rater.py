"""The rater: a transparent stand-in for human raters of shapes-world images.

It scores prompt alignment (is the background, the shape's colour and the shape type what the caption asks for),
visual quality (a clean uniform background, crisp edges, one clean shape without specks, a regular outline) and,
from version 2 on, framing: an aesthetic preference the caption does not ask for (the shape fills about a fifth of
the frame and sits near its centre), weighted as much as the other two together. Every part is in [0, 1], so
differences are easy to read and to turn into noisy preference labels.

Why framing: human preference has parts decided early in denoising (layout, composition) and parts decided late
(detail). Version 1 had only the late kind, and spo-tiny's seeds of one prompt differ by < 0.05 in its total for 98%
of pairs; their composition, decided across the early and middle steps, varies widely
(benchmarks/results/rater-v2-cpu-2026-12-03). `rate(..., version=1)` still rates as version 1 did.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from .shapes import COLOURS, SHAPES, parse_caption

_PALETTE_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in _PALETTE_NAMES], dtype=np.float32)
_FAR = 60.0  # RGB distance from the background beyond which a pixel is "something on the background"
_EIGHT = np.ones((3, 3), dtype=bool)
# Median IoU of rendered ground-truth shapes with their fitted template (pixelisation keeps triangles below 1).
_TYPICAL_IOU = {"circle": 0.97, "square": 1.0, "triangle": 0.95}

RATER_VERSION = 2  # what `rate` uses unless told otherwise; results record it as `rater_version`
RATER_VERSIONS = (1, 2)
PREFERRED_AREA = 0.2  # framing: the share of the frame the shape should cover ...
AREA_TOLERANCE = 0.25  # ... scored as a Gaussian in log(area / PREFERRED_AREA) with this standard deviation
CENTRE_TOLERANCE = 0.45  # framing: centre offset (in half-widths) at which placement scores 0
FRAMING_WEIGHT = 0.5  # v2 total: framing half, alignment and quality a quarter each (see `Rating.total`)


@dataclass(frozen=True)
class Rating:
    background: float  # alignment: background colour right
    colour: float  # alignment: shape colour right
    shape: float  # alignment: shape type right
    uniformity: float  # quality: background is one flat colour
    crispness: float  # quality: few half-way pixels along the outline
    clean: float  # quality: a single shape, no stray blobs or specks
    regularity: float  # quality: the outline matches an ideal circle / square / triangle
    detected_background: str
    detected_colour: str
    detected_shape: str
    size: float = 0.0  # framing (v2): the shape covers about PREFERRED_AREA of the frame
    placement: float = 0.0  # framing (v2): the shape's centre is near the frame's centre
    version: int = RATER_VERSION
    area: float = 0.0  # what size scores: the shape's share of the frame
    centre_offset: float = 1.0  # what placement scores: the shape centre's distance from the frame's, in half-widths

    @property
    def alignment(self) -> float:
        return (self.background + self.colour + self.shape) / 3.0

    @property
    def all_right(self) -> bool:
        return self.background == 1.0 and self.colour == 1.0 and self.shape == 1.0

    @property
    def quality(self) -> float:
        return (self.uniformity + self.crispness + self.clean + self.regularity) / 4.0

    @property
    def framing(self) -> float:
        return (self.size + self.placement) / 2.0

    @property
    def total(self) -> float:
        """v1: alignment and quality, half each. v2: framing half, alignment and quality a quarter each: with a third
        each, only a third of spo-tiny's same-prompt seed pairs differ by >= 0.05, too few to carry labels."""
        if self.version == 1:
            return 0.5 * self.alignment + 0.5 * self.quality
        rest = (1.0 - FRAMING_WEIGHT) / 2.0
        return rest * self.alignment + rest * self.quality + FRAMING_WEIGHT * self.framing

    def as_dict(self) -> dict[str, float | str | bool]:
        d: dict[str, float | str | bool] = asdict(self)
        d.update(alignment=self.alignment, quality=self.quality, framing=self.framing, total=self.total,
                 all_right=self.all_right)
        return d


def nearest_colour(rgb: np.ndarray) -> str:
    return _PALETTE_NAMES[int(np.argmin(((_PALETTE - rgb[None]) ** 2).sum(-1)))]


def _template_ious(mask: np.ndarray) -> dict[str, float]:
    """IoU of a binary shape mask with each ideal shape fitted to its bounding box."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    half = max(x1 - x0, 1) / 2.0
    h, w = mask.shape
    ious = {}
    yy, xx = np.mgrid[0:h, 0:w]
    px, py = xx + 0.5, yy + 0.5
    for shape in SHAPES:
        # Each ideal shape is fitted to the mask's bounding box.
        if shape == "circle":
            ry = max(y1 - y0, 1) / 2.0
            template = ((px - cx) / half) ** 2 + ((py - cy) / ry) ** 2 <= 1.0
        elif shape == "square":
            template = np.zeros_like(mask)
            template[y0:y1, x0:x1] = True
        else:  # upright triangle: apex at the top centre, base along the bottom edge
            frac = (py - y0) / max(y1 - y0, 1)
            template = (py >= y0) & (py <= y1) & (np.abs(px - cx) <= frac * half)
        inter = np.logical_and(template, mask).sum()
        union = np.logical_or(template, mask).sum()
        ious[shape] = float(inter / max(union, 1))
    return ious


def framing(mask: np.ndarray) -> tuple[float, float, float, float]:
    """(size, placement, area, centre offset) of a binary shape mask: how near its area is to PREFERRED_AREA of the
    frame (log-Gaussian), and how near its centroid is to the frame's centre (1 at the centre, 0 at
    CENTRE_TOLERANCE half-widths), then the two measurements they score."""
    h, w = mask.shape
    area = float(mask.sum()) / (h * w)
    if area <= 0:
        return 0.0, 0.0, 0.0, 1.0
    size = math.exp(-0.5 * (math.log(area / PREFERRED_AREA) / AREA_TOLERANCE) ** 2)
    ys, xs = np.nonzero(mask)
    offset = math.hypot((xs.mean() + 0.5 - w / 2) / (w / 2), (ys.mean() + 0.5 - h / 2) / (h / 2))
    return size, float(np.clip(1.0 - offset / CENTRE_TOLERANCE, 0.0, 1.0)), area, offset


def rate(image: np.ndarray, caption: str, version: int = RATER_VERSION) -> Rating:
    """Rate one RGB image (H, W, 3; uint8 or float in [0, 255]) against its shapes-world caption."""
    if version not in RATER_VERSIONS:
        raise ValueError(f"rater version must be one of {RATER_VERSIONS}, got {version!r}")
    want_colour, want_shape, want_background = parse_caption(caption)
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {img.shape}")
    h, w, _ = img.shape

    # Background colour: median of a 3-pixel border ring (shapes never touch the border in the world).
    ring = np.ones((h, w), dtype=bool)
    ring[3:-3, 3:-3] = False
    bg_rgb = np.median(img[ring], axis=0)
    detected_background = nearest_colour(bg_rgb)

    dist = np.sqrt(((img - bg_rgb) ** 2).sum(-1))
    far = dist > _FAR
    labels, n = ndimage.label(far, structure=_EIGHT)
    empty = Rating(float(detected_background == want_background), 0.0, 0.0,
                   _uniformity(img, bg_rgb, np.ones((h, w), bool)), 0.0, 0.0, 0.0, detected_background, "none", "none",
                   version=version)
    if n == 0:
        return empty
    sizes = ndimage.sum_labels(np.ones_like(far), labels, index=np.arange(1, n + 1))
    main_label = int(np.argmax(sizes)) + 1
    main_far = labels == main_label
    stray_area = float(sizes.sum() - sizes[main_label - 1])

    # Shape colour from the shape's core (away from anti-aliased edges).
    core = ndimage.binary_erosion(main_far, structure=_EIGHT)
    fg_rgb = np.median(img[core if core.any() else main_far], axis=0)
    detected_colour = nearest_colour(fg_rgb)

    # Coverage: where each pixel lies between the background and shape colours; geometry from coverage > 0.5.
    axis = fg_rgb - bg_rgb
    alpha = np.clip(((img - bg_rgb) * axis).sum(-1) / max(float((axis**2).sum()), 1e-6), 0.0, 1.0)
    near_main = ndimage.binary_dilation(main_far, structure=_EIGHT, iterations=2)
    shape_mask = (alpha > 0.5) & near_main
    if shape_mask.sum() < 4:
        return empty
    ious = _template_ious(shape_mask)
    detected_shape = max(ious, key=lambda k: ious[k])
    regularity = float(np.clip(1.0 - (_TYPICAL_IOU[detected_shape] - ious[detected_shape]) / 0.25, 0.0, 1.0))

    # Crispness: half-way pixels per outline pixel. Anti-aliased rendering gives about one; blur gives several.
    outline = shape_mask & ~ndimage.binary_erosion(shape_mask, structure=_EIGHT)
    halfway = ((alpha > 0.15) & (alpha < 0.85) & near_main).sum()
    ratio = float(halfway) / max(float(outline.sum()), 1.0)
    crispness = float(np.clip((2.5 - ratio) / 1.75, 0.0, 1.0))

    background_region = ~ndimage.binary_dilation(shape_mask, structure=_EIGHT, iterations=2)
    uniformity = _uniformity(img, bg_rgb, background_region)
    clean = float(np.exp(-stray_area / 12.0))
    size, placement, area, offset = framing(shape_mask)

    return Rating(
        background=float(detected_background == want_background),
        colour=float(detected_colour == want_colour),
        shape=float(detected_shape == want_shape),
        uniformity=uniformity,
        crispness=crispness,
        clean=clean,
        regularity=regularity,
        detected_background=detected_background,
        detected_colour=detected_colour,
        detected_shape=detected_shape,
        size=size,
        placement=placement,
        version=version,
        area=area,
        centre_offset=offset,
    )


def _uniformity(img: np.ndarray, bg_rgb: np.ndarray, region: np.ndarray) -> float:
    if not region.any():
        return 0.0
    spread = float(np.sqrt(((img[region] - bg_rgb) ** 2).sum(-1)).mean())
    return float(np.clip(1.0 - spread / 30.0, 0.0, 1.0))
