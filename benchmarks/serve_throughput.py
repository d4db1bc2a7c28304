"""Serving throughput and latency against the in-process ceiling, side by side, in one run.

    python benchmarks/serve_throughput.py                      # spo-tiny from models/models.yaml, 20 steps
    python benchmarks/serve_throughput.py --quick              # the developers' check: fewer requests and rows
    python benchmarks/serve_throughput.py --profile            # also a py-spy flame graph of the worker under load

Rows:
  in-process  the same pipeline call (ModelRunner.run) on this process's main thread with no server running: one
              image per call, and `--max-batch` images per call (the most a worker batch holds). These are the
              ceiling: a serving stack can only add to them. Measured first and again last; the ratios use the
              faster of the two, and a gap between them means the machine was busy with something else.
  service     `spo serve` (API + Redis queue + batching worker) via POST /v1/images/generations, closed loops of
              1, 16 and 32 clients (each sends its next request when its last one returns)
  naive       a FastAPI server that calls the pipeline per request in a thread (the diffusers example-server
              pattern: a `from_pipe` copy with its own scheduler per request, in the default executor), 1 and 16

It prints images/s, p50 and p99 latency and the ratios: service at 1 client against the in-process call, service at
16 clients against the in-process batch rate and against the naive server. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = ["a red circle on a blue background", "a green square on a yellow background",
           "a blue triangle on a white background", "a yellow star on a black background"]


@dataclass
class Row:
    setup: str
    concurrency: int
    latencies: list[float]
    wall_s: float
    images: int = 0  # 0: one image per latency
    mean_batch: float = float("nan")  # images per pipeline call in the worker during this row (service rows)

    @property
    def images_per_s(self) -> float:
        return (self.images or len(self.latencies)) / self.wall_s

    @property
    def p50(self) -> float:
        return float(np.percentile(self.latencies, 50))

    @property
    def p99(self) -> float:
        return float(np.percentile(self.latencies, 99))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{url} not ready after {timeout}s")


def closed_loop(send, concurrency: int, total: int) -> tuple[list[float], float]:
    """`concurrency` threads share `total` requests; returns per-request latencies and the wall time."""
    latencies: list[float] = []
    lock = threading.Lock()
    counter = iter(range(total))

    def client() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            started = time.perf_counter()
            send(i)
            elapsed = time.perf_counter() - started
            with lock:
                latencies.append(elapsed)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, time.perf_counter() - started


def bench_in_process(runner, steps: int, calls: int, batch: int, label: str) -> Row:
    """`calls` sequential pipeline calls of `batch` images each, on this (the main) thread, as the worker runs them.
    Latency is per call; images/s counts every image."""
    from service.worker.runner import ImageRequest

    width, height = (int(v) for v in runner.spec.defaults.size.split("x"))
    latencies = []
    started = time.perf_counter()
    for i in range(calls):
        requests = [ImageRequest(PROMPTS[(i + j) % 4], 1000 + i * batch + j) for j in range(batch)]
        t0 = time.perf_counter()
        runner.run(requests, width=width, height=height, steps=steps, guidance=5.0)
        latencies.append(time.perf_counter() - t0)
    wall = time.perf_counter() - started
    return Row(f"in-process, {batch} image(s)/call {label}".rstrip(), 1, latencies, wall, images=calls * batch)


def http_sender(url: str, body_of):
    import httpx

    local = threading.local()

    def send(i: int) -> None:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=600)
        response = local.client.post(url, json=body_of(i))
        response.raise_for_status()
        base64.b64decode(response.json()["data"][0]["b64_json"])

    return send


def bench_http(name: str, url: str, body_of, concurrencies: list[int], total: int) -> list[Row]:
    send = http_sender(url, body_of)
    closed_loop(send, 2, 2)  # warm-up: connections, first requests
    rows = []
    for concurrency in concurrencies:
        latencies, wall = closed_loop(send, concurrency, max(total, concurrency * 2))
        rows.append(Row(name, concurrency, latencies, wall))
        print(f"  {name} @ {concurrency}: {rows[-1].images_per_s:.2f} images/s", flush=True)
    return rows


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def bench_service(manifest: Path, model: str, steps: int, total: int, max_batch: int, max_wait_ms: int,
                  concurrencies: list[int], log_dir: Path, threads: int | None, profile_s: float = 0.0) -> list[Row]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "SPO_REDIS_URL"}  # embedded Redis, like a newcomer's run
    cmd = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--manifest", str(manifest),
           "--model", model, "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms)]
    if threads:
        cmd += ["--torch-threads", str(threads)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=(log_dir / "serve.log").open("w"),
                            stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", proc)

        def body(i: int) -> dict:
            return {"model": model, "prompt": PROMPTS[i % 4], "seed": 1000 + i, "num_inference_steps": steps,
                    "guidance_scale": 5.0}

        url = f"http://127.0.0.1:{port}/v1/images/generations"
        rows = []
        for concurrency in concurrencies:
            before = batch_totals(f"http://127.0.0.1:{port}/metrics")
            row = bench_http("service (spo serve)", url, body, [concurrency], total)[0]
            after = batch_totals(f"http://127.0.0.1:{port}/metrics")
            row.mean_batch = (after[0] - before[0]) / max(after[1] - before[1], 1.0)
            rows.append(row)
        if profile_s:
            profile_worker(proc.pid, url, body, profile_s, log_dir / "worker_flame.svg")
        return rows
    finally:
        stop(proc)


def profile_worker(serve_pid: int, url: str, body_of, seconds: float, out: Path) -> None:
    """A py-spy flame graph of `spo serve`'s worker process while 16 clients keep it busy."""
    children = Path(f"/proc/{serve_pid}/task/{serve_pid}/children").read_text().split()
    worker = next(pid for pid in children if b"worker" in Path(f"/proc/{pid}/cmdline").read_bytes())
    spy = subprocess.Popen(["py-spy", "record", "--pid", worker, "--duration", str(int(seconds)), "--rate", "50",
                            "--threads", "--format", "flamegraph", "--output", str(out), "--nonblocking"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    send = http_sender(url, body_of)
    deadline = time.monotonic() + seconds + 2
    while spy.poll() is None and time.monotonic() < deadline + 30:
        closed_loop(send, 16, 32)
    spy.wait(60)
    print(f"  worker flame graph: {out}", flush=True)


def bench_naive(model_dir: str, steps: int, total: int, concurrencies: list[int], log_dir: Path,
                threads: int | None) -> list[Row]:
    port = free_port()
    cmd = [sys.executable, __file__, "--naive-server", "--port", str(port), "--model-dir", model_dir]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=(log_dir / "naive.log").open("w"), stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc)

        def body(i: int) -> dict:
            return {"prompt": PROMPTS[i % 4], "seed": 1000 + i, "steps": steps}

        return bench_http("naive FastAPI + thread", f"http://127.0.0.1:{port}/generate", body, concurrencies, total)
    finally:
        stop(proc)


def naive_server(model_dir: str, port: int, threads: int | None) -> None:
    """The baseline: one shared pipeline, each request runs its own pipeline call in a worker thread."""
    import asyncio
    import io

    import torch
    import uvicorn
    from fastapi import FastAPI

    from service.worker.pipeline import load_pipeline

    if threads:
        torch.set_num_threads(threads)
    shared = load_pipeline(model_dir)
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict:
        return {"ok": True}

    @app.post("/generate")
    async def generate(body: dict) -> dict:
        def run() -> bytes:
            scheduler = shared.scheduler.from_config(shared.scheduler.config)
            pipe = type(shared).from_pipe(shared, scheduler=scheduler)
            image = pipe(prompt=body["prompt"], num_inference_steps=body["steps"], guidance_scale=5.0,
                         generator=torch.Generator().manual_seed(body["seed"]), output_type="pil").images[0]
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            return buf.getvalue()

        png = await asyncio.get_running_loop().run_in_executor(None, run)
        return {"data": [{"b64_json": base64.b64encode(png).decode()}]}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def batch_totals(metrics_url: str) -> tuple[float, float]:
    """(images, pipeline calls) so far, from the worker's `spo_batch_size` histogram on the API's /metrics."""
    import httpx

    total = calls = 0.0
    for line in httpx.get(metrics_url, timeout=10).text.splitlines():
        if line.startswith("spo_batch_size_sum"):
            total += float(line.split()[-1])
        elif line.startswith("spo_batch_size_count"):
            calls += float(line.split()[-1])
    return total, calls


def print_table(rows: list[Row], bare: Row) -> None:
    header = f"| {'setup':<40} | {'clients':>7} | {'images':>6} | {'images/s':>8} | {'p50 s':>7} | {'p99 s':>7} " \
             f"| {'vs batch':>8} | {'mean batch':>10} |"
    print(header)
    print("|" + "|".join("-" * (len(cell) + 0) for cell in header.split("|")[1:-1]) + "|")
    for r in rows:
        print(f"| {r.setup:<40} | {r.concurrency:>7} | {r.images or len(r.latencies):>6} | {r.images_per_s:>8.2f} | "
              f"{r.p50:>7.3f} | {r.p99:>7.3f} | {r.images_per_s / bare.images_per_s:>7.2f}x | "
              f"{'' if r.mean_batch != r.mean_batch else f'{r.mean_batch:.1f}':>10} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=ROOT / "models" / "models.yaml")
    parser.add_argument("--model", default="spo-tiny", help="model name in the manifest")
    parser.add_argument("--model-dir", default=None, help="use this diffusers folder instead of the manifest's")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--requests", type=int, default=48, help="requests per row (at least 2 x clients)")
    parser.add_argument("--max-batch", type=int, default=8, help="the worker's SPO_MAX_BATCH (its default)")
    parser.add_argument("--max-wait-ms", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads everywhere (e.g. 1 when pinned to one core with taskset)")
    parser.add_argument("--quick", action="store_true", help="fewer requests and rows (the developers' check)")
    parser.add_argument("--profile", action="store_true", help="py-spy flame graph of the worker at 16 clients")
    parser.add_argument("--naive-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.naive_server:
        naive_server(args.model_dir, args.port, args.threads)
        return 0

    import yaml

    from service.contracts.manifest import load_manifest

    work = Path(tempfile.mkdtemp(prefix="spo-bench-"))
    manifest_path = args.manifest
    if args.model_dir:
        manifest_path = work / "models.yaml"
        entry = {"name": args.model, "kind": "sd15", "base": str(Path(args.model_dir).resolve()), "sizes": ["64x64"],
                 "defaults": {"steps": args.steps, "guidance": 5.0, "size": "64x64"}, "max_n": 16, "max_steps": 200}
        manifest_path.write_text(yaml.safe_dump({"models": [entry]}))
    spec = load_manifest(manifest_path).get(args.model)
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    print(f"model {spec.name} ({spec.base}), {args.steps} steps, {args.requests} requests per row, "
          f"max_batch {args.max_batch}, max_wait_ms {args.max_wait_ms}, torch threads {args.threads or 'default'}, "
          f"CPUs {cpus}; logs in {work}", flush=True)

    from service.worker.model_runner import ModelRunner

    runner = ModelRunner(spec, threads=args.threads).load()
    runner.warmup(max_images=args.max_batch)
    calls = 4 if args.quick else 12
    in_first = [bench_in_process(runner, args.steps, calls * 2, 1, ""),
                bench_in_process(runner, args.steps, calls, args.max_batch, "")]
    print(f"  in-process: {in_first[0].p50:.3f} s per image, {in_first[1].images_per_s:.2f} images/s at batch "
          f"{args.max_batch}", flush=True)
    del runner  # nothing of it runs while the servers are measured
    clients = [1, 16] if args.quick else [1, 16, 32]
    service = bench_service(manifest_path, args.model, args.steps, args.requests, args.max_batch, args.max_wait_ms,
                            clients, work, args.threads, profile_s=20.0 if args.profile else 0.0)
    naive = bench_naive(spec.base, args.steps, args.requests, [16] if args.quick else [1, 16], work, args.threads)
    runner = ModelRunner(spec, threads=args.threads).load()
    runner.warmup(max_images=args.max_batch)
    in_last = [bench_in_process(runner, args.steps, calls * 2, 1, "(again at end)"),
               bench_in_process(runner, args.steps, calls, args.max_batch, "(again at end)")]
    single = min(in_first[0], in_last[0], key=lambda r: r.p50)  # the ratios use the faster measurement
    batched = max(in_first[1], in_last[1], key=lambda r: r.images_per_s)

    rows = [*in_first, *service, *naive, *in_last]
    print()
    print_table(rows, batched)
    s1 = service[0]
    s16 = next(r for r in service if r.concurrency == 16)
    n16 = next(r for r in naive if r.concurrency == 16)
    ratios = {
        "service@1 p50 / in-process call p50 (target <= 1.10)": s1.p50 / single.p50,
        f"service@16 / in-process batch-{args.max_batch} images/s (target >= 0.85)":
            s16.images_per_s / batched.images_per_s,
        "service@16 / naive@16 images/s (target >= 3)": s16.images_per_s / n16.images_per_s,
        "service@16 p99 / naive@16 p99 (target < 1)": s16.p99 / n16.p99,
        f"service@16 mean batch (images per pipeline call, max {args.max_batch})": s16.mean_batch,
    }
    print()
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}")
    (work / "result.json").write_text(json.dumps(
        {"rows": [{"setup": r.setup, "clients": r.concurrency, "images_per_s": r.images_per_s, "p50": r.p50,
                   "p99": r.p99, "mean_batch": r.mean_batch} for r in rows], "ratios": ratios}, indent=1))
    print(f"results: {work / 'result.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
