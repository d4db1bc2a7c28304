"""`torch` backend: the pipeline's own eager-mode UNet, under `torch.inference_mode` (CPU default)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from service.worker.backends.base import UNetBackend

if TYPE_CHECKING:
    from service.contracts.manifest import ModelSpec


class TorchEagerBackend(UNetBackend):
    name = "torch"

    def prepare(self, pipe: Any, spec: ModelSpec) -> Any:
        unet = pipe.unet
        unet.eval()
        unet.requires_grad_(False)
        return unet

    def describe(self) -> str:
        return f"torch {torch.__version__} (eager)"
