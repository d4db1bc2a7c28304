"""SPO trainer on a smoke-sized model: it runs, it resumes exactly, its output loads as a diffusers LoRA."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import check_snapshots
from training.presets import SPO_PRESETS as PRESETS
from training.scorers import lookahead_rater_scorer
from training.train_spo import train_spo


@pytest.fixture(scope="module")
def uninterrupted(smoke_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("spo") / "full"
    return train_spo("smoke", smoke_model, out, scorer="rater", max_batches=4, snapshot_every=2)


def test_runs_and_writes_a_lora_and_manifest_entry(uninterrupted, smoke_model):
    from diffusers import StableDiffusionPipeline

    records = [json.loads(x) for x in (uninterrupted / "spo_log.jsonl").read_text().splitlines()]
    assert [r["batch"] for r in records] == [0, 1, 2, 3]
    assert all(0.0 <= r["keep_rate"] <= 1.0 for r in records)
    assert all(r["sampling_s"] > 0 and r["scoring_s"] > 0 for r in records)
    pipe = StableDiffusionPipeline.from_pretrained(smoke_model)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora_weights(uninterrupted)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    after = pipe.unet.state_dict()
    assert after.keys() == before.keys()
    assert any(not torch.equal(before[k], v) for k, v in after.items())
    assert "lora:" in (uninterrupted / "manifest_entry.yaml").read_text()


def test_snapshots_keep_the_weights_and_training_seconds_so_far(uninterrupted):
    check_snapshots(uninterrupted, [2, 4])


def test_resume_gives_the_same_lora_as_an_uninterrupted_run(uninterrupted, smoke_model, tmp_path):
    out = tmp_path / "resumed"
    train_spo("smoke", smoke_model, out, scorer="rater", max_batches=2)  # "killed" after 2 batches (checkpointed)
    train_spo("smoke", smoke_model, out, scorer="rater", max_batches=4, resume=True)
    a = load_file(uninterrupted / "pytorch_lora_weights.safetensors")
    b = load_file(out / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    losses = [json.loads(x)["loss"] for x in (out / "spo_log.jsonl").read_text().splitlines()]
    full = [json.loads(x)["loss"] for x in (uninterrupted / "spo_log.jsonl").read_text().splitlines()]
    assert losses == full


def test_presets_carry_the_reference_hyper_parameters():
    sd15, sdxl = PRESETS["sd15"], PRESETS["sdxl"]
    assert (sd15.lora_rank, sd15.lr, sd15.num_candidates, sd15.threshold, sd15.beta, sd15.clip_eps) == (
        4, 6e-5, 4, 0.3, 10.0, 0.1)
    assert (sd15.num_steps, sd15.guidance, sd15.eta, sd15.divert_start_step) == (20, 5.0, 1.0, 4)
    assert sd15.max_grad_norm == 1.0
    assert (sdxl.lora_rank, sdxl.lr, sdxl.num_candidates, sdxl.threshold, sdxl.inner_steps) == (64, 1e-5, 2, 0.4, 3)
    assert sdxl.prompts_per_batch == 2 and sdxl.micro_batch == 2


def test_unknown_preset_and_missing_spm_are_errors(smoke_model, tmp_path):
    with pytest.raises(ValueError, match="--preset"):
        train_spo("huge", smoke_model, tmp_path)
    with pytest.raises(ValueError, match="--spm"):
        train_spo("smoke", smoke_model, tmp_path, scorer="spm")


def test_cli_train_spo_and_eval_compare(smoke_model, tmp_path, capsys):
    from service.cli import main

    out = tmp_path / "spo"
    assert main(["train", "spo", "--preset", "smoke", "--model", str(smoke_model), "--scorer", "rater",
                 "--out", str(out), "--max-batches", "1"]) == 0
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert main(["eval", "compare", "--models", f"base={smoke_model}", f"spo={smoke_model}+{out}", "--out",
                 str(tmp_path / "cmp"), "--n-heldout", "4", "--steps", "2"]) == 0
    assert (tmp_path / "cmp" / "side_by_side.png").is_file()
    with pytest.raises(SystemExit):
        main(["train", "spo", "--preset", "smoke", "--model", str(smoke_model), "--out", str(out)])
    assert "--spm" in capsys.readouterr().err


@pytest.mark.slow
def test_accelerate_launch_two_processes_runs_an_epoch_of_the_tiny_preset(tiny_model, tmp_path):
    """`accelerate launch --num_processes 2` on CPU (gloo): one epoch of the tiny preset (80 prompts / (8 x 2) = 5
    batches), both processes sample their half, gradients are averaged, and the main process writes the LoRA."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "two"
    # --multi_gpu is accelerate's torchrun launcher (gloo on CPU); `--cpu` alone would start ONE process.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "training.cli", "train", "spo", "--preset", "tiny",
           "--model", str(tiny_model), "--scorer", "rater", "--out", str(out), "--max-batches", "5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, env=env, timeout=1800, cwd=Path(__file__).resolve().parents[1])
    records = [json.loads(x) for x in (out / "spo_log.jsonl").read_text().splitlines()]
    assert [r["batch"] for r in records] == [0, 1, 2, 3, 4] and {r["epoch"] for r in records} == {0}
    assert all(r["pairs"] > 0 for r in records)
    info = json.loads((out / "train_info.json").read_text())
    assert info["processes"] == 2 and info["batches"] == 5
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "manifest_entry.yaml").is_file()


def test_lookahead_scorer_finishes_each_candidate_then_rates_it(smoke_model):
    """At t = 0 it rates the decoded latents as they are; at t > 0 it first runs `steps` deterministic CFG UNet calls
    (so two candidates that differ only in noise can rank differently from their x0 previews)."""
    from service.worker.pipeline import load_pipeline
    from training.latents import decode_to_uint8
    from training.rater import rate

    pipe = load_pipeline(str(smoke_model))
    prompts = ["a red circle on a blue background", "a green square on a yellow background"]
    calls = []
    pipe.unet.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    score = lookahead_rater_scorer(pipe, pipe.unet, prompts, guidance=5.0, steps=3, scale=100.0)
    assert score.scores_latents
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    idx = torch.tensor([0, 1, 0, 1])

    at_zero = score(x, idx, torch.zeros(4, dtype=torch.long))
    assert calls == []
    images = decode_to_uint8(pipe.vae, x)
    expected = [100 * rate(im, prompts[j]).total for im, j in zip(images, idx.tolist(), strict=True)]
    assert torch.allclose(at_zero, torch.tensor(expected, dtype=at_zero.dtype))

    mid = score(x, idx, torch.full((4,), 501))
    assert calls == [8, 8, 8]  # three UNet calls, each the CFG-doubled batch
    assert torch.equal(mid, score(x, idx, torch.full((4,), 501)))  # deterministic (eta = 0)


def test_train_spo_runs_with_the_lookahead_scorer(smoke_model, tmp_path):
    out = train_spo("smoke", smoke_model, tmp_path / "lookahead", scorer="lookahead", max_batches=2)
    records = [json.loads(x) for x in (out / "spo_log.jsonl").read_text().splitlines()]
    assert [r["batch"] for r in records] == [0, 1]
    assert all(r["scoring_s"] > 0 and r["pairs"] > 0 for r in records)
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_resuming_an_old_layout_checkpoint_is_refused_with_what_to_do(smoke_model, tmp_path):
    """SPO once kept its one checkpoint in OUT/checkpoint/ (progress.json); checkpoints now live in
    OUT/checkpoints/step-N/ like the other trainers'. Resuming such a run must say so before loading anything."""
    out = tmp_path / "old"
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "progress.json").write_text(json.dumps({"batch": 2, "train_seconds": 1.0}))
    with pytest.raises(FileExistsError, match="old layout") as err:
        train_spo("smoke", smoke_model, out, scorer="rater", max_batches=4, resume=True)
    assert "checkpoints" in str(err.value) and "without --resume" in str(err.value)
    assert not (out / "pytorch_lora_weights.safetensors").exists()


def test_checkpoints_use_the_shared_step_layout(uninterrupted):
    """OUT/checkpoints/step-N/ with N counting batches, trainer_state.json written last, one kept."""
    from training.run import checkpoints

    kept = checkpoints(uninterrupted / "checkpoints")
    assert [c.name for c in kept] == ["step-0000004"]
    state = json.loads((kept[0] / "trainer_state.json").read_text())
    assert state["batch"] == 4 and state["preset"] == "smoke" and (kept[0] / "last_pairs_0.pt").is_file()
    assert not (uninterrupted / "checkpoint").exists()


def test_a_fresh_run_over_earlier_checkpoints_or_a_resume_with_another_seed_is_refused(uninterrupted, smoke_model,
                                                                                      tmp_path, capsys):
    """Checkpoints are pruned by step: a fresh run in the same folder would delete its own newer ones and a later
    --resume would continue the earlier run. Resuming with another seed would change the prompt order and noise."""
    import shutil

    from service.cli import main

    out = tmp_path / "again"
    shutil.copytree(uninterrupted / "checkpoints", out / "checkpoints")
    with pytest.raises(FileExistsError, match="earlier run"):
        train_spo("smoke", smoke_model, out, scorer="rater", max_batches=4)
    with pytest.raises(SystemExit):
        main(["train", "spo", "--preset", "smoke", "--model", str(smoke_model), "--scorer", "rater",
              "--out", str(out)])
    assert "argument --out" in capsys.readouterr().err
    with pytest.raises(ValueError, match="seed"):
        train_spo("smoke", smoke_model, out, scorer="rater", max_batches=6, resume=True, seed=7)
