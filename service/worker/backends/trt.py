"""`tensorrt` backend: a TensorRT engine built from the cached ONNX export, deserialised at worker start.

Written against the TensorRT 10 Python API (name-based I/O tensors, `execute_async_v3`), behind an import check:
TensorRT is not installable on the machines this project is developed on, so this path has never been run here.
Everything that does not need the library (profile shapes, cache keys, binding names) is unit-tested.

The engine's optimisation profile covers UNet batch 1..2*max_n (classifier-free guidance doubles the image batch)
and every allowed image size of the served model; builds reuse a timing cache per GPU. CUDA graphs are used only
for static shapes (manifest `cuda_graphs: true`): one execution context and one captured graph per (batch, height,
width) seen.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from service.worker.artifacts import ArtifactCache, ArtifactKey, ShapeProfile, default_cache_dir
from service.worker.backends.base import UNetBackend
from service.worker.backends.engine_unet import EngineUNet
from service.worker.backends.onnx_export import OUTPUT, ensure_onnx, input_names

if TYPE_CHECKING:
    from service.contracts.manifest import ModelSpec

log = logging.getLogger(__name__)

Shape = tuple[int, ...]


def tensorrt_available() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def profile_shapes(profile: ShapeProfile) -> dict[str, tuple[Shape, Shape, Shape]]:
    """(min, opt, max) shape of every engine input for the optimisation profile."""
    (h0, w0), (h1, w1) = profile.min_hw, profile.max_hw
    hopt, wopt = profile.latent_sizes[0]
    b0, bopt, b1 = profile.min_batch, profile.opt_batch, profile.max_batch

    def per_batch(*rest: int) -> tuple[Shape, Shape, Shape]:
        return (b0, *rest), (bopt, *rest), (b1, *rest)

    shapes: dict[str, tuple[Shape, Shape, Shape]] = {
        "sample": ((b0, 4, h0, w0), (bopt, 4, hopt, wopt), (b1, 4, h1, w1)),
        "timestep": per_batch(),
        "encoder_hidden_states": per_batch(profile.text_len, profile.text_dim),
    }
    if profile.sdxl:
        shapes["text_embeds"] = per_batch(profile.pooled_dim)
        shapes["time_ids"] = per_batch(profile.time_ids)
    return shapes


def engine_key(onnx_key: ArtifactKey, trt_version: str, gpu: str, fp16: bool) -> ArtifactKey:
    """An engine is valid only for its ONNX source, TensorRT version, GPU model and profile."""
    return ArtifactKey(weights=onnx_key.weights, backend="tensorrt", backend_version=trt_version, device=gpu,
                       profile=onnx_key.profile, options={"fp16": fp16, "onnx": onnx_key.digest})


def build_engine(onnx_path: Path, engine_path: Path, profile: ShapeProfile, fp16: bool, timing_cache: Path,
                 workspace_bytes: int = 8 << 30) -> Path:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    opt = builder.create_optimization_profile()
    for name, (lo, mid, hi) in profile_shapes(profile).items():
        opt.set_shape(name, lo, mid, hi)
    config.add_optimization_profile(opt)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    log.info("building TensorRT engine from %s (fp16=%s); this takes minutes", onnx_path, fp16)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT engine build failed (see the TensorRT log above)")
    engine_path.write_bytes(bytes(serialized))
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return engine_path


class TrtUNet(EngineUNet):
    """Runs the engine on torch's current CUDA stream with torch-owned buffers."""

    def __init__(self, engine_path: Path, unet: torch.nn.Module, profile: ShapeProfile, device: torch.device,
                 fp16: bool, cuda_graphs: bool = False) -> None:
        import tensorrt as trt

        super().__init__(unet, profile, device, torch.float16 if fp16 else torch.float32)
        self.trt = trt
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"cannot deserialise TensorRT engine {engine_path}")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        expected = [*input_names(profile), OUTPUT]
        if sorted(names) != sorted(expected):
            raise RuntimeError(f"engine I/O {names} does not match the UNet interface {expected}")
        self.context = self.engine.create_execution_context()
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[tuple, tuple[Any, Any, dict[str, torch.Tensor], torch.Tensor]] = {}

    def _bind(self, context: Any, feeds: dict[str, torch.Tensor], out: torch.Tensor) -> None:
        for name, tensor in feeds.items():
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        context.set_tensor_address(OUTPUT, out.data_ptr())

    def run(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        stream = torch.cuda.current_stream(self.device)
        if not self.cuda_graphs:
            out = torch.empty(feeds["sample"].shape, dtype=self.dtype, device=self.device)
            self._bind(self.context, feeds, out)
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
            return out
        key = tuple((k, tuple(v.shape)) for k, v in feeds.items())
        if key not in self._graphs:
            self._graphs[key] = self._capture(feeds)
        graph, _context, static_in, static_out = self._graphs[key]
        for name, tensor in feeds.items():
            static_in[name].copy_(tensor)
        graph.replay()
        return static_out.clone()

    def _capture(self, feeds: dict[str, torch.Tensor]) -> tuple[Any, Any, dict[str, torch.Tensor], torch.Tensor]:
        """One context and one CUDA graph per static shape: replay skips TensorRT's per-call launch overhead."""
        context = self.engine.create_execution_context()
        static_in = {k: v.clone() for k, v in feeds.items()}
        static_out = torch.empty(feeds["sample"].shape, dtype=self.dtype, device=self.device)
        self._bind(context, static_in, static_out)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            context.execute_async_v3(side.cuda_stream)  # warm-up outside the capture (TensorRT may allocate)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            context.execute_async_v3(side.cuda_stream)
        return graph, context, static_in, static_out


class TensorRTBackend(UNetBackend):
    name = "tensorrt"

    def __init__(self, cache_dir: str | Path | None = None) -> None:
        if not tensorrt_available():
            raise RuntimeError("the tensorrt backend needs the TensorRT Python package (pip install "
                               "'spo-diffusion[tensorrt]' on a machine with an NVIDIA GPU)")
        if not torch.cuda.is_available():
            raise RuntimeError("the tensorrt backend needs a CUDA GPU; none is visible")
        self.cache = ArtifactCache(cache_dir or default_cache_dir())
        self.profile: ShapeProfile | None = None

    def ensure_engine(self, pipe: Any, spec: ModelSpec) -> tuple[Path, ShapeProfile, bool]:
        """The cached engine for this pipeline's fused UNet, GPU, TensorRT version and profile; built on a miss."""
        import tensorrt as trt

        device = torch.device(spec.device)
        if device.type != "cuda":
            raise RuntimeError(f"the tensorrt backend runs on CUDA devices; the manifest says {spec.device!r}")
        fp16 = spec.dtype == "float16"
        onnx_path, onnx_key = ensure_onnx(pipe, spec, self.cache, fp16)
        gpu = torch.cuda.get_device_name(device)
        key = engine_key(onnx_key, trt.__version__, gpu, fp16)
        entry = self.cache.lookup(key)
        if entry is None:
            timing = self.cache.root / "timing" / f"{gpu.replace(' ', '_')}-trt{trt.__version__}.cache"
            with self.cache.building(key) as scratch:
                build_engine(onnx_path, scratch / "unet.plan", onnx_key.profile, fp16, timing)
            entry = self.cache.path(key)
        return entry / "unet.plan", onnx_key.profile, fp16

    def prepare(self, pipe: Any, spec: ModelSpec) -> Any:
        plan, profile, fp16 = self.ensure_engine(pipe, spec)
        self.profile = profile
        return TrtUNet(plan, pipe.unet, profile, torch.device(spec.device), fp16, cuda_graphs=spec.cuda_graphs)

    def max_images(self) -> int | None:
        return self.profile.max_batch // 2 if self.profile else None

    def describe(self) -> str:
        import tensorrt as trt

        return f"tensorrt {trt.__version__}"
