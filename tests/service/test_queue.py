"""The Redis Streams protocol itself: visibility timeout, reclaim, attempts -> dead letter, first result wins,
claims kept alive during long batches, bounded length."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from service_harness import PROMPT, ApiServer, ThreadWorker, make_settings, wait_status

from service.contracts.queue import JobParams, JobQueue, QueueFull, connect

MODEL = "spo-tiny"


def params(seed: int = 0) -> JobParams:
    return JobParams(model=MODEL, prompt=PROMPT, negative_prompt="", n=1, width=64, height=64, steps=2,
                     guidance=5.0, seeds=(seed,))


def run(coro):
    return asyncio.run(coro)


async def _queue(redis_url: str, prefix: str, **kw) -> JobQueue:
    return JobQueue(connect(redis_url), prefix, raw=connect(redis_url, decode=False), **kw)


def test_dead_worker_entries_are_reclaimed_then_dead_lettered(redis_url, prefix):
    async def scenario():
        q = await _queue(redis_url, prefix)
        await q.submit("job-1", params())
        (claim,) = await q.read(MODEL, "w1", count=5)
        assert await q.start(claim, "w1", max_attempts=2) == "ok"
        # w1 dies here. Within the visibility timeout nobody may take the entry...
        assert await q.reclaim(MODEL, "w2", min_idle_s=0.5, count=5) == []
        await asyncio.sleep(0.6)
        # ...after it, another worker reclaims it (attempt 2)...
        (again,) = await q.reclaim(MODEL, "w2", min_idle_s=0.5, count=5)
        assert again.job.id == "job-1" and again.job.attempts == 1
        assert await q.start(again, "w2", max_attempts=2) == "ok"
        await asyncio.sleep(0.6)
        # ...and once attempts are used up the job fails and is copied to the dead-letter stream.
        (last,) = await q.reclaim(MODEL, "w3", min_idle_s=0.5, count=5)
        assert await q.start(last, "w3", max_attempts=2) == "exhausted"
        assert await q.fail(last, "attempts_exhausted", "claimed twice without finishing") == "failed"
        await q.ack(last)
        job = await q.get("job-1")
        dead = await q.redis.xrange(q.keys.dead(MODEL))
        depth = await q.depth(MODEL)
        await q.redis.aclose()
        return job, dead, depth

    job, dead, depth = run(scenario())
    assert job.status == "failed" and job.error_type == "attempts_exhausted" and job.attempts == 2
    assert [(fields["job"], fields["reason"]) for _, fields in dead] == [("job-1", "attempts_exhausted")]
    assert depth == 0


def test_first_stored_result_wins(redis_url, prefix):
    """A slow worker whose job was reclaimed and finished elsewhere cannot overwrite the stored result."""

    async def scenario():
        q = await _queue(redis_url, prefix)
        await q.submit("job-2", params())
        (slow,) = await q.read(MODEL, "slow", count=1)
        await q.start(slow, "slow", max_attempts=3)
        await asyncio.sleep(0.3)
        (fast,) = await q.reclaim(MODEL, "fast", min_idle_s=0.2, count=1)
        await q.start(fast, "fast", max_attempts=3)
        first = await q.complete(fast, [b"PNG-from-fast"], {"worker": "fast"})
        second = await q.complete(slow, [b"PNG-from-slow"], {"worker": "slow"})
        image, job = await q.image("job-2", 0), await q.get("job-2")
        await q.redis.aclose()
        await q.raw.aclose()
        return first, second, image, job

    first, second, image, job = run(scenario())
    assert (first, second) == ("succeeded", "succeeded")  # the second call found it done and stored nothing
    assert image == b"PNG-from-fast" and job.worker == "fast" and job.images == 1


def test_touch_keeps_a_long_batch_claimed(redis_url, prefix):
    async def scenario():
        q = await _queue(redis_url, prefix)
        await q.submit("job-3", params())
        claims = await q.read(MODEL, "busy", count=1)
        stolen = []
        for _ in range(4):  # 1.2 s in all, longer than the 0.5 s visibility timeout
            await asyncio.sleep(0.3)
            await q.touch(claims, "busy")
            stolen += await q.reclaim(MODEL, "thief", min_idle_s=0.5, count=1)
        await q.redis.aclose()
        return stolen

    assert run(scenario()) == []


def test_bounded_queue_and_cancelled_entries(redis_url, prefix):
    async def scenario():
        q = await _queue(redis_url, prefix, max_length=2)
        await q.submit("a", params())
        await q.submit("b", params())
        with pytest.raises(QueueFull) as full:
            await q.submit("c", params())
        assert await q.cancel("a") == "cancelled_now"  # removes its entry: room again
        await q.submit("c", params(), priority="high")
        claims = await q.read(MODEL, "w", count=5)
        depth = await q.depth(MODEL)
        await q.redis.aclose()
        return full.value, [c.job.id for c in claims], depth

    full, read_order, depth = run(scenario())
    assert full.depth == 2 and full.retry_after >= 1
    assert read_order == ["c"]  # high priority is read before normal
    assert depth == 2


def test_worker_fails_a_job_out_of_attempts(redis_url, prefix, manifest_path, runner):
    """Through the real worker: a job whose earlier claims all died is failed with a clear error, not retried."""
    settings = make_settings(redis_url, prefix, manifest_path, max_attempts=1, visibility_timeout_s=0.5)

    async def die_once():
        q = await _queue(redis_url, prefix)
        await q.submit("doomed", params())
        (claim,) = await q.read(MODEL, "dead-worker", count=1)
        await q.start(claim, "dead-worker", max_attempts=1)
        await q.redis.aclose()

    run(die_once())
    server = ApiServer(settings).start()
    worker = ThreadWorker(settings, runner).start()
    try:
        client = httpx.Client(base_url=server.url)
        job = wait_status(client, "doomed", {"failed"}, timeout=20)
    finally:
        worker.stop()
        server.stop()
    assert job["error"]["type"] == "attempts_exhausted"
    assert "claimed 1 times" in job["error"]["message"]
