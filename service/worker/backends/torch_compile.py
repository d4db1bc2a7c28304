"""`compile` backend: `torch.compile` of the pipeline's UNet (meant for GPUs; runs on CPU with inductor too).

Compilation is per input shape: each new (batch, size) recompiles (its cost on a GPU is in
benchmarks/results/h100-backends-2026-11-26), and from the second value of a dimension on, dynamo makes that
dimension dynamic. So the worker's warm-up calls the largest batch and every allowed size once before it takes work
(`ModelRunner.warmup`), and no request pays for a compile.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from service.worker.backends.base import UNetBackend

if TYPE_CHECKING:
    from service.contracts.manifest import ModelSpec

log = logging.getLogger(__name__)


class CompileBackend(UNetBackend):
    name = "compile"
    compiles_per_shape = True

    def __init__(self, mode: str | None = None) -> None:
        from service.contracts.config import Settings

        self.mode = mode or Settings().compile_mode

    def prepare(self, pipe: Any, spec: ModelSpec) -> Any:
        unet = pipe.unet.eval().requires_grad_(False)
        cuda = torch.device(spec.device).type == "cuda"
        if spec.cuda_graphs and not cuda:
            raise RuntimeError(f"cuda_graphs needs a CUDA device; the model runs on {spec.device!r}")
        if cuda:
            unet.to(memory_format=torch.channels_last)
        mode = self.mode_for(spec)
        log.info("torch.compile(unet, mode=%s): the first call of each new shape recompiles", mode)
        return torch.compile(unet, mode=mode, fullgraph=False)

    def prepare_vae_decoder(self, pipe: Any, spec: ModelSpec) -> Any:
        return torch.compile(pipe.vae.decoder.eval().requires_grad_(False), mode=self.mode_for(spec))

    def mode_for(self, spec: ModelSpec) -> str:
        """SPO_COMPILE_MODE, else `reduce-overhead` (CUDA graphs) where the manifest asks for `cuda_graphs`, else
        inductor's default mode, the fastest one measured on an H100 (benchmarks/results/h100-backends-2026-11-26)."""
        return self.mode or ("reduce-overhead" if spec.cuda_graphs else "default")

    def describe(self) -> str:
        return f"torch.compile {torch.__version__}"
