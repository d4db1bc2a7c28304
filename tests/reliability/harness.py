"""Helpers of the reliability suite: a runner that draws instantly (for fuzzing the API, not the model), worker
processes, counts printed as a table."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[2]


class InstantRunner:
    """Stands in for the model: images of the right size at once, every step reported (cancellation still works)."""

    def __init__(self, spec) -> None:
        self.spec = spec
        self.device = "cpu"
        self.max_images = None

    def run(self, requests, *, width: int, height: int, steps: int, guidance: float, on_step=None):
        for step in range(1, steps + 1):
            if on_step is not None:
                on_step(step, steps, 0.0)
        return [np.full((height, width, 3), (r.seed * 37) % 256, dtype=np.uint8) for r in requests]


def start_worker(settings, log_path: Path, **env_overrides: str) -> subprocess.Popen:
    """A real `spo worker` process for spo-tiny on one torch thread."""
    env = {**os.environ, "SPO_KEY_PREFIX": settings.key_prefix, "SPO_VISIBILITY_TIMEOUT_S": "3",
           "SPO_HEARTBEAT_INTERVAL_S": "0.5", "SPO_WORKER_STALE_S": "3", "SPO_MAX_BATCH": "4",
           "SPO_MAX_WAIT_MS": "50", "SPO_TORCH_THREADS": "1", "SPO_LOG_LEVEL": "INFO", **env_overrides}
    cmd = [sys.executable, "-m", "service.cli", "worker", "--model", "spo-tiny", "--manifest", str(settings.manifest),
           "--redis-url", settings.redis_url]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log_path.open("a"), stderr=subprocess.STDOUT)


def stop_workers(procs: list[subprocess.Popen], timeout: float = 30) -> None:
    """SIGTERM every worker still running (they drain), then kill any that has not exited within `timeout`."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()


def wait_workers(client: httpx.Client, count: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        ready = client.get("/readyz")
        if ready.status_code == 200 and ready.json()["workers"].get("spo-tiny", 0) >= count:
            return
        assert time.monotonic() < deadline, f"{count} workers not ready: {ready.text}"
        time.sleep(0.2)


def table(title: str, rows: dict[str, object]) -> str:
    width = max(len(k) for k in rows)
    lines = [f"== {title} =="] + [f"  {k.ljust(width)}  {v}" for k, v in rows.items()]
    text = "\n".join(lines)
    print("\n" + text)
    return text
