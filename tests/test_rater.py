"""The rater must reward exactly what it claims to: each corruption moves its own part and not the others'."""

import random

import numpy as np
import pytest
from scipy import ndimage

from training.rater import rate
from training.shapes import ALL_COMBOS, COLOURS, SHAPES, Scene, caption_for, render, sample_scene


def _scenes(n=30, seed=0):
    rng = random.Random(seed)
    return [sample_scene(rng, ALL_COMBOS) for _ in range(n)]


def test_ground_truth_scores_one_on_alignment_and_high_on_quality():
    for scene in _scenes(60):
        r = rate(render(scene), scene.caption)
        assert r.alignment == 1.0, (scene, r)
        assert r.quality >= 0.9, (scene, r)
        assert r.uniformity >= 0.99 and r.clean >= 0.99


def test_blur_lowers_crispness_only():
    for scene in _scenes(20, seed=1):
        img = render(scene)
        blurred = ndimage.gaussian_filter(img.astype(np.float32), sigma=(1.5, 1.5, 0))
        a, b = rate(img, scene.caption), rate(blurred, scene.caption)
        assert b.crispness < a.crispness - 0.4, (scene, a, b)
        assert b.alignment == 1.0 and b.quality < a.quality


def test_noise_lowers_background_uniformity():
    rng = np.random.default_rng(0)
    for scene in _scenes(20, seed=2):
        img = render(scene)
        noisy = np.clip(img + rng.normal(0, 10, img.shape), 0, 255)
        a, b = rate(img, scene.caption), rate(noisy, scene.caption)
        assert b.uniformity < a.uniformity - 0.25, (scene, a, b)
        assert b.alignment == 1.0


def test_specks_lower_clean():
    scene = Scene("red", "circle", "white", 40.0, 40.0, 12.0)
    img = render(scene).copy()
    img[5:8, 5:8] = COLOURS["red"]
    img[50:52, 8:10] = COLOURS["blue"]
    a, b = rate(render(scene), scene.caption), rate(img, scene.caption)
    assert b.clean < 0.5 < a.clean
    assert b.alignment == 1.0


def test_bowed_square_lowers_regularity():
    scene = Scene("blue", "square", "yellow", 32.0, 32.0, 16.0)
    img = render(scene).copy()
    yy, xx = np.mgrid[0:64, 0:64]
    bulge = ((xx - 48) ** 2 / 81 + (yy - 32) ** 2 / 169) <= 1.0  # a big lobe bowing the right edge out
    img[bulge] = COLOURS["blue"]
    a, b = rate(render(scene), scene.caption), rate(img, scene.caption)
    assert b.regularity < a.regularity - 0.15


@pytest.mark.parametrize("part", ["colour", "background", "shape"])
def test_wrong_attribute_zeroes_its_alignment_part(part):
    scene = Scene("green", "triangle", "black", 30.0, 33.0, 15.0)
    img = render(scene)
    colour, shape, background = scene.colour, scene.shape, scene.background
    if part == "colour":
        colour = "yellow"
    elif part == "background":
        background = "white"
    else:
        shape = "circle"
    r = rate(img, caption_for(colour, shape, background))
    assert getattr(r, part) == 0.0
    others = {"colour", "background", "shape"} - {part}
    assert all(getattr(r, o) == 1.0 for o in others)
    assert r.quality >= 0.9  # a well-drawn wrong image is still well drawn


def test_every_shape_is_recognised():
    for shape in SHAPES:
        for size in (10.0, 16.0, 22.0):
            scene = Scene("white", shape, "black", 32.3, 31.7, size)
            assert rate(render(scene), scene.caption).detected_shape == shape


def test_blank_image_has_no_shape():
    img = np.zeros((64, 64, 3), np.uint8) + np.array(COLOURS["blue"], np.uint8)
    r = rate(img, "a red circle on a blue background")
    assert r.background == 1.0 and r.colour == 0.0 and r.shape == 0.0


def test_rejects_non_rgb():
    with pytest.raises(ValueError):
        rate(np.zeros((64, 64)), "a red circle on a blue background")


def test_win_rate_counts_ties_half_and_brackets_the_estimate():
    from training.evaluate import win_rate

    r = win_rate([1, 2, 3, 4], [0, 2, 5, 1])
    assert r["win_rate"] == pytest.approx((2 + 0.5) / 4)
    assert (r["wins"], r["ties"], r["losses"]) == (2, 1, 1)
    assert r["ci_low"] < r["win_rate"] < r["ci_high"]
    big = win_rate([1.0] * 300, [0.0] * 300)
    assert big["win_rate"] == 1.0 and big["ci_low"] > 0.98
    with pytest.raises(ValueError):
        win_rate([], [])


def test_paired_gain_and_first_crossing_of_a_gain_curve():
    from training.evaluate import first_crossing, paired_gain, settled_crossing

    mean, se = paired_gain([1.0, 2.0, 4.0], [0.0, 1.0, 2.0])  # differences 1, 1, 2
    assert mean == pytest.approx(4 / 3) and se == pytest.approx(np.std([1, 1, 2], ddof=1) / np.sqrt(3))
    # Reaches 0.5 between 10 s (0.2) and 20 s (0.8): linear interpolation gives 15 s; the later dip does not matter.
    assert first_crossing([0, 10, 20, 30], [0.0, 0.2, 0.8, 0.3], 0.5) == pytest.approx(15.0)
    assert first_crossing([0, 10, 20], [0.0, 0.2, 0.4], 0.5) is None
    assert first_crossing([0, 10], [0.0, 0.5], 0.5) == pytest.approx(10.0)
    # Settled: a lucky point at 10 s, back below at 20 s, then up for good between 30 s (0.4) and 40 s (0.6).
    curve = ([0, 10, 20, 30, 40, 50], [0.0, 0.7, 0.1, 0.4, 0.6, 0.9])
    assert first_crossing(*curve, 0.5) == pytest.approx(50 / 7)
    assert settled_crossing(*curve, 0.5) == pytest.approx(35.0)
    assert settled_crossing([0, 10, 20], [0.0, 0.9, 0.3], 0.5) is None
