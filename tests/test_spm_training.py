"""SPM training: the loss on a hand-computed case, exact resume, world-size independence, the commands."""

import json
import math
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from service.cli import main
from training.preference_data import encode_png
from training.shapes import COLOURS, SHAPES, Scene, caption_for, render
from training.spm import StepAwarePreferenceModel, build_spm
from training.train_spm import pair_losses, preference_loss, train_spm


def test_loss_matches_a_hand_computed_case():
    # pair 0: image_0 wins, pair 1: image_1 wins, pair 2: a tie scored equal, pair 3: a tie scored apart.
    s0 = torch.tensor([2.0, 0.0, 1.0, 1.0])
    s1 = torch.tensor([0.0, 1.0, 1.0, 0.0])
    label_0 = torch.tensor([1.0, 0.0, 0.5, 0.5])
    label_1 = 1 - label_0
    # Pairs 0 and 1 share a prompt (2 pairs in the data), pairs 2 and 3 have theirs alone: weights 1/2, 1/2, 1, 1.
    weights = torch.tensor([0.5, 0.5, 1.0, 1.0])
    win = math.log(1 + math.exp(-2))  # -log softmax(2, 0)[0]
    loss = math.log(1 + math.exp(-1))  # -log softmax(0, 1)[1]
    perfect_tie = math.log(2) + math.log(0.5)  # = 0
    apart_tie = 0.5 * math.log(1 + math.exp(-1)) + 0.5 * math.log(1 + math.exp(1)) + math.log(0.5)
    expected = [win, loss, perfect_tie, apart_tie]
    torch.testing.assert_close(pair_losses(s0, s1, label_0, label_1), torch.tensor(expected))
    assert expected[2] == 0.0
    total = (0.5 * win + 0.5 * loss + 1.0 * perfect_tie + 1.0 * apart_tie) / 3.0
    torch.testing.assert_close(preference_loss(s0, s1, label_0, label_1, weights), torch.tensor(total))


def _pairs_folder(path, n=12):
    """Rendered pairs: the right picture against one with the wrong shape colour, labelled by the rule."""
    rows = []
    colours = list(COLOURS)
    for i in range(n):
        fg, bg = colours[i % 6], colours[(i + 1) % 6]
        wrong = colours[(i + 2) % 6]
        scene = Scene(fg, SHAPES[i % 3], bg, 30.0 + i % 5, 32.0, 12.0 + i % 4)
        good, bad = render(scene), render(Scene(wrong, scene.shape, bg, scene.cx, scene.cy, scene.size))
        flip = i % 2 == 1
        rows.append({"caption": caption_for(fg, scene.shape, bg), "jpg_0": encode_png(bad if flip else good),
                     "jpg_1": encode_png(good if flip else bad), "label_0": 0.0 if flip else 1.0,
                     "label_1": 1.0 if flip else 0.0, "rater_preference": 0.0 if flip else 1.0})
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path / "pairs.parquet", row_group_size=5)
    return path


def _losses(out):
    records = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


SMALL = {"steps": 5, "batch_size": 4, "micro_batch": 2, "eval_every": 0, "save_every": 100, "warmup": 2}


def test_resume_repeats_the_uninterrupted_loss_sequence(tmp_path, random_pipeline):
    data = _pairs_folder(tmp_path / "pairs")  # 12 pairs, 4 per step: epochs end after steps 3 and 6
    whole = train_spm(data, random_pipeline, tmp_path / "whole", seed=3, overrides=SMALL)
    reference = _losses(whole)
    assert len(reference) == 5 and all(math.isfinite(x) for x in reference)

    parts = tmp_path / "parts"
    train_spm(data, random_pipeline, parts, seed=3, overrides=SMALL, stop_after=2)
    assert (parts / "checkpoints" / "step-0000002" / "trainer_state.json").is_file()
    assert not (parts / "spm_config.json").exists()  # not finished: no final model yet
    train_spm(data, random_pipeline, parts, seed=3, overrides=SMALL, resume=True, stop_after=2)
    train_spm(data, random_pipeline, parts, seed=3, overrides=SMALL, resume=True)
    assert _losses(parts) == reference  # exactly, across two restarts and an epoch boundary

    a = StepAwarePreferenceModel.from_pretrained(whole).eval()
    b = StepAwarePreferenceModel.from_pretrained(parts).eval()
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    info = json.loads((whole / "training_info.json").read_text())
    assert info["time_conditioning"] and info["data_stats"]["read"] == 20
    assert (whole / "train_curves.png").is_file()


@pytest.mark.slow
def test_two_processes_give_the_one_process_losses(tmp_path, random_pipeline):
    """`accelerate launch` with 2 CPU processes (gloo): same global batches and draws, so the same losses."""
    data = _pairs_folder(tmp_path / "pairs")
    one = train_spm(data, random_pipeline, tmp_path / "one", seed=3, overrides=SMALL)
    # --multi_gpu is accelerate's torchrun launcher (gloo on CPU); `--cpu` alone would start ONE process.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "training.cli", "train", "spm", "--data", str(data),
           "--model", str(random_pipeline), "--out", str(tmp_path / "two"), "--seed", "3", "--steps", "5",
           "--batch-size", "4", "--micro-batch", "1", "--warmup", "2", "--eval-every", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, env=env, timeout=600, cwd=os.path.dirname(os.path.dirname(__file__)))
    # Sums of the same terms in another grouping: equal up to float rounding.
    torch.testing.assert_close(torch.tensor(_losses(tmp_path / "two")), torch.tensor(_losses(one)),
                               rtol=1e-4, atol=1e-5)


def test_eval_command_writes_the_accuracy_table_and_json(tmp_path, random_pipeline, capsys):
    torch.manual_seed(0)
    spm, ablation = tmp_path / "spm", tmp_path / "ablation"
    build_spm("tiny").save_pretrained(spm)
    build_spm("tiny", time_conditioning=False).save_pretrained(ablation)
    out = tmp_path / "eval.json"
    assert main(["eval", "spm", "--model", str(spm), "--ablation", str(ablation), "--base-model",
                 str(random_pipeline), "--pairs", "4", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert ("| t | spm | spm (gap >= 0.05) | no-time ablation | no-time ablation (gap >= 0.05) | rater on previews |"
            in printed)
    assert "| 951 |" in printed
    result = json.loads(out.read_text())
    assert list(result["accuracy"]) == ["0", "251", "501", "751", "951"]
    assert all(0.0 <= a <= 1.0 for a in [*result["accuracy"].values(), *result["ablation_accuracy"].values()])
    assert result["pairs"] + result["rater_ties_left_out"] == 4 and 0 <= result["clear_pairs"] <= result["pairs"]
    assert list(result["accuracy_clear"]) == list(result["ablation_accuracy_clear"]) == list(result["accuracy"])
    assert list(result["rater_on_previews_accuracy"]["all"]) == list(result["accuracy"])


class _CleanPreviews:
    """Step images that are the clean images themselves (what a perfect denoiser would show at every t)."""

    latent_shape = (4, 8, 8)

    def __call__(self, images, captions, t, noise):
        return (images + 1.0) / 2.0


def test_rater_on_clean_previews_agrees_with_the_reference(tmp_path):
    from training.evaluate_spm import pairwise_correct, rater_on_previews
    from training.preference_data import load_pairs
    from training.render_pairs import write_render_pairs

    write_render_pairs(tmp_path / "renders", 24, temperature=0.0, seed=5)
    pairs = [p for p in load_pairs(tmp_path / "renders")[0] if p.preference != 0.5]
    correct = pairwise_correct(rater_on_previews, _CleanPreviews(), pairs, timesteps=(0, 501), batch=5)
    assert len(pairs) > 20 and all(c.all() for c in correct.values())
    flipped = [type(p)(p.caption, p.image_1, p.image_0, p.label_1, p.label_0, p.reference, p.reference_gap)
               for p in pairs]  # images swapped, reference kept: the rater is now wrong on every pair
    assert not any(c.any() for c in pairwise_correct(rater_on_previews, _CleanPreviews(), flipped).values())


def _error(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code, capsys.readouterr().err


@pytest.mark.parametrize(("argv", "flag"), [
    (["train", "spm", "--data", "{data}", "--preset", "huge"], "--preset"),
    (["train", "spm", "--data", "/nonexistent"], "--data"),
    (["train", "spm", "--data", "{data}", "--model", "/nonexistent"], "--model"),
    (["train", "spm", "--data", "{data}", "--init", "/nonexistent"], "--init"),
    (["train", "spm", "--data", "{data}", "--preset", "sd15"], "--init"),
    (["train", "spm", "--data", "{data}", "--steps", "0"], "--steps"),
    (["eval", "spm", "--model", "/nonexistent"], "--model"),
    (["data", "pairs", "--model", "/nonexistent", "--n", "4", "--out", "{data}"], "--model"),
    (["data", "pairs", "--n", "0", "--out", "{data}"], "--n"),
    (["data", "pairs", "--temperature", "-1", "--n", "4", "--out", "{data}"], "--temperature"),
    (["data", "pairs", "--guidance", "1,x", "--n", "4", "--out", "{data}"], "--guidance"),
])
def test_commands_name_the_offending_flag(argv, flag, tmp_path, capsys, random_pipeline):
    argv = [a.replace("{data}", str(tmp_path)) for a in argv]
    if argv[:2] == ["data", "pairs"] and "--model" not in argv:
        argv += ["--model", str(random_pipeline)]
    if argv[:2] == ["train", "spm"] and "--model" not in argv:
        argv += ["--model", str(random_pipeline)]
    code, err = _error(argv, capsys)
    assert code == 2 and f"argument {flag}" in err
