"""Model execution: load a diffusers pipeline (base + optional VAE swap + fused LoRA) and run batched generations.

One function loads, one function generates; the worker, `spo generate` and the evaluation code all go through them,
so a seed gives the same image everywhere. Each image gets its own `torch.Generator`, so an image does not depend on
what else is in its batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline

from service.contracts.manifest import is_local_ref
from service.worker.runner import ImageRequest

log = logging.getLogger(__name__)


class Pipeline(Protocol):
    """A loaded Stable Diffusion 1.5 or SDXL pipeline, as this project uses it.

    diffusers registers a pipeline's components at run time (`register_modules`), so a type checker sees none of
    them on `DiffusionPipeline`; this names the ones the service and the trainers reach for. `unet` may be a
    backend's stand-in with the UNet's call signature.
    """

    unet: Any  # UNet2DConditionModel, or what a UNet backend installed in its place
    vae: Any  # AutoencoderKL (its encoder/decoder are registered at run time too)
    text_encoder: torch.nn.Module
    tokenizer: Any  # CLIPTokenizer
    scheduler: Any  # a diffusers scheduler (DDIMScheduler for the tiny models)
    vae_scale_factor: int
    components: dict[str, Any]
    config: Any  # the pipeline's FrozenDict of component names and flags (force_zeros_for_empty_prompt)
    device: torch.device
    dtype: torch.dtype

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...
    def to(self, *args: Any, **kwargs: Any) -> Any: ...
    def set_progress_bar_config(self, **kwargs: Any) -> None: ...
    def encode_prompt(self, *args: Any, **kwargs: Any) -> Any: ...


class ModelLoadError(RuntimeError):
    """The model (or its LoRA / VAE) cannot be found or loaded."""


def load_pipeline(
    base: str,
    *,
    lora: str | None = None,
    lora_scale: float = 1.0,
    vae: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    local_files_only: bool | None = None,
    unet: str | None = None,
    lora_weight_name: str | None = None,
) -> Pipeline:
    """Load a local diffusers folder or a hub id (when the hub is reachable), swap the VAE (and the UNet, for a full
    fine-tune saved as a UNet folder), fuse the LoRA.

    The LoRA is fused into the UNet weights (and unloaded) so inference and compiled backends see one plain UNet.
    `lora_weight_name` is its file inside the folder or hub repo when that is not diffusers' default name (the
    published SPO LoRAs). Hub ids resolve through the Hugging Face cache, so with `HF_HUB_OFFLINE=1` a pre-filled
    cache is enough.
    """
    if is_local_ref(base):
        path = Path(base).expanduser()
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(f"no diffusers pipeline at {path} (model_index.json not found)")
        base = str(path)
    local_only = is_local_ref(base) if local_files_only is None else local_files_only
    kwargs = {}
    if vae is not None:
        try:
            kwargs["vae"] = AutoencoderKL.from_pretrained(vae, torch_dtype=dtype, local_files_only=is_local_ref(vae))
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"cannot load VAE {vae!r}: {err}") from err
    if unet is not None:
        from diffusers import UNet2DConditionModel

        try:
            kwargs["unet"] = UNet2DConditionModel.from_pretrained(unet, torch_dtype=dtype,
                                                                  local_files_only=is_local_ref(unet))
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"cannot load UNet {unet!r}: {err}") from err
    try:
        pipe = DiffusionPipeline.from_pretrained(base, torch_dtype=dtype, local_files_only=local_only, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load pipeline {base!r}: {err}") from err
    if hasattr(pipe, "safety_checker"):
        pipe.safety_checker = None
    if lora is not None:
        try:
            extra = {"weight_name": lora_weight_name} if lora_weight_name else {}
            pipe.load_lora_weights(lora, adapter_name="default", local_files_only=is_local_ref(lora), **extra)
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"cannot load LoRA {lora!r}: {err}") from err
        pipe.fuse_lora(lora_scale=lora_scale)
        pipe.unload_lora_weights()
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return cast(Pipeline, pipe)


def generate(
    pipe: Pipeline,
    requests: list[ImageRequest],
    *,
    steps: int,
    guidance: float,
    width: int,
    height: int,
    callback: Callable[[int, int], None] | None = None,
) -> list[np.ndarray]:
    """Run one pipeline call for all requests; returns uint8 RGB arrays (H, W, 3) in request order.

    `callback(step_index, num_steps)` is called after every denoising step; raising from it aborts the call (the
    worker uses that for cancellation).
    """
    generators = [torch.Generator(device="cpu").manual_seed(int(r.seed)) for r in requests]

    def on_step_end(_pipe: Any, i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if callback is not None:
            callback(i + 1, steps)
        return kwargs

    negatives = [r.negative_prompt for r in requests]
    out = pipe(
        prompt=[r.prompt for r in requests],
        negative_prompt=negatives if any(negatives) else None,
        num_inference_steps=steps,
        guidance_scale=guidance,
        width=width,
        height=height,
        generator=generators,
        output_type="np",
        callback_on_step_end=on_step_end,
    )
    return [np.clip(np.rint(im * 255.0), 0, 255).astype(np.uint8) for im in out.images]
