"""The worker loop: claim jobs from the model's queue, batch them, run them, store the results, acknowledge.

One worker owns one model on one device (the runner). Each turn of the loop:
1. reclaim entries other workers left idle past the visibility timeout (XAUTOCLAIM), then read new ones, highest
   priority first, blocking briefly when there is nothing to do;
2. under load (the last batch had company), wait at most `max_wait_ms` for more compatible jobs while the next batch
   is not full; a lone request on an idle worker runs at once;
3. start the batch's jobs (skipping cancelled ones, failing ones out of attempts), run one pipeline call with one
   generator per image, publishing progress and honouring cancellation at every denoising step, while a background
   task keeps the batch's entries claimed;
4. store images + status, then acknowledge. A crash before step 4 leaves entries pending for another worker.

SIGTERM/SIGINT drains: stop reading, finish the claimed jobs, acknowledge, exit. Heartbeats go to Redis every
`heartbeat_interval_s` (readiness and the heartbeat-age metric read them). Every `worker_stale_s` a worker also prunes
what killed workers left behind: their consumers in the group (once nothing is pending on them) and heartbeats older
than `HEARTBEAT_KEEP_STALE` x `worker_stale_s`.

In `spo worker` the pipeline runs on the process's main thread and this loop on a thread beside it
(`MainThreadCalls`): on the CPU, torch's OpenMP thread team runs a small UNet's many short parallel regions about
2.7x slower when called from any other thread (benchmarks/results/serve-cpu-2026-12-03). CUDA launches are
unaffected by the choice.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
import logging
import os
import queue as stdlib_queue
import resource
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from PIL import Image
from redis.exceptions import RedisError

from service.contracts import metrics
from service.contracts.config import Settings
from service.contracts.queue import Claim, JobQueue
from service.worker.batcher import can_grow, images, next_batch
from service.worker.runner import ImageRequest, Runner

log = logging.getLogger(__name__)

# An idle worker blocks on XREADGROUP this long at a time, then looks at stop requests and stale entries again.
IDLE_BLOCK_MS = 250
# A dead worker's heartbeat stays visible (readiness ignores it, the age metric shows it growing) this many times
# worker_stale_s, then the pruning removes it.
HEARTBEAT_KEEP_STALE = 4


class BatchCancelled(Exception):
    """Every job of the running batch was cancelled: abort the pipeline call."""


def _log_report_error(future: concurrent.futures.Future) -> None:
    if not future.cancelled() and future.exception() is not None:  # progress is best effort
        log.debug("progress report failed: %s", future.exception())


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


# How the loop hands a blocking call (the pipeline) to another thread and awaits it.
Offload = Callable[..., Awaitable[Any]]


class MainThreadCalls:
    """Runs the calls the worker loop submits on the thread that calls `serve` (the process's main thread).

    The loop awaits each call without blocking; `serve` returns once `done` is set and no call is pending.
    """

    def __init__(self) -> None:
        self._calls: stdlib_queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future]] = \
            stdlib_queue.SimpleQueue()

    async def offload(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._calls.put((lambda: fn(*args, **kwargs), future))
        return await asyncio.wrap_future(future)

    def serve(self, done: threading.Event) -> None:
        while not done.is_set() or not self._calls.empty():
            try:
                call, future = self._calls.get(timeout=0.1)  # wakes for signals and for `done`
            except stdlib_queue.Empty:
                continue
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(call())
            except BaseException as err:  # the awaiting coroutine re-raises it
                future.set_exception(err)


class Worker:
    """Serves one model from the queue through a loaded runner (`ModelRunner`, or a test's stand-in)."""

    def __init__(self, queue: JobQueue, runner: Runner, settings: Settings, *, consumer: str | None = None,
                 offload: Offload | None = None) -> None:
        self.queue = queue
        self.runner = runner
        self.settings = settings
        self.model = runner.spec.name
        self.consumer = consumer or consumer_name()
        self.offload: Offload = offload or asyncio.to_thread  # where the pipeline call runs (MainThreadCalls)
        cap = runner.max_images  # a compiled backend's profile may hold fewer images
        self.max_batch = min(settings.max_batch, cap) if cap else settings.max_batch
        self.backlog: list[Claim] = []
        self._stopping = asyncio.Event()
        self._stop_requested = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_reclaim = -float("inf")
        self._last_prune = time.monotonic()  # the first prune waits one period: start-up is not the moment
        self._state = "starting"
        self._under_load = False  # did the last batch have company? then it pays to wait for more
        self.batches_run = 0
        metrics.initialise_worker(self.model, runner.spec.backend)

    # -- lifecycle -------------------------------------------------------------------------------------------

    def request_stop(self, reason: str | None = None) -> None:
        """Begin a graceful drain; safe to call from any thread or a signal handler, before or during `run`. The
        `reason` is logged from the event loop (a signal handler must not take the logging lock itself)."""
        self._stop_requested = True
        if self._loop is None:
            return  # `run` sees _stop_requested when it starts
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: the worker has already stopped
            self._loop.call_soon_threadsafe(self._stopping.set)
            if reason:
                self._loop.call_soon_threadsafe(log.info, "%s: draining (finishing claimed jobs, then exiting)",
                                                reason)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._stop_requested:
            self._stopping.set()
        await self._retry_redis(lambda: self.queue.ensure_groups(self.model))
        self._record_memory()  # the loaded model's footprint, before the first batch
        heartbeat = asyncio.create_task(self._heartbeats(), name="spo-heartbeat")
        log.info("worker %s serving %s (max_batch=%d, max_wait_ms=%d, visibility=%.1fs)", self.consumer, self.model,
                 self.max_batch, self.settings.max_wait_ms, self.settings.visibility_timeout_s)
        self._state = "idle"
        backoff = 0.2
        try:
            while not self.stopping or self.backlog:
                try:
                    if not self.stopping:
                        await self._fill_backlog()
                    batch = next_batch(self.backlog, self.max_batch)
                    if batch:
                        chosen = {c.entry_id for c in batch}
                        self.backlog = [c for c in self.backlog if c.entry_id not in chosen]
                        self._under_load = len(batch) > 1 or bool(self.backlog)
                        await self._run_batch(batch)  # on a Redis error its jobs stay pending: reclaimed later
                    backoff = 0.2
                except RedisError as err:
                    if "NOGROUP" in str(err):  # Redis restarted without persistence: recreate the group now
                        log.warning("consumer group missing (Redis restarted?); recreating it")
                        self.queue.forget_groups()
                        continue
                    log.warning("Redis error in worker loop (%s); retrying in %.1fs", err, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            with contextlib.suppress(RedisError):
                await self.queue.forget_worker(self.model, self.consumer)
            log.info("worker %s stopped after %d batches", self.consumer, self.batches_run)

    async def _retry_redis(self, op: Callable[[], Awaitable[Any]]) -> Any:
        backoff = 0.2
        while True:
            try:
                return await op()
            except RedisError as err:
                if self.stopping:
                    raise
                log.warning("Redis unavailable (%s); retrying in %.1fs", err, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _heartbeats(self) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "device": self.runner.device,
                "backend": self.runner.spec.backend, "started": time.time()}
        while True:
            try:
                await self.queue.heartbeat(self.model, self.consumer, {**info, "state": self._state},
                                           ttl_s=self.settings.worker_stale_s * 10)
            except RedisError as err:
                log.debug("heartbeat failed: %s", err)
            await asyncio.sleep(self.settings.heartbeat_interval_s)

    # -- claiming --------------------------------------------------------------------------------------------

    async def _fill_backlog(self) -> None:
        s = self.settings
        await self.queue.ensure_groups(self.model)  # cached; recreates the group after a Redis restart
        now = time.monotonic()
        if now - self._last_reclaim >= min(30.0, max(0.5, s.visibility_timeout_s / 2)):
            self._last_reclaim = now
            self._add_to_backlog(await self.queue.reclaim(self.model, self.consumer, s.visibility_timeout_s,
                                                          self.max_batch))
        if now - self._last_prune >= s.worker_stale_s:
            self._last_prune = now
            await self._prune()
        need = self.max_batch - images(self.backlog)
        if need > 0:
            block_ms = 0 if self.backlog else IDLE_BLOCK_MS
            self._add_to_backlog(await self.queue.read(self.model, self.consumer, need, block_ms))
        if not self.backlog or s.max_wait_ms <= 0 or not (self._under_load or len(self.backlog) > 1):
            return  # a lone request on an idle worker runs at once: waiting would only add latency
        # Under load, give a partial batch up to max_wait_ms (from its first job's arrival) to fill up.
        deadline = min(c.received_at for c in self.backlog) + s.max_wait_ms / 1000
        while can_grow(self.backlog, self.max_batch) and not self.stopping:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            room = self.max_batch - images(self.backlog)  # the backlog may be full of jobs the batch cannot take
            if remaining_ms <= 0 or room <= 0:
                break
            more = await self.queue.read(self.model, self.consumer, room, remaining_ms)
            if not more:
                break
            self._add_to_backlog(more)

    async def _prune(self) -> None:
        s = self.settings
        consumers, beats = await self.queue.prune(
            self.model, stale_s=s.worker_stale_s,
            heartbeat_max_age_s=max(30.0, HEARTBEAT_KEEP_STALE * s.worker_stale_s))
        if consumers or beats:
            log.info("pruned dead workers of %s: %d idle consumer(s) without pending jobs, %d stale heartbeat(s)",
                     self.model, len(consumers), len(beats))

    async def _keep_claimed(self, claims: list[Claim]) -> None:
        """While a batch runs, reset the idle time of its entries and of the backlog's (claimed, waiting for a
        later batch), so other workers do not reclaim jobs this worker is alive to run."""
        interval = max(0.2, self.settings.visibility_timeout_s / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.queue.touch([*claims, *self.backlog], self.consumer)
            except RedisError as err:
                log.debug("touch failed: %s", err)

    def _add_to_backlog(self, claims: list[Claim]) -> None:
        """Add newly read or reclaimed entries, once each (a reclaim can return an entry already held here)."""
        held = {c.entry_id for c in self.backlog}
        self.backlog += [c for c in claims if c.entry_id not in held]

    # -- running ---------------------------------------------------------------------------------------------

    async def _start_all(self, batch: list[Claim]) -> list[Claim]:
        started = []
        for claim in batch:
            outcome = await self.queue.start(claim, self.consumer, self.settings.max_attempts)
            if outcome == "ok":
                started.append(claim)
                continue
            if outcome == "exhausted":
                message = (f"job was claimed {self.settings.max_attempts} times without finishing (its worker died "
                           f"or stalled each time); see the dead-letter stream")
                await self.queue.fail(claim, "attempts_exhausted", message)
                metrics.FAILURES.labels(self.model, "attempts_exhausted").inc()
                metrics.JOBS.labels(self.model, "failed").inc()
                log.error("job %s failed: %s", claim.job.id, message)
            elif outcome == "cancelled":
                metrics.JOBS.labels(self.model, "cancelled").inc()
            await self.queue.ack(claim)  # cancelled, already finished elsewhere, expired, or just failed
        return started

    async def _run_batch(self, batch: list[Claim]) -> None:
        started = await self._start_all(batch)
        if not started:
            return
        now = time.time()
        for claim in started:
            metrics.QUEUE_WAIT.labels(self.model).observe(max(0.0, now - claim.job.created_at))
        first = started[0].job.params
        requests = [ImageRequest(c.job.params.prompt, seed, c.job.params.negative_prompt)
                    for c in started for seed in c.job.params.seeds]
        cancelled: set[str] = set()
        loop = asyncio.get_running_loop()
        step_metric = metrics.UNET_STEP.labels(self.model, self.runner.spec.backend)

        async def report(step: int, total: int) -> None:
            active = [c for c in started if c.job.id not in cancelled]
            for job_id in await self.queue.progress(active, step, total) - cancelled:
                cancelled.add(job_id)
                claim = next(c for c in started if c.job.id == job_id)
                await self.queue.mark_cancelled(claim)  # the client sees it stop now; batch-mates go on
                log.info("job %s cancelled at step %d/%d", job_id, step, total)

        in_flight: list[concurrent.futures.Future] = []

        def on_step(step: int, total: int, seconds: float) -> None:  # runs on the inference thread
            """Report progress without waiting for Redis (denoising never stalls on it; while a report is in
            flight later steps are coalesced, the last one is always sent). A cancellation seen by the report of
            step k stops the batch here at step k+1 at the latest."""
            step_metric.observe(seconds)
            if not in_flight or in_flight[-1].done() or step == total:
                future = asyncio.run_coroutine_threadsafe(report(step, total), loop)
                future.add_done_callback(_log_report_error)
                in_flight.append(future)
            if len(cancelled) == len(started) and step < total:
                raise BatchCancelled

        self._state = "running"
        metrics.IN_FLIGHT.labels(self.model).inc(len(started))
        keeper = asyncio.create_task(self._keep_claimed(started))
        t0 = time.perf_counter()
        try:
            arrays = await self.offload(self.runner.run, requests, width=first.width, height=first.height,
                                        steps=first.steps, guidance=first.guidance, on_step=on_step)
        except BatchCancelled:
            log.info("batch of %d job(s) aborted: all cancelled", len(started))
            for claim in started:
                await self.queue.mark_cancelled(claim)
                metrics.JOBS.labels(self.model, "cancelled").inc()
                await self.queue.ack(claim)
            return
        except Exception as err:
            log.exception("batch of %d job(s) failed", len(started))
            message = f"inference failed: {type(err).__name__}: {err}"
            for claim in started:
                await self.queue.fail(claim, "inference_error", message)
                metrics.FAILURES.labels(self.model, "inference_error").inc()
                metrics.JOBS.labels(self.model, "failed").inc()
                await self.queue.ack(claim)
            return
        finally:
            keeper.cancel()
            metrics.IN_FLIGHT.labels(self.model).dec(len(started))
            self._state = "idle"
            self.batches_run += 1
        inference_s = time.perf_counter() - t0
        metrics.INFERENCE.labels(self.model).observe(inference_s)
        metrics.BATCH_SIZE.labels(self.model).observe(len(requests))
        self._record_memory()
        await self.queue.record_speed(self.model, inference_s / len(requests))
        pngs = await asyncio.to_thread(lambda: [encode_png(a) for a in arrays])
        info = {"batch_size": len(requests), "inference_s": round(inference_s, 4), "worker": self.consumer}
        results, offset = [], 0
        for claim in started:
            n = claim.job.params.n
            results.append((claim, pngs[offset:offset + n], info))
            offset += n
        outcomes = await self._store(results)
        if outcomes is None:
            return  # Redis stayed down: the entries stay pending and will be reclaimed
        await self.queue.ack_many(started)
        for claim, outcome in zip(started, outcomes, strict=True):
            metrics.JOBS.labels(self.model, outcome if outcome in ("succeeded", "cancelled") else "duplicate").inc()
            if outcome == "succeeded":
                metrics.JOB_LATENCY.labels(self.model).observe(max(0.0, time.time() - claim.job.created_at))
            elif outcome != "cancelled":
                log.info("job %s already %s elsewhere; discarded this attempt's result", claim.job.id, outcome)

    async def _store(self, results: list[tuple[Claim, list[bytes], dict[str, Any]]]) -> list[str] | None:
        """Store a batch's results, retrying while Redis is down for up to the visibility timeout."""
        deadline = time.monotonic() + self.settings.visibility_timeout_s
        backoff = 0.2
        while True:
            try:
                return await self.queue.complete_many(results)
            except RedisError as err:
                if time.monotonic() > deadline:
                    log.error("could not store %d job(s) (%s); leaving them for another attempt", len(results), err)
                    return None
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    def _record_memory(self) -> None:
        device = str(self.runner.device)
        if device.startswith("cuda"):
            import torch

            value = float(torch.cuda.max_memory_allocated(device))
        else:
            value = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * (1 if sys.platform == "darwin"
                                                                                 else 1024)
        metrics.DEVICE_MEMORY.labels(self.model, device).set(value)


def run_worker(settings: Settings, model: str, *, metrics_port: int | None = None) -> int:
    """Entry point of `spo worker`: load the model, then serve until SIGTERM/SIGINT (graceful drain)."""
    from service.contracts.manifest import load_manifest
    from service.contracts.queue import connect
    from service.worker.model_runner import ModelRunner

    if not settings.redis_url:
        raise SystemExit("spo worker needs SPO_REDIS_URL (or --redis-url); `spo serve` starts a Redis for you")
    spec = load_manifest(settings.manifest).get(model)
    runner = ModelRunner(spec, device=settings.device, threads=settings.torch_threads).load()
    runner.warmup(max_images=settings.max_batch)
    metrics.initialise_worker(spec.name, spec.backend)  # before the port opens: no scrape sees them missing
    if metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(metrics_port)
        log.info("worker metrics on :%d/metrics", metrics_port)

    url = settings.redis_url
    calls = MainThreadCalls()
    state: dict[str, Any] = {"worker": None, "signals": 0, "error": None}
    done = threading.Event()

    async def main() -> None:
        redis = connect(url, socket_timeout=10.0)
        queue = JobQueue(redis, settings.key_prefix, job_ttl_s=settings.job_ttl_s,
                         max_length=settings.queue_max_length)
        worker = state["worker"] = Worker(queue, runner, settings, offload=calls.offload)
        if state["signals"]:  # a signal came before the worker existed
            worker.request_stop()
        try:
            await worker.run()
        finally:
            await redis.aclose()

    def loop_thread() -> None:
        try:
            asyncio.run(main())
        except BaseException as err:  # re-raised on the main thread below
            state["error"] = err
        finally:
            done.set()

    def on_signal(signum: int, _frame: Any) -> None:  # runs on the main thread between two bytecodes: no logging
        state["signals"] += 1
        if state["signals"] > 1:
            os.write(2, f"second {signal.Signals(signum).name}: exiting without draining\n".encode())
            os._exit(1)
        if state["worker"] is not None:
            state["worker"].request_stop(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    # A daemon: if the main thread ever leaves `serve` on an exception, the process exits instead of waiting for a
    # loop that awaits a call nobody runs (its claimed entries stay pending and are reclaimed elsewhere).
    thread = threading.Thread(target=loop_thread, name="spo-worker-loop", daemon=True)
    thread.start()
    calls.serve(done)  # the pipeline runs here, on the main thread
    thread.join()
    if state["error"] is not None:
        raise state["error"]
    return 0
