#!/usr/bin/env bash
# One lent-GPU session for the UNet backends, prepared to fit the device tool's limits (one command,
# <= 10 min, results under $OUT, each phase cut at what is left of a deadline so a slow one cannot starve the rest):
#   1. benchmarks/gpu_unet.py: SD 1.5 and SDXL architectures, eager / channels_last / torch.compile, VAE decoder,
#   2. benchmarks/gpu_served.py: spo-tiny and spo-tiny-xl through ModelRunner, `torch` vs `compile` backend,
#   3. with the time left: SD 1.5 compiled with reduce-overhead (CUDA graphs: what the manifest's `cuda_graphs`
#      selects; not yet measured) and max-autotune-no-cudagraphs.
# Seen on an H100 (2026-11-26): phase 1 needs ~330 s (compiles: SD 1.5 77 s, SDXL 141 s, VAE decoders), phase 2
# ~120 s a model; give the call timeout_s 600.
# Carry the wheels the machine lacks (diffusers; pydantic for the manifest) in .whl (device_lib.sh installs them).
set -u
OUT=${OUT:-/tmp/device-out}
BUDGET=${BUDGET:-570}
source "$(dirname "$0")/device_lib.sh"
phase gpu_unet 360 python3 benchmarks/gpu_unet.py --iters 30 --vae --out "$OUT/gpu_unet.json"
phase gpu_served 250 python3 benchmarks/gpu_served.py --out "$OUT/gpu_served.json"
phase gpu_unet_modes 400 python3 benchmarks/gpu_unet.py --only sd15 --iters 30 \
    --compile-modes reduce-overhead,max-autotune-no-cudagraphs --out "$OUT/gpu_unet_modes.json"
grep -h -E "^(sd15|sdxl|  VAE|spo-tiny)" "$OUT"/*.log
cat "$OUT/phases.txt"
