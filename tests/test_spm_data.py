"""Preference pairs: Pick-a-Pic reading (parquet, jsonl), corrupt records, streaming order, toy pair generation."""

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from training.preference_data import (
    PreferenceData,
    bradley_terry_labels,
    encode_png,
    load_pairs,
    plan_pairs,
    summarise_pairs,
    write_pairs,
)
from training.shapes import HELD_OUT, Scene, parse_caption, render

CAPTION = "a red circle on a blue background"


def _png(colour: str = "red") -> bytes:
    return encode_png(render(Scene(colour, "circle", "blue", 32.0, 32.0, 12.0)))


def _row(i: int, **kw) -> dict:
    row = {"caption": f"a red circle on a blue background {i % 3}", "jpg_0": _png(), "jpg_1": _png("green"),
           "label_0": 1.0, "label_1": 0.0, "has_label": True, "are_different": True}
    row.update(kw)
    return row


def _write(path, rows, row_group_size=4):
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)


def test_reads_pickapic_parquet_and_skips_corrupt_records(tmp_path):
    import io

    from PIL import Image

    jpeg = io.BytesIO()
    Image.fromarray(render(Scene("red", "square", "blue", 30, 30, 10))).resize((96, 80)).save(jpeg, format="JPEG")
    rows = [_row(i) for i in range(6)]
    rows += [
        _row(6, jpg_0=b"not an image"),  # corrupt bytes
        _row(7, jpg_1=None),  # missing image
        _row(8, label_0=float("nan")),  # bad label
        _row(9, label_0=0.7, label_1=0.7),  # labels do not sum to 1
        _row(10, caption=None),  # missing caption
        _row(11, has_label=False),  # Pick-a-Pic's own filters
        _row(12, are_different=False),
    ]
    _write(tmp_path / "train-00000.parquet", rows)
    # A tie, saved by Hugging Face `datasets` (Image feature: a {bytes, path} struct), a non-square JPEG.
    struct = {"bytes": jpeg.getvalue(), "path": None}
    rows.append(_row(13, label_0=0.5, label_1=0.5, jpg_0=struct, jpg_1=struct))
    _write(tmp_path / "train-00002.parquet", rows[-1:])
    (tmp_path / "train-00001.parquet").write_bytes(b"PAR1 truncated garbage")  # unreadable file
    _write(tmp_path / "no-columns.parquet", [{"caption": "x"}])  # not Pick-a-Pic

    data = PreferenceData(tmp_path, image_size=64)
    assert len(data) == len(rows)
    pairs = [pair for _, pair in data.stream()]
    assert len(pairs) == 7 and data.stats.read == 7
    assert data.stats.skipped == {"undecodable image": 2, "bad label": 2, "missing caption": 1, "unlabelled": 1,
                                  "identical images": 1, "unreadable file": 2}
    assert "skipped 9" in data.stats.report()
    tie = pairs[-1]
    assert tie.is_tie and tie.image_0.shape == (64, 64, 3)  # 96x80 JPEG: short side resized, centre crop
    assert all(p.image_1.dtype == np.uint8 and not p.is_tie for p in pairs[:-1])
    assert data.prompt_counts()["a red circle on a blue background 0"] == 5  # rows 0, 3, 6, 9, 12


def test_unreadable_row_group_is_skipped_and_counted(tmp_path):
    path = tmp_path / "pairs.parquet"
    _write(path, [_row(i) for i in range(12)], row_group_size=4)
    meta = pq.ParquetFile(path).metadata
    start = meta.row_group(1).column(2).data_page_offset  # jpg_0 pages of the second row group
    raw = bytearray(path.read_bytes())
    raw[start:start + 64] = b"\xff" * 64
    path.write_bytes(bytes(raw))
    data = PreferenceData(tmp_path)
    pairs = [pair for _, pair in data.stream()]
    assert len(pairs) + data.stats.n_skipped == 12
    assert data.stats.n_skipped >= 1 and len(pairs) >= 8


def test_jsonl_with_image_files(tmp_path):
    (tmp_path / "a.png").write_bytes(_png())
    (tmp_path / "b.png").write_bytes(_png("green"))
    lines = [json.dumps({"caption": CAPTION, "image_0": "a.png", "image_1": "b.png", "label_0": 0, "label_1": 1}),
             "{not json",
             json.dumps({"caption": CAPTION, "jpg_0": "a.png", "jpg_1": "missing.png", "label_0": 1, "label_1": 0})]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    pairs, stats = load_pairs(tmp_path)
    assert len(pairs) == 1 and pairs[0].label_1 == 1.0 and pairs[0].image_0.shape == (64, 64, 3)
    assert stats.skipped == {"unreadable line": 1, "undecodable image": 1}


def test_stream_order_is_seeded_and_resumes_at_a_position(tmp_path):
    for k in range(3):
        rows = [_row(0, caption=f"pair {10 * k + i}") for i in range(10)]
        _write(tmp_path / f"part-{k}.parquet", rows, row_group_size=3)
    data = PreferenceData(tmp_path, mix_chunks=2)
    assert len(data.chunks) == 12

    def order(seed, epoch, start=0):
        return [(pos, p.caption) for pos, p in data.stream(seed, epoch, start)]

    plain = order(None, 0)
    assert plain == [(i + 1, f"pair {i}") for i in range(30)]  # file order without a seed
    a, again, other_epoch = order(7, 0), order(7, 0), order(7, 1)
    assert a == again and a != other_epoch and a != plain
    assert sorted(c for _, c in a) == sorted(c for _, c in plain)  # a permutation of the same records
    for start in (0, 1, 5, 6, 13, 29, 30):  # resuming after `start` raw rows continues the same sequence
        assert order(7, 0, start) == [x for x in a if x[0] > start]


def test_bradley_terry_labels():
    assert bradley_terry_labels(0.9, 0.5, 0.0, 0.99) == (1.0, 0.0)  # T = 0: noiseless
    assert bradley_terry_labels(0.5, 0.5, 0.0, 0.1) == (0.5, 0.5)
    rng = np.random.default_rng(0)
    draws = [bradley_terry_labels(0.6, 0.5, 0.05, u)[0] for u in rng.random(20_000)]
    assert abs(np.mean(draws) - 1 / (1 + math.exp(-2.0))) < 0.01  # sigmoid(0.1 / 0.05)
    with_ties = [bradley_terry_labels(0.6, 0.5, 0.05, u, tie_rate=0.5) for u in rng.random(20_000)]
    ties = sum(a == 0.5 for a, _ in with_ties) / len(with_ties)
    decisive = [a for a, _ in with_ties if a != 0.5]
    assert 0.1 < ties < 0.25 and abs(np.mean(decisive) - 1 / (1 + math.exp(-2.0))) < 0.015
    assert bradley_terry_labels(1.0, 0.0, 1e-6, 0.5) == (1.0, 0.0)  # no overflow for tiny T


def test_plans_are_reproducible_and_split_by_prompt():
    a, b = plan_pairs(50, seed=3), plan_pairs(50, seed=3)
    assert a == b and a != plan_pairs(50, seed=4)
    assert all(p.seed_0 != p.seed_1 for p in a)
    assert not any(parse_caption(p.caption) in HELD_OUT for p in a)
    assert all(parse_caption(p.caption) in HELD_OUT for p in plan_pairs(20, split="heldout"))
    assert {(p.guidance_0, p.guidance_1) for p in a} == {(5.0, 5.0)}
    mixed = plan_pairs(50, seed=3, guidance=(1.0, 5.0))
    assert [(p.caption, p.seed_0) for p in mixed] == [(p.caption, p.seed_0) for p in a]  # same prompts and seeds
    assert {p.guidance_0 for p in mixed} == {p.guidance_1 for p in mixed} == {1.0, 5.0}
    assert {(p.steps_0, p.steps_1) for p in a} == {(20, 20)}
    counts = plan_pairs(50, seed=3, guidance=(1.0, 5.0), steps=(4, 20))
    assert [(p.caption, p.seed_0, p.guidance_0) for p in counts] == [(p.caption, p.seed_0, p.guidance_0) for p in mixed]
    assert {p.steps_0 for p in counts} == {p.steps_1 for p in counts} == {4, 20}


def test_write_pairs_from_a_model_resumes_and_reads_back(tmp_path, random_pipeline):
    out = tmp_path / "pairs"
    summary = write_pairs(random_pipeline, out, 6, temperature=0.05, steps=(2, 3), batch=4, shard_size=4,
                          row_group_size=2, guidance=(1.0, 5.0))
    assert summary["pairs"] == 6 and summary["generated_now"] == 6 and (out / "preview.png").is_file()
    shards = sorted(out.glob("*.parquet"))
    assert [s.name for s in shards] == ["pairs-00000-of-00002.parquet", "pairs-00001-of-00002.parquet"]
    table = pq.read_table(shards[0])
    for column in ("caption", "jpg_0", "jpg_1", "label_0", "label_1", "rater_preference", "num_example_per_prompt"):
        assert column in table.column_names
    plans = plan_pairs(6, guidance=(1.0, 5.0), steps=(2, 3))
    assert table.column("guidance_1").to_pylist() == [p.guidance_1 for p in plans[:4]]
    assert table.column("steps_0").to_pylist() == [p.steps_0 for p in plans[:4]]
    assert table.column("model_0").to_pylist()[0] == f"model@cfg{plans[0].guidance_0:g}@{plans[0].steps_0}steps"
    pairs, stats = load_pairs(out)
    assert len(pairs) == 6 and stats.n_skipped == 0
    assert all(p.reference in (0.0, 0.5, 1.0) and p.label_0 + p.label_1 == 1.0 for p in pairs)
    totals = pq.read_table(shards[0], columns=["rater_total_0", "rater_total_1"]).to_pylist()[0]
    assert pairs[0].reference_gap == abs(totals["rater_total_0"] - totals["rater_total_1"])
    before = shards[1].read_bytes()
    shards[0].unlink()  # an interrupted run: only the missing shard is generated again, identically
    again = write_pairs(random_pipeline, out, 6, temperature=0.05, steps=(2, 3), batch=4, shard_size=4,
                        row_group_size=2, guidance=(1.0, 5.0))
    assert again["generated_now"] == 4 and shards[1].read_bytes() == before
    assert pq.read_table(shards[0]).equals(table)
    assert summarise_pairs(out)["pairs"] == 6
    assert not PreferenceData(out).carries_timesteps()  # ordinary pairs: a null timestep column


def test_generate_pairs_fills_calls_across_mixed_settings_and_keeps_plan_order(monkeypatch):
    """With many (CFG, steps) settings, one call per setting for the whole window, not a few images per call;
    every image still goes to its own pair and slot."""
    import service.worker.pipeline
    from training.preference_data import generate_pairs

    calls = []

    def fake_generate(pipe, requests, *, steps, guidance, width, height):
        calls.append((guidance, steps, len(requests)))
        return [np.full((width, height, 3), (r.seed % 251, steps, int(guidance * 10)), dtype=np.uint8)
                for r in requests]

    class Pipe:  # what generate_pairs reads of a pipeline
        unet = type("U", (), {"config": type("C", (), {"sample_size": 2})()})()
        vae_scale_factor = 4

    monkeypatch.setattr(service.worker.pipeline, "generate", fake_generate)
    plans = plan_pairs(48, seed=5, guidance=(1.5, 5.0), steps=(4, 8, 20))
    pairs = list(generate_pairs(Pipe(), plans, batch=4, progress=False))
    assert [g.plan for g in pairs] == plans
    for g in pairs:
        p = g.plan
        assert tuple(g.image_0[0, 0]) == (p.seed_0 % 251, p.steps_0, int(p.guidance_0 * 10))
        assert tuple(g.image_1[0, 0]) == (p.seed_1 % 251, p.steps_1, int(p.guidance_1 * 10))
    settings = {(p.guidance_0, p.steps_0) for p in plans} | {(p.guidance_1, p.steps_1) for p in plans}
    assert len(settings) == 6 and sum(n for *_, n in calls) == 96
    assert len(calls) <= 96 // 8 + len(settings)  # calls of up to 2 x batch images, at most one partial per setting
