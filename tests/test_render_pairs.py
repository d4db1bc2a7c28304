"""Generic render pairs (the toy's Pick-a-Pic): each drawn defect costs the rater part it stands for, the data is
reproducible and reads back as Pick-a-Pic records, and `--clean-images` trains on them without the diffusion model."""

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from service.cli import main
from training.preference_data import load_pairs
from training.rater import rate
from training.render_pairs import RENDER_MODEL, Defects, render_with_defects, write_render_pairs
from training.shapes import TRAIN_COMBOS, caption_for

NONE = Defects(blur=0.0, warp=0.0, blotches=0.0, noise=0.0, specks=0, wrong="")
CAPTIONS = [caption_for(*c) for c in TRAIN_COMBOS[::7]]


def _mean_parts(defects: Defects) -> dict[str, float]:
    ratings = [rate(render_with_defects(c, seed, defects)[0], c) for seed, c in enumerate(CAPTIONS)]
    return {k: float(np.mean([getattr(r, k) for r in ratings]))
            for k in ("alignment", "uniformity", "crispness", "clean", "regularity")}


@pytest.mark.parametrize("defect, part", [
    ({"blur": 1.2}, "crispness"),
    ({"warp": 2.5}, "regularity"),
    ({"blotches": 25.0}, "uniformity"),
    ({"noise": 10.0}, "uniformity"),
    ({"specks": 2}, "clean"),
    ({"wrong": "shape"}, "alignment"),
    ({"wrong": "colour"}, "alignment"),
])
def test_each_defect_costs_its_rater_part(defect, part):
    clean = _mean_parts(NONE)
    assert clean["alignment"] == 1.0 and min(clean.values()) > 0.85
    worse = _mean_parts(Defects(**{**NONE.__dict__, **defect}))
    assert worse[part] < clean[part] - 0.1, (part, clean[part], worse[part])


def test_renders_are_reproducible_and_defects_vary():
    a, da = render_with_defects(CAPTIONS[0], 11)
    b, db = render_with_defects(CAPTIONS[0], 11)
    assert np.array_equal(a, b) and da == db and a.shape == (64, 64, 3) and a.dtype == np.uint8
    drawn = [render_with_defects(CAPTIONS[0], s)[1] for s in range(200)]
    assert 0.3 < np.mean([d.blur > 0 for d in drawn]) < 0.7 and 0.02 < np.mean([d.wrong != "" for d in drawn]) < 0.2
    # A given set of defects changes only the defects: same scene as the drawn render when the draw matches.
    assert np.array_equal(render_with_defects(CAPTIONS[0], 11, da)[0], a)


def test_write_render_pairs_resumes_and_reads_back(tmp_path):
    out = tmp_path / "renders"
    summary = write_render_pairs(out, 40, temperature=0.0, seed=2)
    assert summary["pairs"] == 40 and summary["generated_now"] == 40 and (out / "preview.png").is_file()
    assert summary["label_agrees_with_rater"] == 1.0  # T = 0: the labels are the rater's preference
    table = pq.read_table(next(out.glob("*.parquet")))
    assert set(table.column("model_0").to_pylist()) == {RENDER_MODEL}
    pairs, stats = load_pairs(out)
    assert len(pairs) == 40 and stats.n_skipped == 0
    assert all(p.label_0 == p.reference for p in pairs if p.reference != 0.5)
    first = sorted(out.glob("*.parquet"))[0].read_bytes()
    again = write_render_pairs(out, 40, temperature=0.0, seed=2)  # finished: nothing generated again
    assert again["generated_now"] == 0 and sorted(out.glob("*.parquet"))[0].read_bytes() == first


def test_clean_images_training_skips_the_diffusion_model(tmp_path, random_pipeline, monkeypatch):
    from training import step_images as ts

    data = tmp_path / "renders"
    write_render_pairs(data, 16, seed=1)

    def no_diffusion(*args, **kwargs):
        raise AssertionError("the diffusion model was called during --clean-images training")

    monkeypatch.setattr(ts.StepImages, "__call__", no_diffusion)
    out = tmp_path / "pickscore"
    assert main(["train", "spm", "--data", str(data), "--model", str(random_pipeline), "--out", str(out),
                 "--clean-images", "--no-time-conditioning", "--steps", "3", "--batch-size", "4",
                 "--micro-batch", "4", "--warmup", "1", "--eval-every", "0"]) == 0
    info = json.loads((out / "training_info.json").read_text())
    assert info["clean_images"] and not info["time_conditioning"] and info["steps_done"] == 3
    losses = [json.loads(r)["loss"] for r in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    # The SPM then starts from it: --init wraps the trained CLIP, time modules at identity.
    monkeypatch.undo()
    spm = tmp_path / "spm"
    assert main(["train", "spm", "--data", str(data), "--model", str(random_pipeline), "--out", str(spm),
                 "--init", str(out), "--steps", "1", "--batch-size", "4", "--micro-batch", "4",
                 "--eval-every", "0"]) == 0
    assert json.loads((spm / "training_info.json").read_text())["init"] == str(out)
