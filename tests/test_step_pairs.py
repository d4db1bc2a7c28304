"""Step pairs: sibling candidates of SPO's sampler as its scorer sees them, labelled by their lookahead-finished images,
and the SPM trainer scoring them at their recorded step."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from service.cli import main
from service.worker.pipeline import load_pipeline
from training.conditioning import cfg_eps, encode_prompts
from training.preference_data import PreferenceData, PreferencePair, ReadStats, load_pairs, row_to_pair
from training.rater import rate
from training.sampler import ddim_lookahead
from training.spm import StepAwarePreferenceModel
from training.spo import predicted_x0
from training.step_images import spm_inputs
from training.step_pairs import generate_step_pairs, plan_step_pairs, write_step_pairs
from training.train_spm import train_spm


def test_plans_branch_each_trajectory_once_per_step_from_the_first_branch_step():
    plans = plan_step_pairs(40, seed=3, first_step=4)
    assert [p.index for p in plans] == list(range(40))
    assert [p.branch_step for p in plans[:16]] == list(range(4, 20)) and plans[16].branch_step == 4
    first, second = plans[:16], plans[16:32]
    assert len({(p.seed_0, p.caption) for p in first}) == 1 and second[0].seed_0 != first[0].seed_0
    assert len({p.seed_1 for p in plans}) == 40  # every pair draws its own branch noise
    assert plan_step_pairs(40, seed=3) == plans and plan_step_pairs(40, seed=4) != plans
    assert [p.branch_step for p in plan_step_pairs(5, first_step=17)] == [17, 18, 19, 17, 18]
    with pytest.raises(ValueError, match="first branch step"):
        plan_step_pairs(4, first_step=20)
    with pytest.raises(ValueError, match="split"):
        plan_step_pairs(4, split="test")


def test_lookahead_returns_the_first_prediction_as_preview_and_keeps_final_latents():
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000)
    calls = []

    def eps_fn(x, t, rows):
        calls.append(int(t[0]))
        return 0.1 * x

    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    final, preview = ddim_lookahead(scheduler, eps_fn, x, 600, torch.arange(3), steps=4)
    assert calls == [600, 450, 300, 150]
    torch.testing.assert_close(preview, predicted_x0(scheduler, 0.1 * x, 600, x))
    assert not torch.allclose(final, preview)
    calls.clear()
    done, seen = ddim_lookahead(scheduler, eps_fn, x, 0, torch.arange(3))
    assert calls == [] and torch.equal(done, x) and torch.equal(seen, x)


def test_generated_step_pairs_are_previews_of_two_siblings_at_the_sampler_timestep(random_pipeline):
    pipe = load_pipeline(str(random_pipeline), device="cpu")
    plans = plan_step_pairs(20, seed=1, first_step=16)  # 4 pairs per trajectory: branch steps 16..19
    together = list(generate_step_pairs(pipe, plans, batch=3, progress=False))
    assert [g.plan.index for g in together] == list(range(20))
    pipe.scheduler.set_timesteps(20)
    ts = pipe.scheduler.timesteps.tolist()
    assert [g.timestep for g in together[:4]] == [ts[17], ts[18], ts[19], 0]
    assert all(not np.array_equal(g.image_0, g.image_1) for g in together)  # independent branch noise
    # After the last step the scorer sees the finished candidates themselves: the labels' totals are theirs.
    last = together[3]
    assert last.total_0 == rate(last.image_0, last.plan.caption).total
    assert last.total_1 == rate(last.image_1, last.plan.caption).total
    # A pair does not depend on the batch it was made in.
    alone = list(generate_step_pairs(pipe, plans[4:8], batch=1, progress=False))
    for a, b in zip(alone, together[4:8], strict=True):
        assert np.abs(a.image_0.astype(int) - b.image_0.astype(int)).max() <= 1
        assert a.total_0 == pytest.approx(b.total_0, abs=2e-3) and a.timestep == b.timestep


def test_preview_is_the_x0_prediction_of_the_branched_candidate(random_pipeline):
    """The stored image is what SPO's sampler scores: decode(x0 predicted at the candidates' timestep)."""
    from training.latents import decode_to_uint8
    from training.spo import ddim_step

    pipe = load_pipeline(str(random_pipeline), device="cpu")
    plan = plan_step_pairs(1, seed=2, first_step=18)[0]
    made = next(generate_step_pairs(pipe, [plan], progress=False))
    sched, unet = pipe.scheduler, pipe.unet
    sched.set_timesteps(20)
    ts = sched.timesteps
    pb = encode_prompts(pipe, [plan.caption])
    rows = torch.zeros(1, dtype=torch.long)
    g = torch.Generator().manual_seed(plan.seed_0)
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    with torch.no_grad():
        x = torch.randn(shape, generator=g)[None] * sched.init_noise_sigma
        for i in range(18):
            x = ddim_step(sched, cfg_eps(unet, x, ts[i].expand(1), pb, rows, 5.0), ts[i], x, 1.0,
                          noise=torch.randn(shape, generator=g)[None])
        eps = cfg_eps(unet, x, ts[18].expand(1), pb, rows, 5.0)
        branch = torch.Generator().manual_seed(plan.seed_1)
        first = ddim_step(sched, eps, ts[18], x, 1.0, noise=torch.randn(shape, generator=branch)[None])
        x0 = predicted_x0(sched, cfg_eps(unet, first, ts[19].expand(1), pb, rows, 5.0), ts[19], first)
    expected = decode_to_uint8(pipe.vae, x0)[0]
    assert np.abs(expected.astype(int) - made.image_0.astype(int)).max() <= 1
    assert made.timestep == int(ts[19])


def test_write_step_pairs_round_trip_and_the_timestep_column(tmp_path, random_pipeline):
    out = tmp_path / "step-pairs"
    summary = write_step_pairs(random_pipeline, out, 6, first_step=17, batch=2, shard_size=4, row_group_size=2)
    assert summary["pairs"] == 6 and summary["kind"] == "step pairs"
    table = pq.read_table(sorted(out.glob("*.parquet"))[0])
    assert table.column("branch_step").to_pylist() == [17, 18, 19, 17]
    assert table.column("timestep").to_pylist()[2] == 0
    uids = table.column("image_0_uid").to_pylist() + table.column("image_1_uid").to_pylist()
    assert len(set(uids)) == 8
    pairs, stats = load_pairs(out)
    assert stats.n_skipped == 0 and [p.timestep for p in pairs[:3]] == table.column("timestep").to_pylist()[:3]
    assert PreferenceData(out).carries_timesteps()


def test_bad_timesteps_are_skipped_and_counted():
    from training.preference_data import encode_png

    image = encode_png(np.zeros((8, 8, 3), np.uint8))
    row = {"caption": "a red circle", "jpg_0": image, "jpg_1": image, "label_0": 1.0, "label_1": 0.0}
    stats = ReadStats()
    assert row_to_pair({**row, "timestep": 501}, None, stats).timestep == 501
    assert row_to_pair({**row, "timestep": None}, None, stats).timestep is None
    assert row_to_pair({**row, "timestep": -3}, None, stats) is None
    assert row_to_pair({**row, "timestep": 2.5}, None, stats) is None
    assert stats.read == 2 and stats.skipped["bad timestep"] == 2


def _pair(timestep):
    rng = np.random.default_rng(timestep or 0)
    img = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return PreferencePair("a red circle", img, 255 - img, 1.0, 0.0, timestep=timestep)


def test_spm_inputs_score_step_pairs_as_they_are_and_refuse_mixtures():
    pairs = [_pair(501), _pair(0)]
    x, t = spm_inputs(pairs, None, None, None)
    assert t.tolist() == [501, 0] and x.shape == (4, 3, 8, 8)
    assert torch.allclose(x[0], torch.from_numpy(pairs[0].image_0).permute(2, 0, 1).float() / 255.0)
    with pytest.raises(ValueError, match="mixed"):
        spm_inputs([_pair(501), _pair(None)], None, None, None)
    with pytest.raises(ValueError, match="clean-images"):
        spm_inputs(pairs, None, None, None, clean_images=True)
    x, t = spm_inputs([_pair(None)], None, torch.tensor([700]), None, clean_images=True)
    assert t.tolist() == [0]


def test_train_spm_on_step_pairs_never_noises_them_and_reports_accuracy_by_step(tmp_path, random_pipeline,
                                                                                  monkeypatch):
    data = tmp_path / "train"
    write_step_pairs(random_pipeline, data, 8, first_step=16, batch=2)
    held_out = tmp_path / "eval"
    write_step_pairs(random_pipeline, held_out, 8, first_step=8, seed=1, split="heldout", batch=2)

    def no_noising(*args, **kwargs):
        raise AssertionError("step pairs must not go through the noising route")

    monkeypatch.setattr("training.train_spm.StepImages.__call__", no_noising)
    out = train_spm(data, random_pipeline, tmp_path / "spm", seed=0, eval_data=held_out,
                    overrides={"steps": 3, "batch_size": 4, "micro_batch": 4, "eval_every": 3, "save_every": 100,
                               "warmup": 1, "eval_pairs": 8})
    records = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    evals = [r for r in records if r.get("stage") == "eval"]
    assert "rater_acc_steps_all" in evals[0] and evals[-1]["step"] == 3
    assert 0.0 <= evals[-1]["acc_steps_all"] <= 1.0
    info = json.loads((out / "training_info.json").read_text())
    assert info["step_pairs"] is True and info["steps_done"] == 3
    assert StepAwarePreferenceModel.from_pretrained(out).config.time_conditioning


def test_step_pairs_command_names_the_offending_flag(tmp_path, capsys, random_pipeline):
    for argv, flag in ((["--first-step", "20"], "--first-step"), (["--model", "/nonexistent"], "--model"),
                       (["--temperature", "-1"], "--temperature")):
        args = ["data", "step-pairs", "--n", "4", "--out", str(tmp_path), "--model", str(random_pipeline), *argv]
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 2 and f"argument {flag}" in capsys.readouterr().err
    from training.spm import build_spm

    build_spm("tiny").save_pretrained(tmp_path / "spm")
    with pytest.raises(SystemExit) as exc:
        main(["eval", "spm", "--model", str(tmp_path / "spm"), "--step-pairs", "--steps", "4,20"])
    assert exc.value.code == 2 and "argument --step-pairs" in capsys.readouterr().err


def test_eval_spm_on_step_pairs_reports_accuracy_by_recorded_timestep(tmp_path, random_pipeline, capsys):
    from training.spm import build_spm

    torch.manual_seed(0)
    build_spm("tiny").save_pretrained(tmp_path / "spm")
    out = tmp_path / "eval.json"
    assert main(["eval", "spm", "--model", str(tmp_path / "spm"), "--base-model", str(random_pipeline),
                 "--pairs", "8", "--step-pairs", "--json", str(out)]) == 0
    assert "| step pairs at t | spm |" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["kind"] == "step pairs"
    rows = list(result["accuracy"])
    assert rows[:3] == ["all", "early", "late"] and rows[3:] == sorted(rows[3:], key=int, reverse=True)
    counts = result["pairs_per_row"]
    assert counts["all"] == result["pairs"] == counts["early"] + counts["late"] == sum(counts[r] for r in rows[3:])
    assert list(result["rater_on_previews_accuracy"]["all"]) == rows
