"""SPO's optimizer steps per batch: every kept pair is trained on once, in a fixed number of steps that every process
takes whatever it kept (two processes where one keeps nothing finish with equal weights); prompt files; the sd15
preset on a tiny SD 1.5-architecture model with a converted SPM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from training.presets import SPO_PRESETS
from training.prompts import PromptFileError, read_prompts
from training.train_spo import plan_steps

ROOT = Path(__file__).resolve().parents[1]


def reference_pair_uses(kept: int, train_batch_size: int = 10) -> int:
    """Pair gradients per batch in the reference: its kept samples are cut into train batches of 10, each pair once."""
    chunks = [min(train_batch_size, kept - start) for start in range(0, kept, train_batch_size)]
    return sum(chunks)


def test_sd15_trains_every_kept_pair_once_like_the_reference_in_a_fixed_step_count():
    p = SPO_PRESETS["sd15"]
    kept = [160, 0, 37, 95]  # four GPUs, one of which kept nothing this batch
    plan = plan_steps(kept, p.optimizer_steps_per_batch, p.micro_batch)
    assert len(plan) == p.optimizer_steps_per_batch == 1
    assert [sum(s.counts[r] for s in plan) for r in range(4)] == kept  # each process's pairs, all of them, once
    assert sum(s.total for s in plan) == sum(reference_pair_uses(k) for k in kept) == 292
    assert plan[0].passes == 16  # every process runs 16 passes of <= 10 pairs (the one without pairs: zero-weight)

    tiny = SPO_PRESETS["tiny"]  # 2 steps of <= 16-pair passes
    plan = plan_steps([33, 0], tiny.optimizer_steps_per_batch, tiny.micro_batch)
    assert [(s.step, s.counts, s.passes) for s in plan] == [(0, (17, 0), 2), (1, (16, 0), 1)]
    assert plan_steps([1, 0], 2, 16) == plan_steps([1, 0], 2, 16)[:1]  # a step nobody has pairs for: skipped by all
    assert plan_steps([0, 0], 2, 16) == []


def test_train_on_pairs_uses_each_pair_once_over_the_fixed_steps(smoke_model):
    """Seven distinct pairs, 2 optimizer steps, passes of 3: the policy sees each pair exactly once, 2 steps taken."""
    from accelerate import Accelerator

    from service.worker.pipeline import load_pipeline
    from training.conditioning import encode_prompts
    from training.lora import add_lora
    from training.sampler import StepPairs
    from training.train_spo import train_on_pairs

    p = replace(SPO_PRESETS["smoke"], optimizer_steps_per_batch=2, micro_batch=3)
    pipe = load_pipeline(str(smoke_model))
    pipe.scheduler.set_timesteps(p.num_steps)
    add_lora(pipe.unet, p.lora_rank, p.lora_targets, torch.float32)
    params = [q for q in pipe.unet.parameters() if q.requires_grad]
    accelerator = Accelerator(cpu=True)
    unet, optimizer = accelerator.prepare(pipe.unet, torch.optim.AdamW(params, lr=p.lr))
    steps = []
    step = optimizer.step
    optimizer.step = lambda *a, **k: (steps.append(1), step(*a, **k))[1]
    c, s = unet.config.in_channels, unet.config.sample_size
    ids = torch.arange(1, 8, dtype=torch.float32)
    x = ids.view(7, 1, 1, 1).expand(7, c, s, s).clone()  # pair i's latents are all i + 1: visible in the UNet input
    t = pipe.scheduler.timesteps[3].repeat(7)
    pairs = StepPairs(x, x.clone(), t, x * 0.9, x * 1.1, torch.zeros(7, dtype=torch.long))
    seen: list[float] = []

    def record(module, args, kwargs):
        if torch.is_grad_enabled():  # the policy's passes (the reference runs under no_grad)
            seen.extend(args[0][:, 0, 0, 0].tolist())

    pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    losses, rw, _ = train_on_pairs(accelerator, unet, optimizer, params, pipe.scheduler, pairs,
                                   encode_prompts(pipe, ["a red circle on a blue background"]), p,
                                   torch.Generator().manual_seed(0))
    assert len(steps) == len(losses) == 2
    # each pass holds win and lose parents, each twice (CFG): every pair id appears 4 times, none more
    assert sorted(seen) == sorted([v for v in ids.tolist() for _ in range(4)])
    assert sum(len(r) for r in rw) == 7


def test_two_processes_one_keeping_no_pairs_finish_with_equal_weights(smoke_model, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU (gloo): process 1's scorer ties every candidate, so
    it never keeps a pair while process 0 trains. Both must take the same optimizer steps (a process that skipped
    its step would leave the other waiting in DDP's gradient all-reduce forever) and end with the same weights."""
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "tests" / "spo_two_process_run.py"), str(smoke_model), str(out), "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    try:
        subprocess.run(cmd, check=True, env=env, timeout=400, cwd=ROOT, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        pytest.fail("two SPO processes did not finish in 400 s: one is waiting for the other (DDP deadlock)")
    except subprocess.CalledProcessError as err:
        pytest.fail(f"accelerate launch failed (rc {err.returncode}):\n{err.stderr[-3000:]}")
    ranks = [torch.load(out / f"rank-{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["kept_any"] and not ranks[1]["kept_any"]
    a, b = ranks[0]["weights"], ranks[1]["weights"]
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)  # trained: LoRA B starts at zero
    records = [json.loads(x) for x in (out / "spo_log.jsonl").read_text().splitlines()]
    assert [r["batch"] for r in records] == [0, 1, 2] and all(1 <= r["optimizer_steps"] <= 2 for r in records)


def test_prompt_files_in_three_layouts_skip_and_report_bad_entries(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps(["a cat", "", 3, {"prompt": "a dog"}, "  a fox  "]))
    got = read_prompts(tmp_path / "p.json")
    assert got.prompts == ["a cat", "a dog", "a fox"]
    assert got.problems == ["item 1: empty", "item 2: not a string (int)"] and "skipped 2 entries" in got.report()

    (tmp_path / "p.txt").write_bytes(b"a cat\n\n   \na \xff dog\na fox\n")
    got = read_prompts(tmp_path / "p.txt")
    assert got.prompts == ["a cat", "a fox"]
    assert got.problems == ["line 2: empty", "line 3: empty", "line 4: not UTF-8"]

    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat"}\n{"prompt": ""}\n{"caption": "x"}\nnot json\n"a fox"\n')
    got = read_prompts(tmp_path / "p.jsonl")
    assert got.prompts == ["a cat", "a fox"] and [q.split(":")[0] for q in got.problems] == ["line 2", "line 3",
                                                                                          "line 4"]
    (tmp_path / "bad.json").write_text("[\"a cat\",")
    for path, message in ((tmp_path / "bad.json", "not a JSON list"), (tmp_path / "none.txt", "cannot read")):
        with pytest.raises(PromptFileError, match=message):
            read_prompts(path)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(PromptFileError, match="no usable prompt"):
        read_prompts(tmp_path / "empty.txt")


@pytest.mark.slow
def test_cli_sd15_preset_trains_on_a_prompt_file_with_a_converted_spm(random_pipeline, tmp_path, capsys):
    """`spo train spo --preset sd15 --prompts FILE --spm CONVERTED` runs two iterations on a tiny SD 1.5 model.

    Slow: the sd15 preset itself (10 prompts x 4 candidates x 20 steps, every candidate decoded and scored) costs
    about a CPU-minute per batch even at the smoke widths."""
    from tests.published_spm import write_published_spm
    from training.cli import main
    from training.spm_convert import convert_spm

    base, ckpt, _ = write_published_spm(tmp_path / "published")
    spm = convert_spm(ckpt, str(base), tmp_path / "spm")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(["a red circle on a blue background", "", "a green square on a white background",
                                  "a blue triangle on a yellow background"] * 3) + "\n")
    out = tmp_path / "spo"
    assert main(["train", "spo", "--preset", "sd15", "--model", str(random_pipeline), "--spm", str(spm),
                 "--prompts", str(prompts), "--out", str(out), "--max-batches", "2"]) == 0
    assert "skipped 3 entries" in capsys.readouterr().err
    records = [json.loads(x) for x in (out / "spo_log.jsonl").read_text().splitlines()]
    assert [r["batch"] for r in records] == [0, 1] and not any("heldout_quality" in r for r in records)
    config = json.loads((out / "spo_config.json").read_text())
    assert config["prompts"] == 9 and config["preset"] == "sd15"
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    for argv, flag in ((["--prompts", str(tmp_path / "none.txt")], "--prompts"), (["--spm", str(ckpt)], "--spm")):
        with pytest.raises(SystemExit):
            main(["train", "spo", "--preset", "sd15", "--model", str(random_pipeline), "--spm", str(spm),
                  "--out", str(tmp_path / "x"), *argv])
        err = capsys.readouterr().err
        assert f"argument {flag}" in err
    assert "spo convert spm" in err
