"""Helpers for the service tests: settings, a threaded uvicorn API server, a threaded worker, waiting helpers."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx

from service.contracts.config import Settings

PROMPT = "a red circle on a blue background"
STEPS = 4  # few denoising steps keep the suite fast; batching and seeding do not depend on the count


def make_settings(redis_url: str, prefix: str, manifest_path: Path, **overrides) -> Settings:
    values = dict(redis_url=redis_url, key_prefix=prefix, manifest=manifest_path, models=[], api_keys=[],
                  api_keys_file=None, rate_limit_per_minute=0, queue_max_length=64, job_ttl_s=600,
                  visibility_timeout_s=3.0, max_attempts=3, sync_timeout_s=120.0, max_batch=4, max_wait_ms=50,
                  heartbeat_interval_s=0.5, worker_stale_s=5.0, device=None, torch_threads=None,
                  max_body_bytes=64 * 1024)
    values.update(overrides)
    return Settings(**values)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ApiServer:
    """The real app under uvicorn, in a thread, on a free port."""

    def __init__(self, settings: Settings, http: str = "auto") -> None:
        import uvicorn

        from service.api.app import create_app
        from service.api.server import server_config

        self.app = create_app(settings)
        self.server = uvicorn.Server(server_config(self.app, settings, host="127.0.0.1", port=free_port(),
                                                   log_level="warning", lifespan="on", http=http))
        self.url = f"http://127.0.0.1:{self.server.config.port}"
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> ApiServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("API server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


class ThreadWorker:
    """A `Worker` on its own event loop in a thread, sharing the session's loaded runner."""

    def __init__(self, settings: Settings, runner) -> None:
        self.settings = settings
        self.runner = runner
        self.worker = None
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        from service.contracts.queue import JobQueue, connect
        from service.worker.loop import Worker

        async def run() -> None:
            client = connect(self.settings.redis_url, socket_timeout=10)
            queue = JobQueue(client, self.settings.key_prefix, job_ttl_s=self.settings.job_ttl_s,
                             max_length=self.settings.queue_max_length)
            self.worker = Worker(queue, self.runner, self.settings)
            self._ready.set()
            try:
                await self.worker.run()
            finally:
                await client.aclose()

        try:
            asyncio.run(run())
        except BaseException as err:  # surfaced by stop()
            self.error = err
            self._ready.set()

    def start(self) -> ThreadWorker:
        self.thread.start()
        self._ready.wait(10)
        return self

    def stop(self, timeout: float = 60) -> None:
        if self.worker is not None:
            self.worker.request_stop()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "worker did not drain in time"
        if self.error is not None:
            raise self.error


def wait_ready(url: str, timeout: float = 30, headers: dict | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(f"{url}/readyz", headers=headers).status_code == 200:
            return
        time.sleep(0.1)
    raise AssertionError(f"service at {url} not ready after {timeout}s")


def wait_process_ready(proc: subprocess.Popen, url: str, log_path: Path, timeout: float) -> None:
    """Until a `spo serve` / `spo api` subprocess answers 200 on /readyz; fails with its log if it exits first or
    takes longer than `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, log_path.read_text()
        assert time.monotonic() < deadline, log_path.read_text()
        try:
            if httpx.get(f"{url}/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)


def wait_status(client: httpx.Client, job_id: str, statuses: set[str], timeout: float = 60) -> dict:
    """Poll GET /v1/jobs/{id} until the job reaches one of `statuses` (tests only; clients use the SSE stream)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} not in {statuses} after {timeout}s: {job}")


class PacedRunner:
    """The real runner, slowed down by `step_delay` seconds per denoising step, so a test can act while a batch is
    provably mid-flight (cancel it, kill it). Everything else is the real model execution."""

    def __init__(self, runner, step_delay: float) -> None:
        self.inner = runner
        self.spec = runner.spec
        self.device = runner.device
        self.max_images = runner.max_images
        self.step_delay = step_delay

    def run(self, requests, *, on_step=None, **kwargs):
        def paced(step, total, seconds):
            time.sleep(self.step_delay)
            if on_step is not None:
                on_step(step, total, seconds)

        return self.inner.run(requests, on_step=paced, **kwargs)
