"""The contract between the worker and a UNet backend."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.contracts.manifest import ModelSpec


class UNetBackend(ABC):
    """Produces the denoiser a loaded pipeline runs.

    `prepare` gets the pipeline after weights (and any LoRA) are loaded and fused, and returns an object that the
    pipeline can call exactly like `UNet2DConditionModel` (same arguments, same output, same `config`/`dtype`/`device`
    attributes the pipeline reads). Compiled backends export or build from `pipe.unet` here, keyed by weights, backend
    version, device and shape profile, so nothing is reused across keys.
    """

    name: str
    # True where each new input shape costs a compile (torch.compile): the worker then warms up every shape class
    # a request can bring before it takes work (ModelRunner.warmup).
    compiles_per_shape: bool = False

    @abstractmethod
    def prepare(self, pipe: Any, spec: ModelSpec) -> Any:
        """Return the UNet to install as `pipe.unet`."""

    def prepare_vae_decoder(self, pipe: Any, spec: ModelSpec) -> Any:
        """Return the module to install as `pipe.vae.decoder` (manifest `compile_vae_decoder: true`); backends that
        cannot compile it refuse rather than silently run it eagerly."""
        raise ValueError(f"the {self.name} backend does not compile the VAE decoder (compile_vae_decoder needs "
                         f"onnxruntime or compile)")

    def describe(self) -> str:
        """One line for the logs: backend name and version."""
        return self.name

    def max_images(self) -> int | None:
        """The most images one pipeline call may hold with the prepared UNet (e.g. a fixed engine profile), or None
        for no limit. The worker caps its batches (SPO_MAX_BATCH) here, so no batch exceeds what was built."""
        return None
