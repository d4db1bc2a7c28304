"""UNet backends: what runs the denoiser under the diffusers pipeline.

The worker asks a backend for the UNet to install as `pipe.unet`; the pipeline then calls it with the UNet's own
signature: `torch` (eager, the pipeline's own UNet), `compile` (torch.compile), `onnxruntime` (cached ONNX export)
and `tensorrt` (engine built from that export). A backend that cannot load (no GPU, no tensorrt) raises at worker
start with a clear message; nothing falls back silently.

This package's top level imports no torch, so the manifest (read by the API) can check backend names.
"""

from __future__ import annotations

from collections.abc import Callable

from .base import UNetBackend

_FACTORIES: dict[str, Callable[[], UNetBackend]] = {}


def _torch_eager() -> UNetBackend:
    from .torch_eager import TorchEagerBackend

    return TorchEagerBackend()


def _onnxruntime() -> UNetBackend:
    from .ort import OnnxRuntimeBackend

    return OnnxRuntimeBackend()


def _compile() -> UNetBackend:
    from .compiled import CompileBackend

    return CompileBackend()


def _tensorrt() -> UNetBackend:
    from .trt import TensorRTBackend

    return TensorRTBackend()


_FACTORIES["torch"] = _torch_eager
_FACTORIES["compile"] = _compile
_FACTORIES["onnxruntime"] = _onnxruntime
_FACTORIES["tensorrt"] = _tensorrt

KNOWN_BACKENDS: tuple[str, ...] = tuple(_FACTORIES)


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
