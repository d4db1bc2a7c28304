"""Model execution for the worker: one served model loaded on one device, run one batch at a time.

The runner knows nothing about Redis or HTTP. It loads the manifest entry through `pipeline.load_pipeline` (the same
call `spo generate` uses), installs the UNet its backend provides, and runs `pipeline.generate` with a step callback
that reports progress and per-step time and lets the caller abort between denoising steps.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from service.contracts.manifest import ModelSpec, parse_size
from service.worker.backends import get_backend
from service.worker.pipeline import Pipeline, generate, load_pipeline
from service.worker.runner import ImageRequest, StepCallback

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelRunner:
    """Owns the pipeline of one served model (the `runner.Runner` the worker loop drives)."""

    def __init__(self, spec: ModelSpec, *, device: str | None = None, threads: int | None = None) -> None:
        if device is not None and device != spec.device:  # SPO_DEVICE / --device: the backend sees it too
            spec = spec.model_copy(update={"device": device})
        self.spec = spec
        self.device = spec.device
        self.threads = threads
        self.backend = get_backend(spec.backend)  # fails fast on an unknown backend, before loading weights
        self.pipe: Pipeline | None = None

    def load(self) -> ModelRunner:
        if self.threads:
            torch.set_num_threads(self.threads)
        started = time.perf_counter()
        spec = self.spec
        pipe = load_pipeline(spec.base, lora=spec.lora, lora_scale=spec.lora_scale, vae=spec.vae, unet=spec.unet,
                             dtype=DTYPES[spec.dtype], device=self.device, lora_weight_name=spec.weight_name)
        pipe.unet = self.backend.prepare(pipe, spec)
        if spec.compile_vae_decoder:
            pipe.vae.decoder = self.backend.prepare_vae_decoder(pipe, spec)
        self.pipe = pipe
        log.info("loaded %s (%s, base %s%s%s) on %s with %s in %.1fs", spec.name, spec.kind, spec.base,
                 f", UNet {spec.unet}" if spec.unet else "",
                 f", LoRA {spec.lora} x{spec.lora_scale}" if spec.lora else "", self.device,
                 self.backend.describe(), time.perf_counter() - started)
        return self

    @property
    def max_images(self) -> int | None:
        """Images per pipeline call the backend accepts (None: no limit)."""
        return self.backend.max_images()

    def warmup(self, max_images: int | None = None) -> None:
        """Pay lazy initialisation before the first request. A backend that compiles per input shape is also called
        with the most images a batch can hold (`max_images`, else the model's max_n) and once at every other allowed
        size, so its batch and spatial dimensions are compiled (dynamic, after two values) before any request."""
        width, height = parse_size(self.spec.defaults.size)
        calls = [(1, width, height)]
        if self.backend.compiles_per_shape:
            # A worker batch holds several requests: up to its max_batch images, capped by what the backend built.
            most = min(n for n in (max_images or self.spec.max_n, self.max_images) if n)
            if most > 1:
                calls.append((most, width, height))
            calls += [(1, *parse_size(s)) for s in self.spec.sizes if parse_size(s) != (width, height)]
        for n, w, h in calls:
            started = time.perf_counter()
            self.run([ImageRequest("warmup", seed) for seed in range(n)], width=w, height=h, steps=1,
                     guidance=self.spec.defaults.guidance)
            log.info("warm-up: %d image(s) at %dx%d in %.1fs", n, w, h, time.perf_counter() - started)

    @torch.inference_mode()
    def run(self, requests: list[ImageRequest], *, width: int, height: int, steps: int, guidance: float,
            on_step: StepCallback | None = None) -> list[np.ndarray]:
        """One pipeline call for every request; uint8 HxWx3 arrays in request order."""
        if self.pipe is None:
            raise RuntimeError("ModelRunner.load() was not called")
        last = time.perf_counter()

        def callback(step: int, total: int) -> None:
            nonlocal last
            now = time.perf_counter()
            seconds, last = now - last, now
            if on_step is not None:
                on_step(step, total, seconds)

        return generate(self.pipe, requests, steps=steps, guidance=guidance, width=width, height=height,
                        callback=callback)
