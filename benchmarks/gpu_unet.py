"""UNet iterations/s on a GPU: eager vs torch.compile vs onnxruntime-gpu vs TensorRT (when importable), one run.

For the device tool (a machine with one NVIDIA GPU). Random weights, real architectures from diffusers configs:
SD 1.5 (64x64 latent = 512x512 images) and SDXL (128x128 latent = 1024x1024), fp16, UNet batch 2 (one image with
classifier-free guidance). Rows: eager (NCHW), eager channels_last, and torch.compile in each `--compile-modes` mode
(channels_last, as the `compile` backend runs it); `--vae` adds the VAE decoder (one 512² / 1024² image), eager vs
compiled, since at 1024² it is a real share of an SDXL image's latency. Writes JSON to $OUT/gpu_unet.json (or --out)
after every measurement, so a run cut off by its time limit keeps what finished, and prints a table.

    python benchmarks/gpu_unet.py [--only sd15] [--iters 50] [--compile-modes default,max-autotune-no-cudagraphs]

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
from training.architectures import SD_VAE  # noqa: E402
from training.architectures import SDXL_UNET as SDXL  # noqa: E402

DEVICE = "cuda"
DTYPE = torch.float16


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def its(fn, iters: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return iters / (time.perf_counter() - start)


def compiled_its(module: torch.nn.Module, call, iters: int, mode: str) -> tuple[float, float]:
    """(seconds to compile, it/s) of `call(torch.compile(module, mode))`."""
    # A fresh dynamo cache per module: otherwise a second UNet counts as a recompile of the same forward and is
    # compiled with dynamic shapes (slow to build, and not what a worker serving one model does).
    torch._dynamo.reset()
    compiled = torch.compile(module, mode=mode)
    start = time.perf_counter()
    call(compiled)
    sync()
    seconds = time.perf_counter() - start
    return seconds, its(lambda: call(compiled), iters)


def bench(name: str, config: dict, vae_config: dict, iters: int, modes: list[str], vae: bool, results: list[dict],
          save) -> None:
    """Append this model's row to `results` and fill it in, calling `save()` after every measurement."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from service.worker.artifacts import profile_for
    from service.worker.backends.onnx_export import example_inputs, export_unet

    with torch.device(DEVICE):  # random init on the GPU: seconds instead of a minute for SDXL's 2.6B parameters
        unet = UNet2DConditionModel.from_config(config).to(DTYPE).eval().requires_grad_(False)
    latent = config["sample_size"]
    profile = profile_for(unet.config, [(latent * 8,) * 2], max_images=1, text_len=77)
    x = example_inputs(profile, 2, (latent,) * 2, DTYPE, DEVICE)
    added = {"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]} if profile.sdxl else None
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)"
    result = {"model": name, "params_m": sum(p.numel() for p in unet.parameters()) / 1e6, "batch": 2,
              "latent": latent, "gpu": gpu, "torch": torch.__version__, "compile": {}}
    results.append(result)

    @torch.inference_mode()
    def call(module):
        module(x["sample"], x["timestep"], x["encoder_hidden_states"], added_cond_kwargs=added)

    result["eager_it_s"] = its(lambda: call(unet), iters)
    unet.to(memory_format=torch.channels_last)  # what the `compile` backend does on CUDA
    result["eager_channels_last_it_s"] = its(lambda: call(unet), iters)
    if DEVICE == "cuda":
        # The same eager kernels replayed from a CUDA graph: no Python or launch cost, so the gap to the row above
        # is what the host spends launching ~1-2k kernels per call (static shapes only, as a served batch isn't).
        try:
            graph = torch.cuda.CUDAGraph()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    call(unet)
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(graph):
                call(unet)
            result["eager_cuda_graph_it_s"] = its(graph.replay, iters)
            del graph
        except Exception as err:  # report, don't hide: the other rows still count
            result["eager_cuda_graph_error"] = repr(err)[:500]
    save()
    for mode in modes:
        seconds, rate = compiled_its(unet, call, iters, mode)
        result["compile"][mode] = {"compile_s": seconds, "it_s": rate}
        print(f"{name} compile {mode}: {rate:.1f} it/s after {seconds:.0f} s", flush=True)
        save()
    if vae:
        with torch.device(DEVICE):
            decoder = AutoencoderKL.from_config(vae_config).to(DTYPE).eval().requires_grad_(False).decoder
        z = torch.randn(1, decoder.conv_in.in_channels, latent, latent, device=DEVICE, dtype=DTYPE)

        @torch.inference_mode()
        def decode(module):
            module(z)

        image = latent * 2 ** (len(vae_config["block_out_channels"]) - 1)
        row = {"image": image, "eager_ms": 1e3 / its(lambda: decode(decoder), max(iters // 3, 5))}
        seconds, rate = compiled_its(decoder, decode, max(iters // 3, 5), modes[0] if modes else "default")
        row.update(compile_mode=modes[0] if modes else "default", compile_s=seconds, compile_ms=1e3 / rate)
        result["vae_decoder"] = row
        save()
    try:
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            from service.worker.backends.ort import OrtUNet

            with tempfile.TemporaryDirectory() as d:
                path = export_unet(unet, Path(d) / "unet.onnx", profile, fp16=True)
                session = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider"])
                ort_unet = OrtUNet(session, unet, profile, torch.device("cuda"), path)
                result["onnxruntime_it_s"] = its(lambda: call(ort_unet), iters)
        else:
            result["onnxruntime_it_s"] = None
            result["onnxruntime_note"] = f"onnxruntime {ort.__version__} here has no CUDAExecutionProvider"
    except Exception as err:  # report, don't hide: the other numbers still count
        result["onnxruntime_error"] = repr(err)[:500]
    try:
        import tensorrt  # noqa: F401

        result["tensorrt_note"] = "tensorrt importable: run the worker with backend tensorrt to build an engine"
    except ImportError:
        result["tensorrt_it_s"] = None
        result["tensorrt_note"] = "tensorrt not importable on this machine"
    save()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=["sd15", "sdxl"], default=None)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--compile-modes", default="default",
                        help="comma-separated torch.compile modes (max-autotune-no-cudagraphs tunes GEMMs: minutes "
                             "longer to compile)")
    parser.add_argument("--vae", action="store_true", help="also time the VAE decoder, eager vs compiled")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the script on a CPU: spo-tiny's and spo-tiny-xl's configs, fp32, no timings worth "
                             "reading")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_unet.json"))
    args = parser.parse_args()
    configs = {"sd15": (SD15, SD_VAE), "sdxl": (SDXL, SD_VAE)}
    if args.dry_run:
        global DEVICE, DTYPE
        DEVICE, DTYPE = "cpu", torch.float32
        from diffusers import AutoencoderKL, UNet2DConditionModel

        models = Path(__file__).resolve().parents[1] / "models"
        configs = {name: (UNet2DConditionModel.load_config(models / folder / "unet"),
                          AutoencoderKL.load_config(models / folder / "vae"))
                   for name, folder in (("sd15", "spo-tiny"), ("sdxl", "spo-tiny-xl"))}
    elif not torch.cuda.is_available():
        sys.exit("benchmarks/gpu_unet.py needs a CUDA GPU (or --dry-run)")
    torch.backends.cuda.matmul.allow_tf32 = True
    modes = [m for m in args.compile_modes.split(",") if m]
    results: list[dict] = []

    def save() -> None:
        Path(args.out).write_text(json.dumps(results, indent=2))

    for name, (config, vae_config) in configs.items():
        if args.only in (None, name):
            bench(name, config, vae_config, args.iters, modes, args.vae, results, save)
            if DEVICE == "cuda":
                torch.cuda.empty_cache()  # the last model's weights are garbage now
    for r in results:
        line = f"{r['model']} ({r['gpu']}, batch 2, {r['latent'] * 8}²): eager {r['eager_it_s']:.1f} it/s | " \
               f"channels_last {r['eager_channels_last_it_s']:.1f}"
        if "eager_cuda_graph_it_s" in r:
            line += f" | eager in a CUDA graph {r['eager_cuda_graph_it_s']:.1f}"
        for mode, c in r["compile"].items():
            line += f" | compile[{mode}] {c['it_s']:.1f} it/s ({c['it_s'] / r['eager_it_s']:.2f}x eager, " \
                    f"{c['compile_s']:.0f} s to compile)"
        ort_its = r.get("onnxruntime_it_s")
        line += f" | onnxruntime {'n/a' if ort_its is None else f'{ort_its:.1f} it/s'}"
        print(line)
        if "vae_decoder" in r:
            v = r["vae_decoder"]
            print(f"  VAE decoder {v['image']}² image: eager {v['eager_ms']:.1f} ms | compile[{v['compile_mode']}] "
                  f"{v['compile_ms']:.1f} ms ({v['eager_ms'] / v['compile_ms']:.2f}x) | one image = "
                  f"{v['eager_ms'] * r['eager_it_s'] / 1e3:.1f} eager UNet steps")


if __name__ == "__main__":
    main()
