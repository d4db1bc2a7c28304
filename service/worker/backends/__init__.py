"""UNet backends: what runs the denoiser under the diffusers pipeline.

The worker asks a backend for the UNet to install as `pipe.unet`; the pipeline then calls it with the UNet's own
signature: `torch` (eager, the pipeline's own UNet), `compile` (torch.compile), `onnxruntime` (cached ONNX export)
and `tensorrt` (engine built from that export). A backend that cannot load (no GPU, no tensorrt) raises at worker
start with a clear message; nothing falls back silently.

The manifest (a shared contract, read by the API too) lists the names; this registry implements each of them and
imports a backend's module (and torch) only when it is asked for.
"""

from __future__ import annotations

from collections.abc import Callable

from service.contracts.manifest import KNOWN_BACKENDS
from service.worker.backends.base import UNetBackend

_FACTORIES: dict[str, Callable[[], UNetBackend]] = {}


def _torch_eager() -> UNetBackend:
    from service.worker.backends.torch_eager import TorchEagerBackend

    return TorchEagerBackend()


def _onnxruntime() -> UNetBackend:
    from service.worker.backends.ort import OnnxRuntimeBackend

    return OnnxRuntimeBackend()


def _compile() -> UNetBackend:
    from service.worker.backends.torch_compile import CompileBackend

    return CompileBackend()


def _tensorrt() -> UNetBackend:
    from service.worker.backends.trt import TensorRTBackend

    return TensorRTBackend()


_FACTORIES["torch"] = _torch_eager
_FACTORIES["compile"] = _compile
_FACTORIES["onnxruntime"] = _onnxruntime
_FACTORIES["tensorrt"] = _tensorrt

if tuple(_FACTORIES) != KNOWN_BACKENDS:  # a backend the manifest accepts must exist here, and the other way round
    raise ImportError(f"backend registry {tuple(_FACTORIES)} disagrees with the manifest's {KNOWN_BACKENDS}")


class UnknownBackendError(ValueError):
    """The manifest names a backend this build does not provide."""


def get_backend(name: str) -> UNetBackend:
    """The backend called `name`; raises `UnknownBackendError` naming the available ones."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise UnknownBackendError(f"unknown UNet backend {name!r}; available: {', '.join(KNOWN_BACKENDS)}") from None
    return factory()


__all__ = ["KNOWN_BACKENDS", "UNetBackend", "UnknownBackendError", "get_backend"]
