"""Run under `accelerate launch --num_processes 2` by tests/test_spo_steps.py: an SPO run in which process 1 never
keeps a pair (its scorer ties every candidate), so only process 0 has pairs to train on.

    python -m accelerate.commands.launch ... tests/spo_two_process_run.py MODEL OUT BATCHES

Each process writes OUT/rank-R.pt: its trainable weights at the end and whether it ever kept a pair.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

from training.sampler import Scorer
from training.scorers import rater_scorer
from training.train_spo import SPORun, train_spo


def main() -> None:
    model, out, batches = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    runs: list[SPORun] = []

    def scorers(run: SPORun) -> Callable[[list[str]], Scorer]:
        runs.append(run)
        if run.accelerator.process_index == 1:  # equal scores: no comparison is clear, nothing is kept
            return lambda prompts: Scorer(lambda x0, idx, t: torch.zeros(len(x0)))
        return lambda prompts: rater_scorer(run.pipe.vae, prompts)

    train_spo("smoke", model, out, scorer=scorers, max_batches=batches)
    run = runs[0]
    unet = run.accelerator.unwrap_model(run.unet)
    weights = {n: p.detach().cpu().clone() for n, p in unet.named_parameters() if p.requires_grad}
    torch.save({"weights": weights, "kept_any": run.last_pairs is not None},
               out / f"rank-{run.accelerator.process_index}.pt")


if __name__ == "__main__":
    main()
