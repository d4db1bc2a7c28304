"""Diffusion-DPO baseline: the loss on a hand-computed case, a smoke run whose LoRA loads, exact resume, the command."""

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from service.cli import main
from tests.conftest import check_snapshots
from training.preference_data import encode_png
from training.presets import DPO_PRESETS as PRESETS
from training.presets import SPO_PRESETS
from training.shapes import COLOURS, SHAPES, Scene, caption_for, render
from training.train_dpo import diffusion_dpo_loss, implicit_accuracy, train_dpo


def test_loss_matches_a_hand_computed_case():
    beta = 10.0  # logit = -beta/2 * ((mse_w - mse_l) - (ref_w - ref_l)) = -5 * (...)
    mse_w = torch.tensor([0.10, 0.20, 0.30, 0.05])
    mse_l = torch.tensor([0.20, 0.20, 0.10, 0.15])
    ref_w = torch.tensor([0.10, 0.20, 0.30, 0.20])
    ref_l = torch.tensor([0.10, 0.20, 0.30, 0.10])
    # 0: the policy denoises the winner better than the reference does: -5 * (-0.1 - 0) = 0.5
    # 1: policy = reference: 0 (loss log 2)
    # 2: the policy denoises the loser better: -5 * (0.2 - 0) = -1
    # 3: the reference prefers the loser, the policy the winner: -5 * (-0.1 - 0.1) = 1
    logits = [0.5, 0.0, -1.0, 1.0]
    expected = [math.log(1 + math.exp(-x)) for x in logits]  # -log sigmoid(x)
    assert expected[1] == math.log(2)
    losses, got_logits = diffusion_dpo_loss(mse_w, mse_l, ref_w, ref_l, beta)
    torch.testing.assert_close(got_logits, torch.tensor(logits))
    torch.testing.assert_close(losses, torch.tensor(expected))
    # Implicit accuracy: pairs 0 and 3 ranked right, pair 2 wrong, pair 1 an exact tie (counts one half).
    assert implicit_accuracy(got_logits).item() == pytest.approx((1 + 0.5 + 0 + 1) / 4)


def test_presets_carry_the_reference_hyper_parameters_and_spo_s_lora_budget():
    sd15, sdxl = PRESETS["sd15"], PRESETS["sdxl"]
    assert (sd15.beta, sd15.batch_size, sd15.steps, sd15.lr, sd15.warmup) == (5000.0, 2048, 2000, 2.048e-5, 500)
    assert (sd15.weight_decay, sd15.max_grad_norm, sd15.caption_dropout) == (1e-2, 1.0, 0.2)
    assert (sdxl.beta, sdxl.batch_size, sdxl.warmup) == (5000.0, 2048, 200)
    for name in ("sd15", "sdxl", "tiny", "tiny-xl", "smoke"):
        assert (PRESETS[name].lora_rank, PRESETS[name].lora_targets) == (
            SPO_PRESETS[name].lora_rank, SPO_PRESETS[name].lora_targets)
    assert (sd15.lora_rank, sdxl.lora_rank) == (4, 64)


def _pairs_folder(path, n=8):
    """Rendered pairs, the right picture against one with the wrong shape colour, plus one tie (to be skipped)."""
    colours = list(COLOURS)
    rows = []
    for i in range(n):
        fg, bg, wrong = colours[i % 6], colours[(i + 1) % 6], colours[(i + 2) % 6]
        scene = Scene(fg, SHAPES[i % 3], bg, 30.0 + i % 5, 32.0, 12.0 + i % 4)
        good, bad = render(scene), render(Scene(wrong, scene.shape, bg, scene.cx, scene.cy, scene.size))
        flip = i % 2 == 1
        rows.append({"caption": caption_for(fg, scene.shape, bg), "jpg_0": encode_png(bad if flip else good),
                     "jpg_1": encode_png(good if flip else bad), "label_0": 0.0 if flip else 1.0,
                     "label_1": 1.0 if flip else 0.0})
    rows.insert(3, {**rows[0], "label_0": 0.5, "label_1": 0.5})
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path / "pairs.parquet", row_group_size=4)
    return path


def _log(out):
    return [json.loads(x) for x in (out / "dpo_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return _pairs_folder(tmp_path_factory.mktemp("dpo-pairs") / "pairs")


@pytest.fixture(scope="module")
def uninterrupted(pairs, random_pipeline, tmp_path_factory):
    return train_dpo("smoke", pairs, random_pipeline, tmp_path_factory.mktemp("dpo") / "full", seed=3,
                     snapshot_every=2)


def test_smoke_run_writes_a_lora_that_loads_and_changes_the_unet(uninterrupted, random_pipeline):
    from diffusers import StableDiffusionPipeline

    records = _log(uninterrupted)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    # Step 1 starts from the identity LoRA: policy = reference, so the loss is log 2 and the accuracy one half.
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and records[0]["implicit_acc"] == 0.5
    assert all(r["step_s"] > 0 and math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)
    info = json.loads((uninterrupted / "train_info.json").read_text())
    assert info["steps"] == 4 and not info["stopped_by_time_budget"] and info["ties_skipped"] >= 1
    config = json.loads((uninterrupted / "dpo_config.json").read_text())
    assert config["preset"] == "smoke" and config["beta"] == PRESETS["smoke"].beta
    assert "lora:" in (uninterrupted / "manifest_entry.yaml").read_text()
    assert (uninterrupted / "dpo_curves.png").is_file()

    pipe = StableDiffusionPipeline.from_pretrained(random_pipeline)
    emb = pipe.encode_prompt(["a red circle on a blue background"], "cpu", 1, False)[0]
    x = torch.randn(1, 4, pipe.unet.config.sample_size, pipe.unet.config.sample_size, generator=torch.Generator())
    with torch.no_grad():
        before = pipe.unet(x, 500, encoder_hidden_states=emb).sample
        pipe.load_lora_weights(uninterrupted)
        after = pipe.unet(x, 500, encoder_hidden_states=emb).sample
    assert (after - before).abs().max() > 1e-6


def test_snapshots_keep_the_lora_and_training_seconds_so_far(uninterrupted):
    check_snapshots(uninterrupted, [2, 4])


def test_resume_gives_the_same_lora_as_an_uninterrupted_run(uninterrupted, pairs, random_pipeline, tmp_path):
    out = tmp_path / "resumed"
    train_dpo("smoke", pairs, random_pipeline, out, seed=3, stop_after=3)  # "killed" after 3 steps (checkpointed)
    assert (out / "checkpoints" / "step-0000003" / "lora.safetensors").is_file()
    assert not (out / "pytorch_lora_weights.safetensors").exists()  # not finished: no result yet
    train_dpo("smoke", pairs, random_pipeline, out, seed=3, resume=True)
    a = load_file(uninterrupted / "pytorch_lora_weights.safetensors")
    b = load_file(out / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert [r["loss"] for r in _log(out)] == [r["loss"] for r in _log(uninterrupted)]


def test_cli_time_budget_stops_and_saves(pairs, random_pipeline, tmp_path, capsys):
    out = tmp_path / "budget"
    assert main(["train", "dpo", "--preset", "smoke", "--data", str(pairs), "--model", str(random_pipeline),
                 "--out", str(out), "--max-minutes", "1e-6"]) == 0
    info = json.loads((out / "train_info.json").read_text())
    assert info["stopped_by_time_budget"] and info["steps"] == 1 and info["max_minutes"] == 1e-6
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert "Diffusion-DPO LoRA" in capsys.readouterr().out
    argv = ["train", "dpo", "--preset", "smoke", "--data", str(pairs), "--model", str(random_pipeline), "--out",
            str(out)]
    # The budget is summed over resumed runs: a spent one trains no further.
    assert main([*argv, "--max-minutes", "1e-6", "--resume"]) == 0
    assert json.loads((out / "train_info.json").read_text())["steps"] == 1
    # Starting again over an earlier run's checkpoints would mix the runs on a later --resume.
    with pytest.raises(SystemExit):
        main(argv)
    assert "argument --out" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "flag"),
    [
        (["--data", "/nonexistent/pairs"], "--data"),
        (["--model", "/nonexistent/model"], "--model"),
        (["--preset", "huge"], "--preset"),
        (["--max-minutes", "0"], "--max-minutes"),
        (["--steps", "0"], "--steps"),
        (["--micro-batch", "9"], "--micro-batch"),
        (["--caption-dropout", "1.5"], "--caption-dropout"),
    ],
)
def test_cli_errors_name_the_flag(extra, flag, pairs, random_pipeline, tmp_path, capsys):
    argv = ["train", "dpo", "--preset", "smoke", "--data", str(pairs), "--model", str(random_pipeline),
            "--out", str(tmp_path / "x")]
    with pytest.raises(SystemExit) as exc:
        main(argv + extra)
    assert exc.value.code == 2 and f"argument {flag}" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_model_folder_without_model_index_is_named(pairs, tmp_path, capsys):
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(SystemExit):
        main(["train", "dpo", "--data", str(pairs), "--model", str(tmp_path / "not-a-model"), "--out",
              str(tmp_path / "x")])
    assert "argument --model" in capsys.readouterr().err
