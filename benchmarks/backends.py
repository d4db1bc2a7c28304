"""UNet backends side by side on this machine: torch eager vs ONNX Runtime (CPU), one run.

    python benchmarks/backends.py [--model models/spo-tiny] [--repeats 20]

Prints the UNet call time at batch 1/2/4/8 (the UNet batch, i.e. CFG-doubled images) for both backends and their
ratio, the VAE decoder's call time at 1/2/4/8 images on both, then end-to-end images/s of the pipeline (20 DDIM
steps, CFG 5) at 1/2/4/8 images per call for torch, onnxruntime, and onnxruntime with the VAE decoder on it too
(`compile_vae_decoder`), with the ratios to torch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from service.contracts.manifest import ModelSpec  # noqa: E402
from service.worker.backends.onnx_export import example_inputs  # noqa: E402
from service.worker.backends.ort import OnnxRuntimeBackend  # noqa: E402
from service.worker.pipeline import generate, load_pipeline  # noqa: E402
from service.worker.runner import ImageRequest


def time_calls(fn, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/spo-tiny")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--images", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2, 4, 8],
                        help="images per end-to-end pipeline call, comma-separated")
    parser.add_argument("--e2e-repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    pipe = load_pipeline(args.model)
    torch_unet = pipe.unet
    size = torch_unet.config.sample_size * pipe.vae_scale_factor
    spec = ModelSpec(name="bench", kind="sd15", base=str(Path(args.model).resolve()),
                     defaults={"steps": 20, "guidance": 5.0, "size": f"{size}x{size}"}, sizes=[f"{size}x{size}"],
                     max_n=max(8, *args.images), backend="onnxruntime")
    with tempfile.TemporaryDirectory() as cache:
        backend = OnnxRuntimeBackend(cache_dir=cache)
        ort_unet = backend.prepare(pipe, spec)
        torch_decoder, ort_decoder = pipe.vae.decoder, backend.prepare_vae_decoder(pipe, spec)
        hw = (torch_unet.config.sample_size,) * 2
        rows = []
        print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, model {args.model}")
        print(f"{'UNet batch':>10} | {'torch ms':>9} | {'onnxruntime ms':>14} | {'speed-up':>8}")
        for batch in (1, 2, 4, 8):
            x = example_inputs(ort_unet.profile, batch, hw, torch.float32)

            def call_torch(x=x):
                with torch.inference_mode():
                    torch_unet(x["sample"], x["timestep"], x["encoder_hidden_states"])

            def call_ort(x=x):
                ort_unet(x["sample"], x["timestep"], x["encoder_hidden_states"])

            t_torch, t_ort = time_calls(call_torch, args.repeats), time_calls(call_ort, args.repeats)
            rows.append({"batch": batch, "torch_ms": 1e3 * t_torch, "ort_ms": 1e3 * t_ort, "speedup": t_torch / t_ort})
            print(f"{batch:>10} | {1e3 * t_torch:>9.2f} | {1e3 * t_ort:>14.2f} | {t_torch / t_ort:>7.2f}x")

        decoder_rows = []
        print(f"\n{'VAE decoder images':>18} | {'torch ms':>9} | {'onnxruntime ms':>14} | {'speed-up':>8}")
        for batch in (1, 2, 4, 8):
            z = torch.randn(batch, torch_decoder.conv_in.in_channels, *hw, generator=torch.Generator().manual_seed(0))

            def decode_torch(z=z):
                with torch.inference_mode():
                    torch_decoder(z)

            def decode_ort(z=z):
                ort_decoder(z)

            t_torch, t_ort = time_calls(decode_torch, args.repeats), time_calls(decode_ort, args.repeats)
            decoder_rows.append({"batch": batch, "torch_ms": 1e3 * t_torch, "ort_ms": 1e3 * t_ort,
                                 "speedup": t_torch / t_ort})
            print(f"{batch:>18} | {1e3 * t_torch:>9.2f} | {1e3 * t_ort:>14.2f} | {t_torch / t_ort:>7.2f}x")

        # End to end, interleaved (torch, onnxruntime, torch, ...) so a slow spell on a shared machine hits both.
        e2e = []
        for n in args.images:
            requests = [ImageRequest("a red circle on a blue background", i) for i in range(n)]
            setups = {"torch": (torch_unet, torch_decoder), "onnxruntime": (ort_unet, torch_decoder),
                      "onnxruntime+vae": (ort_unet, ort_decoder)}
            seconds = {name: [] for name in setups}
            for repeat in range(args.e2e_repeats + 1):
                for name, (unet, decoder) in setups.items():
                    pipe.unet, pipe.vae.decoder = unet, decoder
                    start = time.perf_counter()
                    generate(pipe, requests, steps=20, guidance=5.0, width=size, height=size)
                    if repeat:  # the first round warms up
                        seconds[name].append(time.perf_counter() - start)
            rates = {name: n / statistics.median(s) for name, s in seconds.items()}
            e2e.append({"images": n, "torch_img_s": rates["torch"], "ort_img_s": rates["onnxruntime"],
                        "speedup": rates["onnxruntime"] / rates["torch"], "ort_vae_img_s": rates["onnxruntime+vae"],
                        "speedup_with_vae": rates["onnxruntime+vae"] / rates["torch"]})
        pipe.unet, pipe.vae.decoder = torch_unet, torch_decoder
        print(f"\nend to end (20 DDIM steps, CFG 5; median of {args.e2e_repeats} interleaved calls; "
              f"+vae: the VAE decoder on onnxruntime too)")
        print(f"{'images/call':>11} | {'torch img/s':>11} | {'onnxruntime img/s':>17} | {'speed-up':>8} | "
              f"{'onnxruntime+vae img/s':>21} | {'speed-up':>8}")
        for row in e2e:
            print(f"{row['images']:>11} | {row['torch_img_s']:>11.2f} | {row['ort_img_s']:>17.2f} | "
                  f"{row['speedup']:>7.2f}x | {row['ort_vae_img_s']:>21.2f} | {row['speedup_with_vae']:>7.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"unet": rows, "vae_decoder": decoder_rows, "end_to_end": e2e},
                                              indent=2))


if __name__ == "__main__":
    main()
