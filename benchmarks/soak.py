"""Soak: C closed-loop clients against `spo serve` for M minutes; what drifts over time.

    python benchmarks/soak.py --clients 16 --minutes 10 --out benchmarks/results/soak-cpu-DATE
    python benchmarks/soak.py --clients 4 --minutes 1                  # a quick look

It starts `spo serve` on spo-tiny (API, one worker, a private Redis) unless `--url` and `--redis-url` point at a
running service. Every client sends POST /v1/images/generations, then its next request when the last one returns.
Every 5 s it samples the RSS of every process of the service (the serve/API process, each worker, redis-server) and
Redis' `used_memory` and key count. Per minute it reports requests, errors, p50 and p99 latency, the RSS of each
process and Redis' memory and keys at the minute's end; as a table (stdout and `table.md`), `soak.json` and a PNG
(`soak.png`: latency, RSS per process, Redis memory and keys). Flat RSS and Redis memory bounded by the job TTL are
what a healthy run shows: the service it starts keeps jobs `--job-ttl-s` (120 s, so keys level within the run; the
service default is 3600 s).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = ["a red circle on a blue background", "a green square on a yellow background",
           "a blue triangle on a white background", "a white square on a black background"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(port: int, log_path: Path, max_batch: int, job_ttl_s: int,
                  torch_threads: int | None) -> tuple[subprocess.Popen, str]:
    """`spo serve` with a private Redis on a TCP port of its own (so this script can read its memory)."""
    import redis

    redis_port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="spo-soak-redis-"))
    from service.embedded_redis import redis_server_binary

    redis_proc = subprocess.Popen([redis_server_binary(), "--port", str(redis_port), "--bind", "127.0.0.1",
                                   "--save", "", "--appendonly", "no", "--dir", str(workdir)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{redis_port}/0"
    deadline = time.monotonic() + 20
    while True:
        try:
            redis.Redis.from_url(url).ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    env = {**os.environ, "SPO_REDIS_URL": url, "SPO_MAX_BATCH": str(max_batch), "SPO_LOG_LEVEL": "WARNING",
           "SPO_JOB_TTL_S": str(job_ttl_s), **({"SPO_TORCH_THREADS": str(torch_threads)} if torch_threads else {})}
    serve = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port",
                              str(port)], env=env, cwd=ROOT, stdout=log_path.open("w"), stderr=subprocess.STDOUT,
                             start_new_session=True)
    serve.redis_proc = redis_proc  # type: ignore[attr-defined]
    return serve, url


def wait_ready(base: str, proc: subprocess.Popen | None, timeout: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"spo serve exited with {proc.returncode}")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError("service not ready")


def service_processes(serve_pid: int | None, redis_url: str) -> dict[str, int]:
    """name -> pid: the serve process (it runs the API), its workers, and the redis-server on the URL's port."""
    import psutil

    found: dict[str, int] = {}
    if serve_pid is not None:
        serve = psutil.Process(serve_pid)
        found["api (spo serve)"] = serve.pid
        for i, child in enumerate(c for c in serve.children(recursive=True) if "worker" in " ".join(c.cmdline())):
            found[f"worker {i}"] = child.pid
    port = redis_url.rsplit(":", 1)[-1].split("/")[0]
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "redis-server" in cmd and (f":{port}" in cmd or f"--port {port}" in cmd):
            found["redis-server"] = proc.pid
            break
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--job-ttl-s", type=int, default=120, help="SPO_JOB_TTL_S of the service it starts")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="SPO_TORCH_THREADS of its worker (1 on a machine busy with other work: torch's OpenMP "
                             "team degrades badly when one of its threads is descheduled)")
    parser.add_argument("--url", help="a running service (then --redis-url too); default: start spo serve")
    parser.add_argument("--redis-url")
    parser.add_argument("--out", type=Path, default=None, help="folder for soak.json, table.md, soak.png")
    args = parser.parse_args()

    import httpx
    import psutil
    import redis

    out = args.out or Path(tempfile.mkdtemp(prefix="spo-soak-"))
    out.mkdir(parents=True, exist_ok=True)
    serve = None
    if args.url:
        if not args.redis_url:
            parser.error("--url needs --redis-url (to read Redis memory)")
        base, redis_url = args.url.rstrip("/"), args.redis_url
    else:
        port = free_port()
        serve, redis_url = start_service(port, out / "serve.log", args.max_batch, args.job_ttl_s, args.torch_threads)
        base = f"http://127.0.0.1:{port}"
    store = redis.Redis.from_url(redis_url)
    try:
        wait_ready(base, serve)
        procs = service_processes(serve.pid if serve else None, redis_url)
        print(f"service at {base}; processes: {procs}", flush=True)
        stop = threading.Event()
        results: list[tuple[float, float, int]] = []  # (end time, latency, status)
        lock = threading.Lock()
        started = time.monotonic()
        ends_at = started + args.minutes * 60

        def client(i: int) -> None:
            with httpx.Client(base_url=base, timeout=600) as http:
                k = 0
                while not stop.is_set() and time.monotonic() < ends_at:
                    body = {"prompt": PROMPTS[(i + k) % len(PROMPTS)], "num_inference_steps": args.steps}
                    t0 = time.monotonic()
                    try:
                        status = http.post("/v1/images/generations", json=body).status_code
                    except httpx.TransportError:
                        status = 0
                    t1 = time.monotonic()
                    with lock:
                        results.append((t1 - started, t1 - t0, status))
                    k += 1

        samples: list[dict] = []

        def sample() -> None:
            while not stop.is_set():
                row: dict = {"t": time.monotonic() - started, "rss_mib": {}, "load1": os.getloadavg()[0]}
                for name, pid in procs.items():
                    try:
                        row["rss_mib"][name] = psutil.Process(pid).memory_info().rss / 2**20
                    except psutil.Error:
                        row["rss_mib"][name] = float("nan")
                try:
                    info = store.info("memory")
                    row["redis_used_mib"] = info["used_memory"] / 2**20
                    row["redis_keys"] = store.dbsize()
                except redis.RedisError:
                    row["redis_used_mib"], row["redis_keys"] = float("nan"), -1
                samples.append(row)
                stop.wait(5.0)

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stop.set()
        sampler.join(10)
    finally:
        store.close()
        if serve is not None:
            os.killpg(serve.pid, signal.SIGTERM)
            try:
                serve.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(serve.pid, signal.SIGKILL)
            serve.redis_proc.terminate()  # type: ignore[attr-defined]

    minutes = int(np.ceil(args.minutes))
    rows = []
    for m in range(minutes):
        lat = [lt for t, lt, s in results if m * 60 <= t < (m + 1) * 60 and s == 200]
        failed = [s for t, _, s in results if m * 60 <= t < (m + 1) * 60 and s != 200]
        errors = len(failed)
        at_end = [s for s in samples if s["t"] < (m + 1) * 60] or samples[:1]
        last = at_end[-1]
        rows.append({"minute": m + 1, "requests": len(lat) + errors, "errors": errors,
                     "p50_s": float(np.percentile(lat, 50)) if lat else float("nan"),
                     "p99_s": float(np.percentile(lat, 99)) if lat else float("nan"),
                     "error_statuses": {str(k): failed.count(k) for k in sorted(set(failed))},
                     "load1": round(last.get("load1", float("nan")), 1),
                     "rss_mib": {k: round(v, 1) for k, v in last["rss_mib"].items()},
                     "redis_used_mib": round(last["redis_used_mib"], 2), "redis_keys": last["redis_keys"]})
    names = list(procs)
    header = ["min", "requests", "errors", "p50 s", "p99 s", *[f"RSS {n} MiB" for n in names], "Redis MiB",
              "Redis keys", "load avg"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        errors = f"{r['errors']} {r['error_statuses']}" if r["errors"] else "0"
        cells = [r["minute"], r["requests"], errors, f"{r['p50_s']:.3f}", f"{r['p99_s']:.3f}",
                 *[f"{r['rss_mib'].get(n, float('nan')):.0f}" for n in names], f"{r['redis_used_mib']:.2f}",
                 r["redis_keys"], r["load1"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    table = "\n".join(lines)
    total_ok = sum(1 for _, _, s in results if s == 200)
    summary = (f"{args.clients} clients x {args.minutes:g} min, {args.steps} steps: {len(results)} requests, "
               f"{total_ok} ok, {len(results) - total_ok} errors, {total_ok / (args.minutes * 60):.2f} images/s")
    print(summary)
    print(table)
    (out / "table.md").write_text(summary + "\n\n" + table + "\n")
    (out / "soak.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                               "processes": procs, "minutes": rows, "samples": samples,
                                               "summary": summary}, indent=1))
    plot(rows, samples, names, out / "soak.png", summary)
    print(f"wrote {out}/table.md, soak.json, soak.png")
    return 0


def plot(rows: list[dict], samples: list[dict], names: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    minutes = [r["minute"] for r in rows]
    axes[0].plot(minutes, [r["p50_s"] for r in rows], marker="o", label="p50")
    axes[0].plot(minutes, [r["p99_s"] for r in rows], marker="o", label="p99")
    axes[0].set(xlabel="minute", ylabel="latency (s)", title="sync generation latency")
    axes[0].legend()
    t = [s["t"] / 60 for s in samples]
    for name in names:
        axes[1].plot(t, [s["rss_mib"].get(name, float("nan")) for s in samples], label=name)
    axes[1].set(xlabel="minute", ylabel="RSS (MiB)", title="RSS per process")
    axes[1].legend(fontsize=8)
    axes[2].plot(t, [s["redis_used_mib"] for s in samples], color="tab:red", label="used_memory (MiB)")
    axes[2].set(xlabel="minute", ylabel="MiB", title="Redis")
    twin = axes[2].twinx()
    twin.plot(t, [s["redis_keys"] for s in samples], color="tab:gray", label="keys")
    twin.set_ylabel("keys")
    axes[2].legend(loc="upper left", fontsize=8)
    twin.legend(loc="lower right", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    sys.exit(main())
