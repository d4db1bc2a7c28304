"""`onnxruntime` backend: the UNet exported to ONNX (cached by key) and run by an ONNX Runtime session.

CPU provider here; the CUDA provider when the manifest's device is CUDA and onnxruntime-gpu is installed, with I/O
binding so tensors stay on the GPU between steps. The object returned stands in for `UNet2DConditionModel` under an
unchanged diffusers pipeline (SD and SDXL, with CFG).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..artifacts import ArtifactCache, ArtifactKey, ShapeProfile, profile_for, weights_digest
from .base import UNetBackend
from .compiled_unet import CompiledUNet
from .onnx_export import OPSET, OUTPUT, VAE_INPUT, VAE_OUTPUT, export_unet, export_vae_decoder

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
        return run_session(self.session, feeds, OUTPUT, feeds["sample"].shape, self.dtype)


class OrtVAEDecoder(torch.nn.Module):
    """`vae.decoder` as an ONNX Runtime session. `AutoencoderKL.decode` keeps its own post_quant_conv, tiling and
    dtype handling (SDXL's fp16 upcast) and calls this for the heavy part."""

    def __init__(self, session, profile: ShapeProfile, scale: int, out_channels: int) -> None:
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


def run_session(session, feeds: dict[str, torch.Tensor], output: str, out_shape: tuple[int, ...],
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


def _np_dtype(dtype: torch.dtype):
    return {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}[dtype]


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def unet_profile_of(pipe: Any, spec: ModelSpec) -> ShapeProfile:
    from ..manifest import parse_size

    tokenizer = pipe.tokenizer
    return profile_for(pipe.unet.config, [parse_size(s) for s in spec.sizes], spec.max_n,
                       text_len=tokenizer.model_max_length, vae_factor=pipe.vae_scale_factor)


def ensure_onnx(pipe: Any, spec: ModelSpec, cache: ArtifactCache, fp16: bool) -> tuple[Path, ArtifactKey]:
    """The cached ONNX export of this pipeline's (fused) UNet for this profile; exported on a miss."""
    profile = unet_profile_of(pipe, spec)
    return _cached_export(cache, pipe.unet, "onnx", profile, fp16, "unet.onnx",
                          lambda path: export_unet(pipe.unet, path, profile, fp16=fp16))


def ensure_onnx_vae_decoder(pipe: Any, spec: ModelSpec, cache: ArtifactCache) -> tuple[Path, ArtifactKey]:
    """The cached ONNX export of this pipeline's VAE decoder; exported on a miss."""
    decoder = pipe.vae.decoder
    # The pipeline decodes all images of a call at once: batch 1..max_n, the UNet profile's latent sizes.
    profile = replace(unet_profile_of(pipe, spec), min_batch=1, opt_batch=1, max_batch=spec.max_n, text_len=0,
                      text_dim=0, sdxl=False, pooled_dim=0)
    # SDXL's VAE overflows in fp16 (config.force_upcast; the pipeline upcasts it to fp32 to decode): keep fp32.
    fp16 = next(decoder.parameters()).dtype == torch.float16 and not getattr(pipe.vae.config, "force_upcast", False)
    return _cached_export(cache, decoder, "onnx-vae-decoder", profile, fp16, "vae_decoder.onnx",
                          lambda path: export_vae_decoder(decoder, path, profile.latent_sizes[0], fp16=fp16))


def _cached_export(cache: ArtifactCache, module: torch.nn.Module, backend: str, profile: ShapeProfile, fp16: bool,
                   filename: str, export: Callable[[Path], Path]) -> tuple[Path, ArtifactKey]:
    """The cache entry keyed by `module`'s weights, the exporter's versions and the profile; `export` on a miss."""
    import onnx

    key = ArtifactKey(weights=weights_digest(module.state_dict()), backend=backend, backend_version=onnx.__version__,
                      device="any", profile=profile,
                      options={"fp16": fp16, "opset": OPSET, "torch": torch.__version__.split("+")[0]})
    hit = cache.lookup(key)
    if hit is not None:
        log.info("ONNX cache hit %s", hit)
        return hit / filename, key
    with cache.building(key) as scratch:
        export(scratch / filename)
    log.info("ONNX exported to %s", cache.path(key))
    return cache.path(key) / filename, key


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

    def session(self, path: Path, device: torch.device):
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


def default_cache_dir() -> Path:
    return Path(os.environ.get("SPO_ENGINE_CACHE", "~/.cache/spo-diffusion/engines")).expanduser()
