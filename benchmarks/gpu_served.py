"""The served models on a GPU, end to end: `torch` vs `compile` backend images/s and image parity, one run.

For the device tool. Loads spo-tiny (SD 1.5 architecture) and spo-tiny-xl (SDXL) from models/models.yaml through
`ModelRunner` exactly as the worker does, moved to CUDA, and generates the same batch with each backend: images/s
(median of interleaved calls after a warm-up round that pays the compiles), the mean absolute difference of the
compiled backend's images from eager's, and what starting the `onnxruntime` backend on CUDA says where onnxruntime
has no CUDA provider (it must refuse clearly, not fall back to the CPU). Writes JSON to $OUT/gpu_served.json.

    python benchmarks/gpu_served.py [--models spo-tiny,spo-tiny-xl] [--images 8] [--compile-mode default]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.contracts.manifest import load_manifest  # noqa: E402
from service.contracts.sizes import parse_size  # noqa: E402
from service.worker.model_runner import ModelRunner  # noqa: E402
from service.worker.runner import ImageRequest  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="spo-tiny,spo-tiny-xl")
    parser.add_argument("--images", type=int, default=8, help="images per pipeline call (UNet batch 2x with CFG)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile-mode", default="default",
                        help="SPO_COMPILE_MODE for the compile backend")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script, timings not worth reading")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_served.json"))
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu_served.py needs a CUDA GPU (or --device cpu for a dry run)")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    os.environ["SPO_COMPILE_MODE"] = args.compile_mode
    manifest = load_manifest(ROOT / "models" / "models.yaml")
    results = []
    for name in args.models.split(","):
        spec = manifest.get(name)
        width, height = parse_size(spec.defaults.size)
        requests = [ImageRequest("a red circle on a blue background", seed) for seed in range(args.images)]
        row: dict = {"model": name, "kind": spec.kind, "size": spec.defaults.size, "images": args.images,
                     "steps": args.steps, "gpu": torch.cuda.get_device_name() if cuda else "cpu",
                     "compile_mode": args.compile_mode}
        runners = {}
        for backend in ("torch", "compile"):
            start = time.perf_counter()
            runners[backend] = ModelRunner(spec.model_copy(update={"backend": backend}), device=args.device).load()
            runners[backend].warmup()
            sync()
            row[f"{backend}_load_warmup_s"] = time.perf_counter() - start
        try:
            ModelRunner(spec.model_copy(update={"backend": "onnxruntime"}), device=args.device).load()
            row["onnxruntime_cuda"] = "loaded"
        except Exception as err:  # the point: what a worker start says
            row["onnxruntime_cuda"] = f"{type(err).__name__}: {err}"
        seconds: dict[str, list[float]] = {b: [] for b in runners}
        images: dict[str, list[np.ndarray]] = {}
        for repeat in range(args.repeats + 1):  # round 0 warms up (and pays compile's recompile for this batch)
            for backend, runner in runners.items():
                sync()
                start = time.perf_counter()
                images[backend] = runner.run(requests, width=width, height=height, steps=args.steps,
                                             guidance=spec.defaults.guidance)
                sync()
                if repeat == 0:
                    row[f"{backend}_first_call_s"] = time.perf_counter() - start
                else:
                    seconds[backend].append(time.perf_counter() - start)
        for backend in runners:
            row[f"{backend}_img_s"] = args.images / statistics.median(seconds[backend])
        row["speedup"] = row["compile_img_s"] / row["torch_img_s"]
        diff = [np.abs(a.astype(np.float32) - b.astype(np.float32)).mean() / 255
                for a, b in zip(images["torch"], images["compile"], strict=True)]
        row["compile_vs_torch_mean_abs"] = float(np.mean(diff))
        row["compile_vs_torch_max_image_mean_abs"] = float(np.max(diff))
        results.append(row)
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(f"{name} ({spec.kind}, {spec.defaults.size}, {args.images} images x {args.steps} steps, "
              f"{row['gpu']}): torch {row['torch_img_s']:.1f} img/s | compile[{args.compile_mode}] "
              f"{row['compile_img_s']:.1f} img/s ({row['speedup']:.2f}x) | images differ by "
              f"{row['compile_vs_torch_mean_abs'] * 255:.3f}/255 mean abs | onnxruntime on CUDA: "
              f"{row['onnxruntime_cuda']}", flush=True)
        del runners
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
