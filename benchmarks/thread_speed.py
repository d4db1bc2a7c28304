"""The same pipeline call on a process's main thread and on another thread of it, side by side, in one run.

    python benchmarks/thread_speed.py [--model models/spo-tiny] [--repeats 7]

Why the worker runs inference on its main thread: on the CPU, torch's OpenMP thread team serves a small UNet's many
short parallel regions much more slowly when the call comes from a thread other than the one that started it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from service.worker.pipeline import generate, load_pipeline  # noqa: E402
from service.worker.runner import ImageRequest  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "spo-tiny"))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    pipe = load_pipeline(args.model)

    @torch.inference_mode()  # as ModelRunner.run
    def call() -> float:
        started = time.perf_counter()
        generate(pipe, [ImageRequest("a red circle on a blue background", 1)], steps=args.steps, guidance=5.0,
                 width=64, height=64)
        return time.perf_counter() - started

    call()  # warm-up
    # In blocks, not interleaved: a call from another thread disturbs the main thread's next calls.
    main_thread = [call() for _ in range(args.repeats)]
    other_thread: list[float] = []
    worker = threading.Thread(target=lambda: other_thread.extend(call() for _ in range(args.repeats)))
    worker.start()
    worker.join()
    main_again = [call() for _ in range(args.repeats)]
    print(f"main thread again after the other thread's calls: p50 {statistics.median(main_again):.3f} s")
    a, b = statistics.median(main_thread), statistics.median(other_thread)
    print(f"one image, {args.steps} steps: main thread p50 {a:.3f} s | another thread p50 {b:.3f} s | "
          f"ratio {b / a:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
