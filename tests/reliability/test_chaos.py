"""Chaos: N jobs through W real worker processes while workers are SIGKILLed (and replaced) K times mid-batch, with a
low visibility timeout. Every job ends succeeded or failed with a reason, none is lost, none is doubled (exactly N
jobs exist and each has one stored result), no image changes after a client first read it, and the killed workers'
consumers are pruned from the group.

SPO_CHAOS_JOBS (default 32), SPO_CHAOS_KILLS (4), SPO_CHAOS_WORKERS (2), SPO_CHAOS_STEPS (20); the long run in the
README: 200 jobs, 10 kills.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import time
from collections import Counter

import httpx
import pytest
import redis
from conftest import env_int
from harness import start_worker, stop_workers, table, wait_workers
from service_harness import PROMPT, ApiServer, make_settings

from service.contracts.queue import GROUP, Keys

pytestmark = pytest.mark.reliability


def test_worker_sigkills_lose_and_double_nothing(redis_url, prefix, manifest_path, tmp_path):
    jobs_n, kills_n = env_int("SPO_CHAOS_JOBS", 32), env_int("SPO_CHAOS_KILLS", 4)
    workers_n, steps = env_int("SPO_CHAOS_WORKERS", 2), env_int("SPO_CHAOS_STEPS", 20)
    rng = random.Random(21)
    settings = make_settings(redis_url, prefix, manifest_path, queue_max_length=jobs_n + 16, max_attempts=5,
                             visibility_timeout_s=2.0, worker_stale_s=3.0)
    keys = Keys(prefix)
    store = redis.Redis.from_url(redis_url, decode_responses=True)
    log = tmp_path / "workers.log"
    worker_env = {"SPO_VISIBILITY_TIMEOUT_S": "2", "SPO_MAX_ATTEMPTS": "5"}
    server = ApiServer(settings).start()
    client = httpx.Client(base_url=server.url, timeout=60)
    procs = [start_worker(settings, log, **worker_env) for _ in range(workers_n)]
    started = time.monotonic()
    try:
        wait_workers(client, workers_n)
        body = {"prompt": PROMPT, "num_inference_steps": steps}
        jobs = [client.post("/v1/jobs", json={**body, "seed": 1000 + i}).json()["id"] for i in range(jobs_n)]

        first_read: dict[str, list[str]] = {}
        kills: list[float] = []
        next_kill = time.monotonic() + rng.uniform(1.0, 2.5)
        deadline = time.monotonic() + 120 + jobs_n * 3
        statuses: dict[str, str] = {}
        while True:
            with store.pipeline(transaction=False) as pipe:
                for job_id in jobs:
                    pipe.hmget(keys.job(job_id), "status", "worker", "progress_step")
                rows = pipe.execute()
            statuses = {job_id: row[0] for job_id, row in zip(jobs, rows, strict=True)}
            for job_id, (status, _, _) in zip(jobs, rows, strict=True):
                if status == "succeeded" and job_id not in first_read:
                    view = client.get(f"/v1/jobs/{job_id}").json()
                    first_read[job_id] = [hashlib.sha256(client.get(u).content).hexdigest() for u in view["images"]]
            if all(s in ("succeeded", "failed", "cancelled") for s in statuses.values()):
                break
            assert time.monotonic() < deadline, f"not finished: {Counter(statuses.values())}"
            if len(kills) < kills_n and time.monotonic() >= next_kill:
                running = [row[1] for row in rows if row[0] == "running" and row[1] and int(row[2] or 0) >= 1]
                pids = {int(m.group(1)) for w in running if (m := re.search(r"-(\d+)-[0-9a-f]+$", w))}
                victims = [p for p in procs if p.pid in pids and p.poll() is None] or \
                    [p for p in procs if p.poll() is None]
                victim = rng.choice(victims)
                os.kill(victim.pid, signal.SIGKILL)
                victim.wait(10)
                procs.remove(victim)
                procs.append(start_worker(settings, log, **worker_env))  # the replacement loads meanwhile
                kills.append(time.monotonic() - started)
                next_kill = time.monotonic() + rng.uniform(1.5, 4.0)
            time.sleep(0.1)
        elapsed = time.monotonic() - started

        views = {job_id: client.get(f"/v1/jobs/{job_id}").json() for job_id in jobs}
        changed = sum(1 for job_id, hashes in first_read.items()
                      if [hashlib.sha256(client.get(u).content).hexdigest() for u in views[job_id]["images"]]
                      != hashes)
        existing = [k for k in store.scan_iter(match=f"{prefix}:job:*", count=1000) if ":image:" not in k]
        outcome = Counter(v["status"] for v in views.values())
        reasons = Counter(v["error"]["type"] for v in views.values() if v["status"] == "failed")
        attempts = Counter(v["attempts"] for v in views.values())
        duplicates_discarded = log.read_text().count("discarded this attempt's result")
        # the killed workers' consumers leave the group once their entries were reclaimed (pruned every 3 s)
        prune_deadline = time.monotonic() + 30
        consumers = []
        while time.monotonic() < prune_deadline:
            consumers = [c["name"] for s in keys.streams("spo-tiny") for c in store.xinfo_consumers(s, GROUP)]
            if len(consumers) <= workers_n:
                break
            time.sleep(0.5)
        table("chaos", {
            "jobs": jobs_n, "worker processes": f"{workers_n} (+{len(kills)} replacements)",
            "SIGKILLs at (s)": ", ".join(f"{k:.1f}" for k in kills), "elapsed (s)": f"{elapsed:.1f}",
            "succeeded": outcome["succeeded"], "failed (reasons)": f"{outcome['failed']} {dict(reasons)}",
            "lost (not terminal)": jobs_n - sum(outcome[s] for s in ("succeeded", "failed", "cancelled")),
            "job records": f"{len(existing)} (doubled: {len(existing) - jobs_n})",
            "reclaimed (attempts > 1)": sum(n for a, n in attempts.items() if a > 1),
            "attempts histogram": dict(sorted(attempts.items())),
            "duplicate results discarded": duplicates_discarded,
            "images changed after first read": changed,
            "consumers left in the group": f"{len(consumers)} (live workers: {workers_n})",
        })
        assert len(kills) == kills_n
        assert outcome["succeeded"] + outcome["failed"] == jobs_n and not outcome["cancelled"]
        assert all(v["error"]["type"] and v["error"]["message"] for v in views.values() if v["status"] == "failed")
        assert len(existing) == jobs_n
        assert all(len(v["images"]) == 1 for v in views.values() if v["status"] == "succeeded")
        assert changed == 0
        assert len(consumers) <= workers_n, consumers
    finally:
        stop_workers(procs)
        client.close()
        server.stop()
        store.close()
