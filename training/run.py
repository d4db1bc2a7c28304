"""What every fine-tuning run shares: the accelerator, checkpoints and resume, the log, the learning-rate schedule,
random sources keyed by what they draw for, and the time budget.

The SPM, SPO and Diffusion-DPO trainers use these so that a run killed and resumed, or run on any number of
processes, gives the result of an uninterrupted single-process run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from accelerate import Accelerator

CHECKPOINTS = "checkpoints"  # OUT/checkpoints/step-N/, N zero-padded to 7 digits: the layout of every trainer
STATE_FILE = "trainer_state.json"  # written last: a checkpoint folder without it is incomplete


# ------------------------------------------------------------------------------------------------------ accelerator


def make_accelerator(mixed_precision: str, gradient_accumulation_steps: int = 1) -> Accelerator:
    """An `Accelerator` on the GPU when there is one (with the preset's mixed precision), else on the CPU (gloo
    between processes, no mixed precision)."""
    from accelerate import Accelerator

    on_gpu = torch.cuda.is_available()
    return Accelerator(mixed_precision=mixed_precision if on_gpu else "no", cpu=not on_gpu,
                       gradient_accumulation_steps=gradient_accumulation_steps)


def weight_dtype(accelerator: Accelerator) -> torch.dtype:
    """The dtype of frozen weights under the accelerator's mixed precision (float32 without it)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(str(accelerator.mixed_precision), torch.float32)


def process_share(accelerator: Accelerator, batch_size: int, micro_batch: int) -> list[list[int]]:
    """This process's share of every global batch (indices into it), cut into micro-batches.

    The global batch is the same set of examples whatever the number of processes, so results do not depend on it.
    """
    world, rank = accelerator.num_processes, accelerator.process_index
    if batch_size % world:
        raise ValueError(f"batch size {batch_size} is not divisible by the {world} processes")
    mine = list(range(rank, batch_size, world))
    return [mine[i:i + micro_batch] for i in range(0, len(mine), micro_batch)]


def agreed(accelerator: Accelerator, flag: bool) -> bool:
    """The main process's `flag` on every process: decisions from clocks must not differ between processes."""
    from accelerate.utils import broadcast

    if accelerator.num_processes == 1:
        return flag
    return bool(broadcast(torch.tensor([float(flag)], device=accelerator.device)).item())


# -------------------------------------------------------------------------------------------- checkpoints and resume


def checkpoints(folder: Path) -> list[Path]:
    """Complete step checkpoints in `folder` (OUT/checkpoints), oldest first."""
    return sorted(p for p in Path(folder).glob("step-*") if (p / STATE_FILE).is_file())


def save_checkpoint(accelerator: Accelerator, ckpt_dir: Path, step: int, trainer_state: dict[str, Any], keep: int,
                    extra: Callable[[Path], None] | None = None) -> Path:
    """Write `ckpt_dir/step-N`: the accelerator state (every process: accelerate writes what each must, so no
    main-only hang), `extra(path)` on every process, then the trainer state (main process, last), and keep only the
    newest `keep` checkpoints."""
    path = Path(ckpt_dir) / f"step-{step:07d}"
    accelerator.save_state(str(path))
    if extra is not None:
        extra(path)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (path / STATE_FILE).write_text(json.dumps(trainer_state) + "\n")
        for old in checkpoints(ckpt_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return path


def refuse_foreign_checkpoints(ckpt_dir: Path, resume: bool) -> None:
    """Starting afresh over an earlier run's checkpoints would mix the two runs on a later resume."""
    if not resume and checkpoints(ckpt_dir):
        raise FileExistsError(f"{ckpt_dir} holds checkpoints of an earlier run: resume it or choose another --out")


def refuse_old_spo_layout(out: Path, resume: bool) -> None:
    """SPO runs once kept one checkpoint in OUT/checkpoint/ (progress.json); it cannot be resumed in this layout."""
    old = Path(out) / "checkpoint"
    if resume and (old / "progress.json").is_file() and not checkpoints(Path(out) / CHECKPOINTS):
        batch = json.loads((old / "progress.json").read_text()).get("batch")
        raise FileExistsError(
            f"{old} is an SPO checkpoint in the old layout (after batch {batch}); checkpoints now live in "
            f"{Path(out) / CHECKPOINTS}/step-N/ and this version cannot resume it. Finish that run with the version "
            f"that wrote it, or start afresh without --resume (delete {old} first, or choose another --out)")


def resume_state(accelerator: Accelerator, ckpt_dir: Path, state: dict[str, Any], resume: bool,
                 must_match: dict[str, Any] | None = None) -> dict[str, Any]:
    """With `resume`, load the newest checkpoint into `accelerator` and return its trainer state (the keys of
    `state`); else `state` unchanged.

    `must_match`: values the run's data order and random draws are keyed by (e.g. seed, batch size), looked up in the
    saved state or its preset config; resuming with other values is refused.
    """
    main = accelerator.is_main_process
    found = checkpoints(ckpt_dir) if resume else []
    if not found:
        if resume and main:
            print(f"no checkpoint in {ckpt_dir}: starting from the beginning", file=sys.stderr)
        return state
    last = found[-1]
    saved = json.loads((last / STATE_FILE).read_text())
    for key, want in (must_match or {}).items():
        have = saved[key] if key in saved else saved["config"][key]
        if have != want:
            raise ValueError(f"{last} was written with {key} {have}, this run has {want}; resume with the same value")
    accelerator.load_state(str(last))
    if main:
        print(f"resumed from {last}", file=sys.stderr)
    return {k: saved[k] for k in state}


def trim_log(log_path: Path, done: int, resume: bool, key: str = "step") -> None:
    """Start a run's jsonl log: empty, or (resuming) the earlier run's records with `key` <= `done`, the
    checkpoint's count (records written after the checkpoint are repeated by the resumed run)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    old = log_path.read_text().splitlines() if (resume and log_path.is_file()) else []
    log_path.write_text("".join(f"{r}\n" for r in old if json.loads(r).get(key, 0) <= done))


def append_record(log_path: Path, record: dict[str, Any]) -> None:
    """One line of a jsonl log."""
    with open(log_path, "a") as f:
        f.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------------------------------ schedule and randomness


def lr_factor(step: int, warmup: int) -> float:
    """Linear warm-up, then constant (PickScore's and Diffusion-DPO's schedule)."""
    return min(1.0, (step + 1) / max(1, warmup))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def example_generator(seed: int, step: int, index: int) -> torch.Generator:
    """The random source of one example, keyed by (seed, step, index in the global batch): independent of the
    number of processes and of resuming."""
    state = np.random.SeedSequence([seed, step, index]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def prompt_generators(seed: int, epoch: int, indices: list[int], salt: int) -> list[torch.Generator]:
    """One generator per prompt, from (seed, epoch, global prompt index, salt): independent of world size and
    batching. `salt` separates the uses (initial noise, sampling noise, minibatch draws)."""
    def mix(i: int) -> int:
        digest = hashlib.blake2b(f"{seed}/{epoch}/{i}/{salt}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") & (2**63 - 1)

    return [torch.Generator().manual_seed(mix(i)) for i in indices]


def prompt_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order of `n` prompts in `epoch`: a function of (seed, epoch) only."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


# ------------------------------------------------------------------------------------------------------ time budget


class TimeBudget:
    """Training seconds against an optional budget in minutes (equal-compute comparisons).

    `counted` seconds are summed over resumed runs and only accumulate inside `counting()` blocks, so held-out
    evaluation and snapshots can be left out; `wall_seconds()` is this run's time since the budget was made.
    """

    def __init__(self, max_minutes: float | None, counted: float = 0.0) -> None:
        self.max_minutes, self.counted = max_minutes, counted
        self.started = time.perf_counter()

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.counted += time.perf_counter() - started

    def wall_seconds(self) -> float:
        return time.perf_counter() - self.started

    def spent(self, seconds: float | None = None) -> bool:
        """Whether `seconds` (default: the counted seconds) exceed the budget."""
        used = self.counted if seconds is None else seconds
        return self.max_minutes is not None and used > 60 * self.max_minutes
