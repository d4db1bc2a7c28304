"""Prometheus metrics, all prefixed `spo_`.

When several processes serve (`spo serve` runs the API and a worker), set `PROMETHEUS_MULTIPROC_DIR` to a shared
empty folder before they start; `/metrics` on the API then aggregates every process (prometheus-client's multiprocess
mode). A standalone `spo worker --metrics-port` exposes its own.

Metric                                 type       labels                      exported by
spo_requests_total                     counter    endpoint, method, status    API
spo_request_duration_seconds           histogram  endpoint, method            API   (HTTP request latency)
spo_job_latency_seconds                histogram  model                       worker (submit -> result stored)
spo_queue_wait_seconds                 histogram  model                       worker (submit -> batch start)
spo_inference_seconds                  histogram  model                       worker (one pipeline call)
spo_unet_step_seconds                  histogram  model, backend              worker (one denoising step of a batch)
spo_batch_size                         histogram  model                       worker (images per pipeline call)
spo_jobs_total                         counter    model, status               worker (jobs finished, by outcome)
spo_job_failures_total                 counter    model, reason               worker
spo_jobs_in_flight                     gauge      model                       worker
spo_device_memory_bytes                gauge      model, device               worker (CUDA allocated, or CPU RSS)
spo_queue_depth                        gauge      model                       API, at scrape time
spo_workers_alive                      gauge      model                       API, at scrape time
spo_worker_heartbeat_age_seconds       gauge      model, worker               API, at scrape time (the workers in
                                                                                 P:workers now: a pruned one is gone)
spo_redis_up                           gauge      (none)                      API, at scrape time (1 ok, 0 down)

Every series whose labels are known up front exists from the start, at 0: a worker creates its model's outcomes,
failure reasons, histograms and gauges when it starts (`initialise_worker`), the API each route's request counters
for the statuses it can answer (`initialise_api`). Without that a counter appears only with its first event, so a
dashboard panel says "No data" and `rate()` cannot see the first failures (its first sample already holds them).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# Generations take from tens of milliseconds (tiny model, GPU) to minutes (big batch, CPU).
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0,
                   120.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

REQUESTS = Counter("spo_requests_total", "HTTP requests by route template and status code.",
                   ["endpoint", "method", "status"])
REQUEST_DURATION = Histogram("spo_request_duration_seconds", "HTTP request latency (sync generations included).",
                             ["endpoint", "method"], buckets=LATENCY_BUCKETS)
JOB_LATENCY = Histogram("spo_job_latency_seconds", "Job end-to-end: submission to result stored.", ["model"],
                        buckets=LATENCY_BUCKETS)
QUEUE_WAIT = Histogram("spo_queue_wait_seconds", "Submission to start of the job's batch.", ["model"],
                       buckets=LATENCY_BUCKETS)
INFERENCE = Histogram("spo_inference_seconds", "One batched pipeline call.", ["model"], buckets=LATENCY_BUCKETS)
UNET_STEP = Histogram("spo_unet_step_seconds", "One denoising step (UNet + scheduler) of a whole batch.",
                      ["model", "backend"], buckets=STEP_BUCKETS)
BATCH_SIZE = Histogram("spo_batch_size", "Images per pipeline call.", ["model"], buckets=BATCH_BUCKETS)
JOBS = Counter("spo_jobs_total", "Jobs finished by a worker, by outcome.", ["model", "status"])
FAILURES = Counter("spo_job_failures_total", "Failed jobs by reason.", ["model", "reason"])
IN_FLIGHT = Gauge("spo_jobs_in_flight", "Jobs in the batch a worker is running.", ["model"],
                  multiprocess_mode="livesum")
DEVICE_MEMORY = Gauge("spo_device_memory_bytes", "Peak memory of the worker's device (CUDA) or process (CPU RSS).",
                      ["model", "device"], multiprocess_mode="livemax")
QUEUE_DEPTH = Gauge("spo_queue_depth", "Jobs queued or running for a model.", ["model"],
                    multiprocess_mode="mostrecent")
WORKERS_ALIVE = Gauge("spo_workers_alive", "Workers whose heartbeat is fresh.", ["model"],
                      multiprocess_mode="mostrecent")


class HeartbeatAges(Collector):
    """spo_worker_heartbeat_age_seconds: the snapshot the last scrape read from Redis, replaced whole each time. A
    labelled Gauge would keep exporting every worker it ever saw (also in multiprocess mode, from its files), so a
    dead worker's series would never leave."""

    def __init__(self) -> None:
        self.ages: dict[tuple[str, str], float] = {}

    def set_model(self, model: str, ages: dict[str, float]) -> None:
        self.ages = {key: age for key, age in self.ages.items() if key[0] != model}
        self.ages.update({(model, worker): age for worker, age in ages.items()})

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("spo_worker_heartbeat_age_seconds", "Seconds since each worker's last heartbeat.",
                                   labels=["model", "worker"])
        for (model, worker), age in sorted(self.ages.items()):
            family.add_metric([model, worker], age)
        yield family


HEARTBEAT_AGE = HeartbeatAges()
REGISTRY.register(HEARTBEAT_AGE)
_redis_up: Gauge | None = None

# The label values the service emits, so they can be created at 0 (the worker loop uses exactly these).
JOB_STATUSES = ("succeeded", "failed", "cancelled", "duplicate")
FAILURE_REASONS = ("attempts_exhausted", "inference_error")
# Statuses any route may answer (docs/architecture.md, errors) besides its own success status.
ERROR_STATUSES = ("400", "401", "403", "404", "409", "422", "429", "500", "503", "504")


def initialise_worker(model: str, backend: str) -> None:
    """Create a worker's series at 0 before its first job (see the module docstring)."""
    for status in JOB_STATUSES:
        JOBS.labels(model, status)
    for reason in FAILURE_REASONS:
        FAILURES.labels(model, reason)
    for histogram in (JOB_LATENCY, QUEUE_WAIT, INFERENCE, BATCH_SIZE):
        histogram.labels(model)
    UNET_STEP.labels(model, backend)
    IN_FLIGHT.labels(model).set(0)


def initialise_api(routes: Iterable[tuple[str, str, int]]) -> None:
    """Create the request series at 0 for each (route template, method, success status) and every error status."""
    for endpoint, method, success in routes:
        for status in (str(success), *ERROR_STATUSES):
            REQUESTS.labels(endpoint, method, status)
        REQUEST_DURATION.labels(endpoint, method)


def redis_up() -> Gauge:
    """spo_redis_up: without it a Redis outage is invisible (the queue gauges keep their last values). Created on
    first use, by the API's /metrics, so that workers do not export its default 0, which would read as an outage."""
    global _redis_up
    if _redis_up is None:
        _redis_up = Gauge("spo_redis_up", "1 when the API reached Redis at the last scrape, else 0.",
                          multiprocess_mode="mostrecent")
    return _redis_up


def render() -> tuple[bytes, str]:
    """The exposition text for /metrics: every process's metrics in multiprocess mode, else this process's."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        registry.register(HEARTBEAT_AGE)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def mark_process_dead(pid: int) -> None:
    """Drop a finished process's live gauges (multiprocess mode only)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
