"""Redis outages on a Redis of the test's own (another port): killed (SIGKILL, restarted empty), stopped (SIGTERM,
restarted after a pause) and paused (SIGSTOP for longer than the socket timeout, then SIGCONT), while clients keep
calling. During each outage every answer is a documented 503 (`queue_unavailable`, `no_worker` or `job_lost`, with
Retry-After) and /healthz stays 200; after it, the service serves again without any process being restarted.

SPO_OUTAGE_ROUNDS (default 1) repeats the three kinds.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter

import httpx
import pytest
from conftest import env_int
from harness import start_worker, stop_workers, table, wait_workers
from service_harness import PROMPT, ApiServer, free_port, make_settings

from service.embedded_redis import EmbeddedRedis

pytestmark = pytest.mark.reliability
DOCUMENTED_503 = {"queue_unavailable", "no_worker", "job_lost"}


def test_redis_outages_answer_503_and_recover(prefix, manifest_path, tmp_path):
    rounds = env_int("SPO_OUTAGE_ROUNDS", 1)
    redis_server = EmbeddedRedis(tmp_path / "redis", port=free_port())
    redis_server.start()
    settings = make_settings(redis_server.url, prefix, manifest_path, sync_timeout_s=30.0, worker_stale_s=3.0)
    server = ApiServer(settings).start()
    log = tmp_path / "worker.log"
    worker = start_worker(settings, log)
    client = httpx.Client(base_url=server.url, timeout=60)
    answers: list[tuple[float, int, str]] = []
    stop = threading.Event()

    def call() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as own:
            while not stop.is_set():
                try:
                    r = own.post("/v1/images/generations", json={"prompt": PROMPT, "num_inference_steps": 4})
                    code = r.json().get("error", {}).get("code", "") if r.status_code != 200 else ""
                    if r.status_code == 503:
                        assert r.headers.get("Retry-After"), r.text
                    answers.append((time.monotonic(), r.status_code, code))
                except httpx.TransportError as err:
                    answers.append((time.monotonic(), 0, type(err).__name__))
                if answers[-1][1] != 200:
                    time.sleep(0.2)

    callers = [threading.Thread(target=call, daemon=True) for _ in range(2)]
    recoveries: dict[str, list[float]] = {}
    health_during: Counter = Counter()
    try:
        wait_workers(client, 1)
        for t in callers:
            t.start()
        for _ in range(rounds):
            for kind in ("kill", "stop", "pause"):
                wait_for_200(answers, after=time.monotonic())
                process = redis_server.process
                assert process is not None
                if kind == "kill":
                    process.kill()
                    process.wait()
                    redis_server.process = None
                    time.sleep(2.0)
                    redis_server.start()
                elif kind == "stop":
                    redis_server.stop()
                    time.sleep(2.0)
                    redis_server.start()
                else:
                    os.kill(process.pid, signal.SIGSTOP)
                    for _ in range(7):
                        health_during[client.get("/healthz").status_code] += 1
                        time.sleep(1.0)
                    os.kill(process.pid, signal.SIGCONT)
                up_at = time.monotonic()
                recovered = wait_for_200(answers, after=up_at)
                recoveries.setdefault(kind, []).append(round(recovered - up_at, 2))
                health_during[client.get("/healthz").status_code] += 1
                assert worker.poll() is None, "the worker died: " + log.read_text()[-3000:]
        stop.set()
        for t in callers:
            t.join(60)
        final = client.post("/v1/images/generations", json={"prompt": PROMPT})
        by_kind = Counter((status, code) for _, status, code in answers)
        table("redis outage", {
            "rounds x kinds": f"{rounds} x kill, stop, pause",
            "requests": len(answers),
            "answers (status, code)": dict(sorted(by_kind.items())),
            "recovery after Redis is back (s)": recoveries,
            "/healthz during outages": dict(health_during),
            "worker restarts": 0 if worker.poll() is None else "died",
            "final request": final.status_code,
        })
        assert final.status_code == 200, final.text
        bad = [(s, c) for _, s, c in answers if s != 200 and not (s == 503 and c in DOCUMENTED_503)]
        assert not bad, Counter(bad)
        assert set(health_during) == {200}
        assert by_kind[(503, "queue_unavailable")] > 0  # the outages were seen
    finally:
        stop.set()
        stop_workers([worker])
        client.close()
        server.stop()
        redis_server.close()


def wait_for_200(answers: list[tuple[float, int, str]], after: float, timeout: float = 60) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for at, status, _ in list(answers):
            if at > after and status == 200:
                return at
        time.sleep(0.05)
    raise AssertionError(f"no 200 within {timeout}s; last answers: {answers[-10:]}")
