"""Export a (LoRA-fused) diffusers UNet to ONNX with dynamic batch and spatial axes.

The file's interface is fixed so other tools can use it: inputs `sample` (B, 4, h, w), `timestep` (int64, (B,)),
`encoder_hidden_states` (B, L, D), plus `text_embeds` (B, P) and `time_ids` (B, 6) for SDXL; output `out_sample`.
The VAE decoder may be exported the same way (input `latent`, output `image`). `ensure_onnx` and
`ensure_onnx_vae_decoder` keep the exports in the artifact cache; the onnxruntime and TensorRT backends both start
from them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from service.contracts.sizes import parse_size
from service.worker.artifacts import ArtifactCache, ArtifactKey, ShapeProfile, profile_for, weights_digest

if TYPE_CHECKING:
    from service.contracts.manifest import ModelSpec

log = logging.getLogger(__name__)

INPUTS_SD = ("sample", "timestep", "encoder_hidden_states")
INPUTS_SDXL = (*INPUTS_SD, "text_embeds", "time_ids")
OUTPUT = "out_sample"
VAE_INPUT, VAE_OUTPUT = "latent", "image"
OPSET = 17


class _UNetForExport(torch.nn.Module):
    """The UNet with positional tensor inputs and a plain tensor output (what an ONNX graph can express)."""

    def __init__(self, unet: torch.nn.Module, sdxl: bool) -> None:
        super().__init__()
        self.unet = unet
        self.sdxl = sdxl

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None) -> torch.Tensor:
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if self.sdxl else None
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added,
                         return_dict=False)[0]


def input_names(profile: ShapeProfile) -> tuple[str, ...]:
    return INPUTS_SDXL if profile.sdxl else INPUTS_SD


def example_inputs(profile: ShapeProfile, batch: int, latent_hw: tuple[int, int], dtype: torch.dtype,
                   device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Random inputs of the profile's shapes (export tracing, parity checks, engine warm-up)."""
    h, w = latent_hw
    g = torch.Generator().manual_seed(0)
    x = {
        "sample": torch.randn(batch, 4, h, w, generator=g),
        "timestep": torch.full((batch,), 500, dtype=torch.int64),
        "encoder_hidden_states": torch.randn(batch, profile.text_len, profile.text_dim, generator=g),
    }
    if profile.sdxl:
        x["text_embeds"] = torch.randn(batch, profile.pooled_dim, generator=g)
        x["time_ids"] = torch.tensor([[h * 8, w * 8, 0, 0, h * 8, w * 8]], dtype=torch.float32).repeat(batch, 1)
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in x.items()}


def export_unet(unet: torch.nn.Module, path: Path, profile: ShapeProfile, fp16: bool = False) -> Path:
    """Write `path` (plus external weight data for models over 2 GB), then check it with onnx's checker and
    shape inference."""
    dtype, device = _export_dtype_device(fp16)
    wrapper = _UNetForExport(unet, profile.sdxl).to(device=device, dtype=dtype).eval()
    names = input_names(profile)
    inputs = example_inputs(profile, profile.opt_batch, profile.latent_sizes[0], dtype, device)
    axes = {"sample": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "batch"},
            "encoder_hidden_states": {0: "batch"}, OUTPUT: {0: "batch", 2: "height", 3: "width"}}
    if profile.sdxl:
        axes.update({"text_embeds": {0: "batch"}, "time_ids": {0: "batch"}})
    return _export(wrapper, {n: inputs[n] for n in names}, OUTPUT, axes, path)


def export_vae_decoder(decoder: torch.nn.Module, path: Path, latent_hw: tuple[int, int], fp16: bool = False) -> Path:
    """`vae.decoder` (what `AutoencoderKL.decode` calls after its post_quant_conv) with dynamic batch and spatial
    axes: input `latent` (B, C, h, w), output `image` (B, 3, f*h, f*w)."""
    dtype, device = _export_dtype_device(fp16)
    wrapper = _DecoderForExport(decoder).to(device=device, dtype=dtype).eval()
    g = torch.Generator().manual_seed(0)
    channels: int = decoder.conv_in.in_channels  # type: ignore[union-attr,assignment]  # diffusers' Decoder
    latent = torch.randn(1, channels, *latent_hw, generator=g).to(device, dtype)
    axes = {VAE_INPUT: {0: "batch", 2: "height", 3: "width"}, VAE_OUTPUT: {0: "batch", 2: "out_height", 3: "out_width"}}
    return _export(wrapper, {VAE_INPUT: latent}, VAE_OUTPUT, axes, path)


class _DecoderForExport(torch.nn.Module):
    def __init__(self, decoder: torch.nn.Module) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.decoder(latent)


def _export_dtype_device(fp16: bool) -> tuple[torch.dtype, str]:
    dtype = torch.float16 if fp16 else torch.float32
    return dtype, "cuda" if fp16 and torch.cuda.is_available() else "cpu"  # fp16 convolutions need a GPU to trace


def _export(module: torch.nn.Module, inputs: dict[str, torch.Tensor], output: str, axes: dict, path: Path) -> Path:
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("exporting %s to %s (opset %d)", type(module).__name__, path, OPSET)
    with torch.inference_mode():
        torch.onnx.export(module, tuple(inputs.values()), str(path), input_names=list(inputs), output_names=[output],
                          dynamic_axes=axes, opset_version=OPSET, do_constant_folding=True, dynamo=False)
    onnx.checker.check_model(str(path))  # by path: works for models with external data too
    onnx.shape_inference.infer_shapes_path(str(path), str(path.with_suffix(".inferred.onnx")))
    path.with_suffix(".inferred.onnx").unlink()
    return path


def unet_profile_of(pipe: Any, spec: ModelSpec) -> ShapeProfile:
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
