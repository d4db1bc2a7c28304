"""Serving throughput and latency, side by side, in one run.

    python benchmarks/serve_throughput.py                      # spo-tiny from models/models.yaml, 20 steps
    python benchmarks/serve_throughput.py --model-dir /tmp/smoke-model --requests 8 --steps 4   # quick check

Rows (each a closed loop: `concurrency` clients, each sends its next request when the last one returns):
  bare      the diffusers pipeline called sequentially in this process, one image per call (the floor to beat);
            measured first and again last, and the ratios use the faster of the two (a busy machine shows as a gap)
  service   `spo serve` (API + Redis queue + batching worker) via POST /v1/images/generations, at 1, 4 and 16 clients
  naive     a FastAPI server that calls the pipeline per request in a thread (the diffusers example-server pattern:
            a `from_pipe` copy with its own scheduler per request, run in the default executor), at 1 and 16 clients

It prints images/s, p50 and p99 latency, and the ratios the serving issue sets targets for. Run it on an otherwise
idle machine: the numbers are only comparable within one run.
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

    @property
    def images_per_s(self) -> float:
        return len(self.latencies) / self.wall_s

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


def bench_bare(spec, steps: int, total: int, threads: int | None) -> Row:
    from service.pipeline import ImageRequest
    from service.runner import ModelRunner

    width, height = (int(v) for v in spec.defaults.size.split("x"))
    runner = ModelRunner(spec, threads=threads).load()
    runner.run([ImageRequest(PROMPTS[0], 0)], width=width, height=height, steps=steps, guidance=5.0)  # warm-up

    def send(i: int) -> None:
        runner.run([ImageRequest(PROMPTS[i % 4], 1000 + i)], width=width, height=height, steps=steps, guidance=5.0)

    latencies, wall = closed_loop(send, 1, total)
    return Row("bare pipeline, sequential", 1, latencies, wall)


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
    closed_loop(send, 2, 4)  # warm-up
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
                  concurrencies: list[int], log_dir: Path, threads: int | None) -> list[Row]:
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

        return bench_http("service (spo serve)", f"http://127.0.0.1:{port}/v1/images/generations", body,
                          concurrencies, total)
    finally:
        stop(proc)


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

    from service.pipeline import load_pipeline

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


def print_table(rows: list[Row], bare: Row) -> None:
    header = f"| {'setup':<28} | {'clients':>7} | {'images':>6} | {'images/s':>8} | {'p50 s':>7} | {'p99 s':>7} " \
             f"| {'vs bare':>7} |"
    print(header)
    print("|" + "|".join("-" * (len(cell) + 0) for cell in header.split("|")[1:-1]) + "|")
    for r in rows:
        print(f"| {r.setup:<28} | {r.concurrency:>7} | {len(r.latencies):>6} | {r.images_per_s:>8.2f} | "
              f"{r.p50:>7.3f} | {r.p99:>7.3f} | {r.images_per_s / bare.images_per_s:>6.2f}x |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=ROOT / "models" / "models.yaml")
    parser.add_argument("--model", default="spo-tiny", help="model name in the manifest")
    parser.add_argument("--model-dir", default=None, help="use this diffusers folder instead of the manifest's")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--requests", type=int, default=48, help="requests per row (at least 2 x clients)")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads everywhere (e.g. 1 when pinned to one core with taskset)")
    parser.add_argument("--naive-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.naive_server:
        naive_server(args.model_dir, args.port, args.threads)
        return 0

    import yaml

    from service.manifest import load_manifest

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

    bare_first = bench_bare(spec, args.steps, max(8, args.requests // 3), args.threads)
    print(f"  bare: {bare_first.images_per_s:.2f} images/s", flush=True)
    service = bench_service(manifest_path, args.model, args.steps, args.requests, args.max_batch, args.max_wait_ms,
                            [1, 4, 16], work, args.threads)
    naive = bench_naive(spec.base, args.steps, args.requests, [1, 16], work, args.threads)
    # Bare again at the end: if the two bare rows differ, the machine was busy with something else meanwhile.
    bare_last = bench_bare(spec, args.steps, max(8, args.requests // 3), args.threads)
    bare_last.setup = "bare pipeline, again at end"
    bare = max(bare_first, bare_last, key=lambda r: r.images_per_s)  # the ratios use the faster bare row

    rows = [bare_first, *service, *naive, bare_last]
    print()
    print_table(rows, bare)
    s1, s16 = service[0], service[-1]
    n16 = naive[-1]
    ratios = {
        "service@16 / bare images/s (target >= 3.0)": s16.images_per_s / bare.images_per_s,
        "service@16 / naive@16 images/s (target >= 2.5)": s16.images_per_s / n16.images_per_s,
        "service@16 p99 / naive@16 p99 (target < 1)": s16.p99 / n16.p99,
        "service@1 p50 / bare p50 (target <= 1.15)": s1.p50 / bare.p50,
    }
    print()
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}")
    (work / "result.json").write_text(json.dumps(
        {"rows": [{"setup": r.setup, "clients": r.concurrency, "images_per_s": r.images_per_s, "p50": r.p50,
                   "p99": r.p99} for r in rows], "ratios": ratios}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
