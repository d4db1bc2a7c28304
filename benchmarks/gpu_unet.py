"""UNet iterations/s on a GPU: eager vs torch.compile vs onnxruntime-gpu vs TensorRT (when importable), one run.

For the device tool (a machine with one NVIDIA GPU). Random weights, real architectures from diffusers configs:
SD 1.5 (64x64 latent = 512x512 images) and SDXL (128x128 latent = 1024x1024), fp16, UNet batch 2 (one image with
classifier-free guidance). Writes JSON to $OUT/gpu_unet.json (or --out) and prints a table.

    python benchmarks/gpu_unet.py [--only sd15] [--iters 50]

Anchor (stable-fast's published numbers, SD 1.5 512x512 on an H100): 54.5 it/s eager, 66 it/s torch.compile.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.architectures import SD15_UNET as SD15  # noqa: E402
from training.architectures import SDXL_UNET as SDXL  # noqa: E402


def its(fn, iters: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return iters / (time.perf_counter() - start)


def bench(name: str, config: dict, iters: int, compile_mode: str) -> dict:
    from diffusers import UNet2DConditionModel

    from service.artifacts import profile_for
    from service.backends.onnx_export import example_inputs, export_unet

    unet = UNet2DConditionModel(**config).to("cuda", torch.float16).eval()
    profile = profile_for(unet.config, [(config["sample_size"] * 8,) * 2], max_images=1, text_len=77)
    x = example_inputs(profile, 2, (config["sample_size"],) * 2, torch.float16, "cuda")
    added = {"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]} if profile.sdxl else None
    result = {"model": name, "params_m": sum(p.numel() for p in unet.parameters()) / 1e6, "batch": 2,
              "latent": config["sample_size"], "gpu": torch.cuda.get_device_name()}

    def eager():
        with torch.inference_mode():
            unet(x["sample"], x["timestep"], x["encoder_hidden_states"], added_cond_kwargs=added)

    result["eager_it_s"] = its(eager, iters)
    # A fresh dynamo cache per model: otherwise the second UNet counts as a recompile of the same forward and is
    # compiled with dynamic shapes (slow to build, and not what a worker serving one model does).
    torch._dynamo.reset()
    torch.cuda.reset_peak_memory_stats()
    compiled = torch.compile(unet, mode=compile_mode)
    result["compile_mode"] = compile_mode
    t0 = time.perf_counter()

    def comp():
        with torch.inference_mode():
            compiled(x["sample"], x["timestep"], x["encoder_hidden_states"], added_cond_kwargs=added)

    comp()
    result["compile_s"] = time.perf_counter() - t0
    result["compile_it_s"] = its(comp, iters)
    try:
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            from service.backends.ort import OrtUNet

            with tempfile.TemporaryDirectory() as d:
                path = export_unet(unet, Path(d) / "unet.onnx", profile, fp16=True)
                session = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider"])
                ort_unet = OrtUNet(session, unet, profile, torch.device("cuda"), path)
                result["onnxruntime_it_s"] = its(lambda: ort_unet(x["sample"], x["timestep"],
                                                                  x["encoder_hidden_states"], added_cond_kwargs=added),
                                                 iters)
        else:
            result["onnxruntime_it_s"] = None
            result["onnxruntime_note"] = "no CUDAExecutionProvider in this onnxruntime"
    except Exception as err:  # report, don't hide: the other numbers still count
        result["onnxruntime_error"] = repr(err)[:500]
    try:
        import tensorrt  # noqa: F401

        result["tensorrt_note"] = "tensorrt importable: run the worker with backend tensorrt to build an engine"
    except ImportError:
        result["tensorrt_it_s"] = None
        result["tensorrt_note"] = "tensorrt not importable on this machine"
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=["sd15", "sdxl"], default=None)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--compile-mode", default="default",
                        help="torch.compile mode (max-autotune-no-cudagraphs tunes GEMMs: minutes longer to compile)")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_unet.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu_unet.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    results = []
    for name, config in (("sd15", SD15), ("sdxl", SDXL)):
        if args.only in (None, name):
            results.append(bench(name, config, args.iters, args.compile_mode))
            Path(args.out).write_text(json.dumps(results, indent=2))  # after each model: a cut-off run keeps these
    for r in results:
        ort_its = r.get("onnxruntime_it_s")
        print(f"{r['model']}: eager {r['eager_it_s']:.1f} it/s | compile {r['compile_it_s']:.1f} it/s "
              f"({r['compile_it_s'] / r['eager_it_s']:.2f}x, {r['compile_s']:.0f} s to compile) | onnxruntime "
              f"{'n/a' if ort_its is None else f'{ort_its:.1f} it/s'} | {r['gpu']}")


if __name__ == "__main__":
    main()
