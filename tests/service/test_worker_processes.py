"""Two `spo worker` processes share one queue; SIGKILL of one mid-batch loses no job, and every job has exactly
one result (the one a client first read is the one it reads later)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from service_harness import PROMPT, ApiServer, make_settings

from service.worker.runner import ImageRequest

ROOT = Path(__file__).resolve().parents[2]
STEPS = 30
SIZE = 64


def start_worker(settings, log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "SPO_KEY_PREFIX": settings.key_prefix, "SPO_VISIBILITY_TIMEOUT_S": "3",
           "SPO_HEARTBEAT_INTERVAL_S": "0.5", "SPO_MAX_BATCH": "4", "SPO_MAX_WAIT_MS": "200",
           "SPO_TORCH_THREADS": "1", "SPO_LOG_LEVEL": "INFO"}
    cmd = [sys.executable, "-m", "service.cli", "worker", "--model", "spo-tiny", "--manifest", str(settings.manifest),
           "--redis-url", settings.redis_url]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log_path.open("w"), stderr=subprocess.STDOUT)


def wait_for_workers(client: httpx.Client, procs: list[subprocess.Popen], log: Path) -> None:
    deadline = time.monotonic() + 120
    while client.get("/readyz").json().get("workers", {}).get("spo-tiny") != len(procs):
        assert time.monotonic() < deadline, "workers did not start: " + log.read_text()
        assert all(p.poll() is None for p in procs), log.read_text()
        time.sleep(0.2)


def test_sigkill_mid_batch_loses_nothing(redis_url, prefix, manifest_path, runner, tmp_path):
    settings = make_settings(redis_url, prefix, manifest_path)
    server = ApiServer(settings).start()
    procs = [start_worker(settings, tmp_path / f"worker{i}.log") for i in range(2)]
    client = httpx.Client(base_url=server.url, timeout=30)
    try:
        wait_for_workers(client, procs, tmp_path / "worker0.log")

        body = {"prompt": PROMPT, "num_inference_steps": STEPS, "size": f"{SIZE}x{SIZE}"}
        jobs = [client.post("/v1/jobs", json={**body, "seed": 100 + i}).json()["id"] for i in range(8)]

        # Kill the worker of the first job seen mid-run (a few steps in, far from the end).
        victim_pid = None
        deadline = time.monotonic() + 60
        while victim_pid is None:
            assert time.monotonic() < deadline, "no job was seen running"
            for job_id in jobs:
                job = client.get(f"/v1/jobs/{job_id}").json()
                if job["status"] == "running" and 1 <= job["progress"]["step"] <= STEPS // 2:
                    victim_pid = worker_pid(job_worker(redis_url, prefix, job_id))
                    break
            time.sleep(0.01)
        os.kill(victim_pid, signal.SIGKILL)
        next(p for p in procs if p.pid == victim_pid).wait(10)
        victim_jobs = {j for j in jobs if worker_pid(job_worker(redis_url, prefix, j)) == victim_pid}
        assert victim_jobs, "the killed worker held no job"
        survivor_pid = next(p.pid for p in procs if p.pid != victim_pid)

        first_seen: dict[str, list[bytes]] = {}
        deadline = time.monotonic() + 120
        while len(first_seen) < len(jobs):
            assert time.monotonic() < deadline, f"jobs not finished: {set(jobs) - set(first_seen)}"
            for job_id in set(jobs) - set(first_seen):
                job = client.get(f"/v1/jobs/{job_id}").json()
                assert job["status"] in ("queued", "running", "succeeded"), job
                if job["status"] == "succeeded":
                    first_seen[job_id] = [client.get(link).content for link in job["images"]]
            time.sleep(0.1)

        finished = {job_id: client.get(f"/v1/jobs/{job_id}").json() for job_id in jobs}
        for job_id, job in finished.items():
            assert job["status"] == "succeeded"
            assert [client.get(link).content for link in job["images"]] == first_seen[job_id]  # never replaced
        for job_id in victim_jobs:  # finished by the survivor, on a second attempt
            assert finished[job_id]["attempts"] == 2
            assert worker_pid(job_worker(redis_url, prefix, job_id)) == survivor_pid

        # The re-run result is the result: the same image the model gives for that seed in this process.
        job_id = sorted(victim_jobs)[0]
        (expected,) = runner.run([ImageRequest(PROMPT, finished[job_id]["seeds"][0])], width=SIZE, height=SIZE,
                                 steps=STEPS, guidance=5.0)
        got = np.asarray(Image.open(io.BytesIO(first_seen[job_id][0])).convert("RGB"))
        assert np.abs(got.astype(np.int16) - expected.astype(np.int16)).mean() <= 1.0
    finally:
        server.stop()
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                assert p.wait(30) == 0 or p.pid == victim_pid, "a worker did not drain and exit cleanly on SIGTERM"
            finally:
                if p.poll() is None:
                    p.kill()


def worker_pid(consumer: str) -> int | None:
    """Consumer names are '<host>-<pid>-<random>'; a job not started yet has none."""
    return int(consumer.rsplit("-", 2)[1]) if consumer else None


def job_worker(redis_url: str, prefix: str, job_id: str) -> str:
    import redis

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        return client.hget(f"{prefix}:job:{job_id}", "worker") or ""
    finally:
        client.close()


def test_sigterm_mid_batch_finishes_the_batch_then_exits(redis_url, prefix, manifest_path, runner, tmp_path):
    """The pipeline runs on the worker's main thread and the signal is handled there: a SIGTERM while a batch is
    being denoised lets that batch finish and be stored, takes no new job, and exits 0."""
    settings = make_settings(redis_url, prefix, manifest_path)
    server = ApiServer(settings).start()
    proc = start_worker(settings, tmp_path / "worker.log")
    client = httpx.Client(base_url=server.url, timeout=30)
    try:
        wait_for_workers(client, [proc], tmp_path / "worker.log")
        body = {"prompt": PROMPT, "num_inference_steps": 60, "size": f"{SIZE}x{SIZE}"}
        jobs = [client.post("/v1/jobs", json={**body, "seed": 300 + i}).json()["id"] for i in range(8)]
        deadline = time.monotonic() + 60
        running: list[str] = []
        while not running:
            assert time.monotonic() < deadline, "no job was seen running"
            views = [client.get(f"/v1/jobs/{j}").json() for j in jobs]
            running = [v["id"] for v in views if v["status"] == "running" and v["progress"]["step"] <= 30]
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, (tmp_path / "worker.log").read_text()
        after = {j: client.get(f"/v1/jobs/{j}").json()["status"] for j in jobs}
        assert all(after[j] == "succeeded" for j in running), after  # the batch in flight was finished
        assert "queued" in after.values(), after  # and nothing new was taken after the signal
        assert "SIGTERM: draining" in (tmp_path / "worker.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        client.close()
        server.stop()
