"""Scheduling: which claimed jobs share one pipeline call.

Jobs can share a call when they agree on everything the pipeline takes for the whole batch (model, size, steps,
guidance; a worker serves one model, so its scheduler is fixed); prompts, negative prompts and seeds are per image. A
batch takes the oldest highest-priority job's group, in arrival order, up to `max_batch` images; other jobs wait in the
worker's backlog for a later batch. Pure functions over plain data, so the policy is tested without Redis or torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from service.contracts.queue import PRIORITIES, Claim


@dataclass(frozen=True)
class BatchKey:
    model: str
    width: int
    height: int
    steps: int
    guidance: float


def batch_key(claim: Claim) -> BatchKey:
    p = claim.job.params
    return BatchKey(model=p.model, width=p.width, height=p.height, steps=p.steps, guidance=p.guidance)


def images(claims: Sequence[Claim]) -> int:
    return sum(c.job.params.n for c in claims)


def _order(claim: Claim) -> tuple[int, float]:
    return PRIORITIES.index(claim.job.priority) if claim.job.priority in PRIORITIES else 1, claim.received_at


def next_batch(backlog: Sequence[Claim], max_batch: int) -> list[Claim]:
    """The jobs to run next: the first job (by priority, then arrival) and the compatible jobs after it that fit in
    `max_batch` images. A job with more images than `max_batch` runs alone rather than never."""
    if not backlog:
        return []
    ordered = sorted(backlog, key=_order)
    key = batch_key(ordered[0])
    batch = [ordered[0]]
    room = max_batch - ordered[0].job.params.n
    for claim in ordered[1:]:
        if room <= 0:
            break
        if batch_key(claim) == key and claim.job.params.n <= room:
            batch.append(claim)
            room -= claim.job.params.n
    return batch


def can_grow(backlog: Sequence[Claim], max_batch: int) -> bool:
    """Whether waiting for more jobs could make the next batch bigger."""
    return bool(backlog) and images(next_batch(backlog, max_batch)) < max_batch
