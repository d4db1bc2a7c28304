"""`onnxruntime` backend: the UNet exported to ONNX (cached by key) and run by an ONNX Runtime session.

CPU provider here; the CUDA provider when the manifest's device is CUDA and onnxruntime-gpu is installed, with I/O
binding so tensors stay on the GPU between steps. The object returned stands in for `UNet2DConditionModel` under an
unchanged diffusers pipeline (SD and SDXL, with CFG).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..artifacts import ArtifactCache, ArtifactKey, ShapeProfile, profile_for, weights_digest
from .base import UNetBackend
from .compiled_unet import CompiledUNet
from .onnx_export import OUTPUT, export_unet

if TYPE_CHECKING:
    from ..manifest import ModelSpec

log = logging.getLogger(__name__)


class OrtUNet(CompiledUNet):
    """The UNet as an ONNX Runtime session."""

    def __init__(self, session, unet: torch.nn.Module, profile: ShapeProfile, device: torch.device,
                 model_path: Path) -> None:
        fp16 = session.get_inputs()[0].type == "tensor(float16)"
        super().__init__(unet, profile, device, torch.float16 if fp16 else torch.float32)
        self.session = session
        self.model_path = model_path

    def run(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.device.type != "cuda":
            result = self.session.run([OUTPUT], {k: v.cpu().numpy() for k, v in feeds.items()})[0]
            return torch.from_numpy(np.ascontiguousarray(result)).to(feeds["sample"].device)
        # I/O binding: ONNX Runtime reads and writes torch's CUDA buffers directly, no host round trip.
        binding = self.session.io_binding()
        for name, tensor in feeds.items():
            binding.bind_input(name, "cuda", tensor.device.index or 0, _np_dtype(tensor.dtype), list(tensor.shape),
                               tensor.data_ptr())
        out = torch.empty(feeds["sample"].shape, dtype=self.dtype, device=feeds["sample"].device)
        binding.bind_output(OUTPUT, "cuda", out.device.index or 0, _np_dtype(out.dtype), list(out.shape),
                            out.data_ptr())
        torch.cuda.current_stream().synchronize()
        self.session.run_with_iobinding(binding)
        return out


def _np_dtype(dtype: torch.dtype):
    return {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}[dtype]


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def unet_profile(pipe: Any, spec: ModelSpec) -> ShapeProfile:
    from ..manifest import parse_size

    tokenizer = pipe.tokenizer
    return profile_for(pipe.unet.config, [parse_size(s) for s in spec.sizes], spec.max_n,
                       text_len=tokenizer.model_max_length, vae_factor=pipe.vae_scale_factor)


def ensure_onnx(pipe: Any, spec: ModelSpec, cache: ArtifactCache, fp16: bool) -> tuple[Path, ArtifactKey]:
    """The cached ONNX export of this pipeline's (fused) UNet for this profile; exported on a miss."""
    import onnx

    profile = unet_profile(pipe, spec)
    key = ArtifactKey(weights=weights_digest(pipe.unet.state_dict()), backend="onnx", backend_version=onnx.__version__,
                      device="any", profile=profile,
                      options={"fp16": fp16, "opset": 17, "torch": torch.__version__.split("+")[0]})
    hit = cache.lookup(key)
    if hit is not None:
        log.info("ONNX cache hit %s", hit)
        return hit / "unet.onnx", key
    with cache.building(key) as scratch:
        export_unet(pipe.unet, scratch / "unet.onnx", profile, fp16=fp16)
    log.info("ONNX exported to %s", cache.path(key))
    return cache.path(key) / "unet.onnx", key


class OnnxRuntimeBackend(UNetBackend):
    name = "onnxruntime"

    def __init__(self, cache_dir: str | Path | None = None, threads: int | None = None) -> None:
        import onnxruntime  # noqa: F401 - fail at construction with a clear ImportError

        self.cache = ArtifactCache(cache_dir or default_cache_dir())
        self.threads = threads
        self.profile: ShapeProfile | None = None

    def prepare(self, pipe: Any, spec: ModelSpec) -> Any:
        import onnxruntime as ort

        device = torch.device(spec.device)
        fp16 = spec.dtype == "float16"
        path, key = ensure_onnx(pipe, spec, self.cache, fp16)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # As many threads as this process may use (the CPU affinity, not the machine's core count): extra
        # spinning threads on a shared core cost more than they give.
        options.intra_op_num_threads = self.threads or len(os.sched_getaffinity(0))
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeError("manifest asks for onnxruntime on CUDA but onnxruntime has no CUDAExecutionProvider "
                                   "(install onnxruntime-gpu)")
            providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        log.info("onnxruntime session on %s (%s)", providers[0], path)
        self.profile = key.profile
        return OrtUNet(session, pipe.unet, self.profile, device, path)

    def max_images(self) -> int | None:
        """The profile's UNet batch holds max_batch / 2 images (classifier-free guidance doubles the batch)."""
        return self.profile.max_batch // 2 if self.profile else None

    def describe(self) -> str:
        import onnxruntime as ort

        return f"onnxruntime {ort.__version__}"


def default_cache_dir() -> Path:
    return Path(os.environ.get("SPO_ENGINE_CACHE", "~/.cache/spo-diffusion/engines")).expanduser()
