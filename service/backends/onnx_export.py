"""Export a (LoRA-fused) diffusers UNet to ONNX with dynamic batch and spatial axes.

The file's interface is fixed so other tools can use it: inputs `sample` (B, 4, h, w), `timestep` (int64, (B,)),
`encoder_hidden_states` (B, L, D), plus `text_embeds` (B, P) and `time_ids` (B, 6) for SDXL; output `out_sample`.
The VAE decoder may be exported the same way (input `latent`, output `image`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..artifacts import ShapeProfile

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

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
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
    latent = torch.randn(1, decoder.conv_in.in_channels, *latent_hw, generator=g).to(device, dtype)
    axes = {VAE_INPUT: {0: "batch", 2: "height", 3: "width"}, VAE_OUTPUT: {0: "batch", 2: "out_height", 3: "out_width"}}
    return _export(wrapper, {VAE_INPUT: latent}, VAE_OUTPUT, axes, path)


class _DecoderForExport(torch.nn.Module):
    def __init__(self, decoder: torch.nn.Module) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, latent):
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
