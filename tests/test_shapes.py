import numpy as np
import pytest

from training.shapes import (
    ALL_COMBOS,
    COLOURS,
    HELD_OUT,
    SHAPES,
    TRAIN_COMBOS,
    make_arrays,
    parse_caption,
    render,
    sample_scene,
    write_dataset,
)


def test_world_covers_required_colours_and_shapes():
    assert {"red", "green", "blue", "yellow", "white", "black"} <= set(COLOURS)
    assert {"circle", "square", "triangle"} <= set(SHAPES)


def test_held_out_combinations_never_in_training():
    assert HELD_OUT and set(HELD_OUT) <= set(ALL_COMBOS)
    assert not set(HELD_OUT) & set(TRAIN_COMBOS)
    # Composition, not novelty: every colour/shape of a held-out combination is seen in training in another role.
    seen_fg = {c for c, _, _ in TRAIN_COMBOS}
    seen_bg = {b for _, _, b in TRAIN_COMBOS}
    for colour, shape, background in HELD_OUT:
        assert colour in seen_fg and background in seen_bg and any(s == shape for _, s, _ in TRAIN_COMBOS)
    images, scenes = make_arrays(2000, seed=3)
    assert not {(s.colour, s.shape, s.background) for s in scenes} & set(HELD_OUT)


def test_generation_is_deterministic_and_seed_dependent():
    a, sa = make_arrays(16, seed=1)
    b, sb = make_arrays(16, seed=1)
    c, _ = make_arrays(16, seed=2)
    assert np.array_equal(a, b) and sa == sb
    assert not np.array_equal(a, c)


def test_rendered_image_has_background_and_shape_colours():
    import random

    scene = sample_scene(random.Random(0))
    img = render(scene)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert tuple(img[0, 0]) == COLOURS[scene.background]
    assert tuple(img[int(scene.cy), int(scene.cx)]) == COLOURS[scene.colour]
    assert parse_caption(scene.caption) == (scene.colour, scene.shape, scene.background)


def test_parse_caption_rejects_other_text():
    with pytest.raises(ValueError):
        parse_caption("a purple circle on a blue background")
    with pytest.raises(ValueError):
        parse_caption("hello")


def test_write_dataset(tmp_path):
    import json

    from PIL import Image

    write_dataset(tmp_path, 5, seed=0)
    rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 5
    img = np.asarray(Image.open(tmp_path / rows[0]["file_name"]))
    assert img.shape == (64, 64, 3)
    assert parse_caption(rows[0]["caption"])
