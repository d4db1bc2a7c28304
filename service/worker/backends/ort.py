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

from service.worker.artifacts import ArtifactCache, ShapeProfile, default_cache_dir
from service.worker.backends.base import UNetBackend
from service.worker.backends.engine_unet import EngineUNet
from service.worker.backends.onnx_export import OUTPUT, VAE_INPUT, VAE_OUTPUT, ensure_onnx, ensure_onnx_vae_decoder

if TYPE_CHECKING:
    from service.contracts.manifest import ModelSpec

log = logging.getLogger(__name__)


class OrtUNet(EngineUNet):
    """The UNet as an ONNX Runtime session."""

    def __init__(self, session: Any, unet: torch.nn.Module, profile: ShapeProfile, device: torch.device,
                 model_path: Path) -> None:
        fp16 = session.get_inputs()[0].type == "tensor(float16)"
        super().__init__(unet, profile, device, torch.float16 if fp16 else torch.float32)
        self.session = session
        self.model_path = model_path

    def run(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        return run_session(self.session, feeds, OUTPUT, feeds["sample"].shape, self.dtype)


class OrtVAEDecoder(torch.nn.Module):
    """`vae.decoder` as an ONNX Runtime session. `AutoencoderKL.decode` keeps its own post_quant_conv, tiling and
    dtype handling (SDXL's fp16 upcast) and calls this for the heavy part."""

    def __init__(self, session: Any, profile: ShapeProfile, scale: int, out_channels: int) -> None:
        super().__init__()
        self.session = session
        self.profile = profile
        self.scale = scale
        self.out_channels = out_channels
        self.engine_dtype = torch.float16 if session.get_inputs()[0].type == "tensor(float16)" else torch.float32

    def forward(self, sample: torch.Tensor, latent_embeds: torch.Tensor | None = None) -> torch.Tensor:
        b, _, h, w = sample.shape
        self.profile.check(b, h, w)
        out_shape = (b, self.out_channels, h * self.scale, w * self.scale)
        feeds = {VAE_INPUT: sample.to(self.engine_dtype).contiguous()}
        return run_session(self.session, feeds, VAE_OUTPUT, out_shape, self.engine_dtype).to(sample.dtype)


def run_session(session: Any, feeds: dict[str, torch.Tensor], output: str, out_shape: tuple[int, ...],
                dtype: torch.dtype) -> torch.Tensor:
    """One session call. On CUDA with I/O binding: ONNX Runtime reads and writes torch's buffers directly, no host
    round trip."""
    device = next(iter(feeds.values())).device
    if device.type != "cuda":
        result = session.run([output], {k: v.cpu().numpy() for k, v in feeds.items()})[0]
        return torch.from_numpy(np.ascontiguousarray(result)).to(device)
    binding = session.io_binding()
    for name, tensor in feeds.items():
        binding.bind_input(name, "cuda", tensor.device.index or 0, _np_dtype(tensor.dtype), list(tensor.shape),
                           tensor.data_ptr())
    out = torch.empty(out_shape, dtype=dtype, device=device)
    binding.bind_output(output, "cuda", out.device.index or 0, _np_dtype(out.dtype), list(out.shape), out.data_ptr())
    torch.cuda.current_stream().synchronize()
    session.run_with_iobinding(binding)
    return out


def _np_dtype(dtype: torch.dtype) -> type:
    return {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}[dtype]


class OnnxRuntimeBackend(UNetBackend):
    name = "onnxruntime"

    def __init__(self, cache_dir: str | Path | None = None, threads: int | None = None) -> None:
        import onnxruntime  # noqa: F401 - fail at construction with a clear ImportError

        self.cache = ArtifactCache(cache_dir or default_cache_dir())
        self.threads = threads
        self.profile: ShapeProfile | None = None

    def prepare(self, pipe: Any, spec: ModelSpec) -> Any:
        device = torch.device(spec.device)
        path, key = ensure_onnx(pipe, spec, self.cache, spec.dtype == "float16")
        self.profile = key.profile
        return OrtUNet(self.session(path, device), pipe.unet, self.profile, device, path)

    def prepare_vae_decoder(self, pipe: Any, spec: ModelSpec) -> torch.nn.Module:
        path, key = ensure_onnx_vae_decoder(pipe, spec, self.cache)
        return OrtVAEDecoder(self.session(path, torch.device(spec.device)), key.profile, pipe.vae_scale_factor,
                             pipe.vae.decoder.conv_out.out_channels)

    def session(self, path: Path, device: torch.device) -> Any:
        """An inference session for `path` on `device` (CPU provider, or CUDA when asked and present)."""
        import onnxruntime as ort

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
        return session

    def max_images(self) -> int | None:
        """The profile's UNet batch holds max_batch / 2 images (classifier-free guidance doubles the batch)."""
        return self.profile.max_batch // 2 if self.profile else None

    def describe(self) -> str:
        import onnxruntime as ort

        return f"onnxruntime {ort.__version__}"

