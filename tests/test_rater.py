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


def _framed(shape: str, cx: float, cy: float, size: float) -> np.ndarray:
    return render(Scene("red", shape, "blue", cx, cy, size))


def test_framing_prefers_a_centred_shape_of_the_preferred_size():
    from training.rater import PREFERRED_AREA

    caption = "a red square on a blue background"
    half = 64 * PREFERRED_AREA**0.5 / 2  # a square covering PREFERRED_AREA of the 64x64 frame
    best = rate(_framed("square", 32, 32, half), caption)
    assert best.size > 0.97 and best.placement > 0.97
    off_centre = rate(_framed("square", 18, 20, half), caption)
    small = rate(_framed("square", 32, 32, half * 0.6), caption)
    large = rate(_framed("square", 32, 32, half * 1.6), caption)
    assert off_centre.placement < 0.3 and off_centre.size > 0.95  # each part moves on its own
    assert small.size < 0.5 and large.size < 0.5 and small.placement > 0.97 and large.placement > 0.97
    for worse in (off_centre, small, large):
        assert worse.total < best.total - 0.1
        assert abs(worse.quality - best.quality) < 0.05 and worse.alignment == best.alignment


def test_rater_v1_still_rates_as_before_and_ignores_framing():
    caption = "a red circle on a blue background"
    centred, corner = _framed("circle", 32, 32, 14), _framed("circle", 20, 20, 9)
    for image in (centred, corner):
        v1, v2 = rate(image, caption, version=1), rate(image, caption)
        assert v1.version == 1 and v2.version == 2
        assert v1.total == pytest.approx(0.5 * v1.alignment + 0.5 * v1.quality)
        assert (v1.alignment, v1.quality) == (v2.alignment, v2.quality)
    assert rate(corner, caption).total < rate(centred, caption).total  # v2 sees the framing ...
    assert abs(rate(corner, caption, version=1).total - rate(centred, caption, version=1).total) < 0.05  # v1 not
    with pytest.raises(ValueError, match="rater version"):
        rate(centred, caption, version=3)


def test_pairs_record_their_rater_version_and_a_folder_never_mixes_two(tmp_path):
    import json

    from training.preference_data import pairs_rater_version
    from training.rater import RATER_VERSION
    from training.render_pairs import write_render_pairs

    summary = write_render_pairs(tmp_path / "pairs", 8, temperature=0.0, seed=0, split="train", tie_rate=0.0)
    assert summary["rater_version"] == RATER_VERSION == pairs_rater_version(tmp_path / "pairs")
    old = tmp_path / "old"
    old.mkdir()
    (old / "info.json").write_text(json.dumps({"pairs": 8}))  # written before versions were recorded: v1
    assert pairs_rater_version(old) == 1
    with pytest.raises(ValueError, match="rater v1"):
        write_render_pairs(old, 8, temperature=0.0, seed=0, split="train", tie_rate=0.0)


def test_a_folder_of_pair_folders_has_their_common_rater_version(tmp_path):
    import json

    from training.preference_data import pairs_rater_version

    for name, info in (("a", {"rater_version": 2}), ("b", {"rater_version": 2})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "info.json").write_text(json.dumps(info))
    (tmp_path / "c").mkdir()  # still being written: no info.json, says nothing
    assert pairs_rater_version(tmp_path) == 2
    (tmp_path / "c" / "info.json").write_text(json.dumps({"pairs": 8}))  # from before versions: v1
    with pytest.raises(ValueError, match="mixes pairs labelled by different rater versions"):
        pairs_rater_version(tmp_path)
