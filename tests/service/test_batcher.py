"""Batching policy: compatible jobs share a call, priority and arrival order decide, max_batch counts images."""

from __future__ import annotations

from service.contracts.queue import Claim, Job, JobParams
from service.worker.batcher import can_grow, images, next_batch


def claim(job_id: str, *, n: int = 1, size: int = 64, steps: int = 20, guidance: float = 5.0,
          priority: str = "normal", at: float = 0.0) -> Claim:
    params = JobParams(model="m", prompt="p", negative_prompt="", n=n, width=size, height=size, steps=steps,
                       guidance=guidance, seeds=tuple(range(n)))
    job = Job(id=job_id, params=params, status="queued", priority=priority, created_at=at)
    return Claim(job=job, stream="s", entry_id="0-1", received_at=at)


def ids(claims):
    return [c.job.id for c in claims]


def test_groups_compatible_jobs_in_arrival_order():
    backlog = [claim("a", at=1), claim("b", steps=30, at=2), claim("c", at=3), claim("d", size=128, at=4),
               claim("e", guidance=7.0, at=5), claim("f", at=6)]
    assert ids(next_batch(backlog, max_batch=8)) == ["a", "c", "f"]


def test_max_batch_counts_images_and_big_jobs_still_run():
    backlog = [claim("a", n=3, at=1), claim("b", n=2, at=2), claim("c", n=1, at=3)]
    assert ids(next_batch(backlog, max_batch=4)) == ["a", "c"]  # b (2 images) does not fit beside a (3)
    assert ids(next_batch([claim("huge", n=6)], max_batch=4)) == ["huge"]
    assert images(next_batch(backlog, max_batch=4)) == 4


def test_priority_first_then_arrival():
    backlog = [claim("old", at=1), claim("urgent", steps=30, priority="high", at=5), claim("low", priority="low",
                                                                                          steps=30, at=0)]
    assert ids(next_batch(backlog, max_batch=1)) == ["urgent"]
    assert ids(next_batch(backlog, max_batch=8)) == ["urgent", "low"]  # same key as urgent, so it rides along


def test_can_grow():
    assert not can_grow([], 4)
    assert can_grow([claim("a")], 4)
    assert not can_grow([claim("a", n=4)], 4)
