"""`spo export`: build a served model's compiled UNet ahead of time (CI, image build, or a node's first start).

The artifact lands in the cache the worker reads (keyed by weights, backend + version, device, shape profile), so a
worker starting later finds it; `--out DIR` also writes a standalone copy (`DIR/unet.onnx` or `DIR/unet.plan`).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from service.contracts.manifest import Manifest, ModelSpec, load_manifest, native_size, parse_size

log = logging.getLogger(__name__)


class ExportError(ValueError):
    """Bad export request: unknown model, unsupported size or batch, missing weights."""


def resolve_spec(model: str, manifest_path: Path | None) -> ModelSpec:
    """A manifest model name, or a local diffusers folder (its kind read from model_index.json)."""
    path = Path(model).expanduser()
    if (path / "model_index.json").is_file():
        index = json.loads((path / "model_index.json").read_text())
        kind = "sdxl" if "XL" in index.get("_class_name", "") else "sd15"
        size = native_size(path)
        if size is None:
            raise ExportError(f"--model {model!r}: cannot read the native size from its unet/vae config.json")
        return ModelSpec(name=path.name, kind=kind, base=str(path.resolve()),
                         defaults={"steps": 20, "guidance": 5.0, "size": size}, sizes=[size])
    if manifest_path is None:
        raise ExportError(f"--model {model!r} is not a diffusers folder and no manifest was given")
    manifest: Manifest = load_manifest(manifest_path)
    try:
        return manifest.get(model)
    except ValueError as err:
        raise ExportError(f"--model: {err}") from None


def export(model: str, backend: str, *, manifest_path: Path | None = None, out: Path | None = None,
           fp16: bool = False, max_batch: int | None = None, sizes: list[str] | None = None,
           device: str | None = None, cache_dir: Path | None = None) -> Path:
    """Export (and for TensorRT, build) the UNet of `model`, and its VAE decoder when the manifest entry asks for
    `compile_vae_decoder` (onnxruntime); returns the cached UNet artifact's path."""
    import torch

    from service.worker.artifacts import default_cache_dir
    from service.worker.backends.onnx_export import ensure_onnx
    from service.worker.pipeline import load_pipeline

    if backend not in ("onnxruntime", "tensorrt"):
        raise ExportError(f"--backend must be onnxruntime or tensorrt, got {backend!r}")
    spec = resolve_spec(model, manifest_path)
    update: dict = {"dtype": "float16" if fp16 else "float32"}
    if sizes:
        for s in sizes:
            try:
                parse_size(s)
            except ValueError as err:
                raise ExportError(f"--sizes: {err}") from None
        update["sizes"] = sizes
        update["defaults"] = spec.defaults.model_copy(update={"size": sizes[0]})
    if max_batch is not None:
        if max_batch < 1:
            raise ExportError(f"--max-batch must be >= 1, got {max_batch}")
        update["max_n"] = max_batch
    if device is not None:
        update["device"] = device
    spec = spec.model_copy(update=update)
    if fp16 and torch.device(spec.device).type != "cuda":
        raise ExportError("--fp16 needs a CUDA device (--device cuda): fp16 convolutions do not run on the CPU")
    cache = cache_dir or default_cache_dir()
    trt_backend = None
    if backend == "tensorrt":  # before loading any weights: a missing library or GPU fails in a second
        from service.worker.backends.trt import TensorRTBackend

        if torch.device(spec.device).type != "cuda":
            raise ExportError(f"--backend tensorrt builds engines on a CUDA device; add --device cuda (the model's "
                              f"device is {spec.device!r})")
        try:
            trt_backend = TensorRTBackend(cache_dir=cache)
        except RuntimeError as err:
            raise ExportError(f"--backend tensorrt: {err}") from None
    dtype = torch.float16 if fp16 else torch.float32
    pipe = load_pipeline(spec.base, lora=spec.lora, lora_scale=spec.lora_scale, vae=spec.vae, unet=spec.unet,
                         dtype=dtype, device=spec.device)
    if backend == "onnxruntime":
        from service.worker.artifacts import ArtifactCache

        artifacts = ArtifactCache(cache)
        path, _ = ensure_onnx(pipe, spec, artifacts, fp16)
        if spec.compile_vae_decoder:  # the worker will want the decoder too: build it now as well
            from service.worker.backends.onnx_export import ensure_onnx_vae_decoder

            _copy_out(ensure_onnx_vae_decoder(pipe, spec, artifacts)[0], out)
    else:
        assert trt_backend is not None  # made above, before the weights loaded
        path, _, _ = trt_backend.ensure_engine(pipe, spec)
    _copy_out(path, out)
    log.info("exported %s (%s) -> %s", spec.name, backend, path)
    return path


def _copy_out(path: Path, out: Path | None) -> None:
    """A standalone copy of a cache entry's model (plus any external weight files) and its key as STEM.meta.json."""
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    for f in path.parent.iterdir():
        if f.name != "meta.json":
            shutil.copy2(f, out / f.name)
    shutil.copy2(path.parent / "meta.json", out / f"{path.stem}.meta.json")
