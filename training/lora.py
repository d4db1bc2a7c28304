"""LoRA fine-tuning of a diffusers UNet: the adapter, the frozen reference it is measured against, checkpoint hooks
that store only the adapter, and the servable outputs (weights, manifest entry, snapshots).

Shared by the SPO and Diffusion-DPO trainers so that both train the same adapter and produce the same outputs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from accelerate import Accelerator
    from diffusers import UNet2DConditionModel

    from service.worker.pipeline import Pipeline


def add_lora(unet: UNet2DConditionModel, rank: int, targets: tuple[str, ...],
             weight_dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    """Freeze the UNet (in `weight_dtype`: half precision on GPU, as diffusers' LoRA scripts) and add a LoRA that
    trains in fp32; returns the trainable parameters as a list (clipping must see them after the optimizer)."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.to(dtype=weight_dtype)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(targets)))
    params = [q for q in unet.parameters() if q.requires_grad]
    for q in params:
        q.data = q.data.float()
    return params


class reference_model:  # noqa: N801 - used as a context manager, reads like a phrase
    """Within this block the UNet is the frozen reference: LoRA adapters disabled (no second UNet in memory), or
    `ref_unet` (a frozen copy) for a full fine-tune."""

    def __init__(self, unet: UNet2DConditionModel, lora: bool, ref_unet: UNet2DConditionModel | None = None) -> None:
        self.unet, self.lora, self.ref_unet = unet, lora, ref_unet

    def __enter__(self) -> UNet2DConditionModel:
        if self.lora:
            self.unet.disable_adapters()
            return self.unet
        assert self.ref_unet is not None, "a full fine-tune needs its reference UNet"
        return self.ref_unet

    def __exit__(self, *exc: object) -> None:
        if self.lora:
            self.unet.enable_adapters()


def register_lora_state_hooks(accelerator: Accelerator) -> None:
    """Checkpoints hold only the LoRA (fp32) with the optimizer state, not a copy of the frozen UNet (GBs for SDXL)."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    def save_hook(models: list[torch.nn.Module], weights: list[dict[str, Any]], output_dir: str) -> None:
        if accelerator.is_main_process:
            lora = get_peft_model_state_dict(accelerator.unwrap_model(models[0]))
            save_file({k: v.detach().cpu().contiguous() for k, v in lora.items()},
                      Path(output_dir) / "lora.safetensors")
        weights.clear()  # nothing else of the model goes into the checkpoint

    def load_hook(models: list[torch.nn.Module], input_dir: str) -> None:
        model = models.pop()
        result = set_peft_model_state_dict(accelerator.unwrap_model(model),
                                           load_file(Path(input_dir) / "lora.safetensors"))
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"checkpoint {input_dir} does not match this LoRA: {result.unexpected_keys[:3]} ...")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_weights(pipe: Pipeline, unet: UNet2DConditionModel, folder: Path, full_unet: bool) -> None:
    """The trained weights alone: a diffusers LoRA (`pipe.load_lora_weights(folder)`) or `folder/unet`."""
    if full_unet:
        unet.save_pretrained(folder / "unet")
        return
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    type(pipe).save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)  # type: ignore[attr-defined]


def save_result(pipe: Pipeline, unet: UNet2DConditionModel, out: Path, full_unet: bool, base: Path,
                kind: str, config: dict[str, Any], config_name: str) -> None:
    """A diffusers-format LoRA (or a UNet folder), the served-model manifest entry that serves it, and the run's
    config: what `spo serve` needs, the same for every fine-tuning method."""
    import yaml

    name = out.name
    save_weights(pipe, unet, out, full_unet)
    entry: dict[str, Any] = {"name": name, "kind": kind, "base": str(base)}
    entry.update({"unet": str(out / "unet")} if full_unet else {"lora": str(out), "lora_scale": 1.0})
    (out / config_name).write_text(json.dumps(config, indent=2) + "\n")
    (out / "manifest_entry.yaml").write_text(yaml.safe_dump({"models": [entry]}, sort_keys=False))


def save_snapshot(pipe: Pipeline, unet: UNet2DConditionModel, out: Path, step: int, train_seconds: float,
                  full_unet: bool = False) -> Path:
    """The weights as they are after `step` with the training seconds spent to get there: the points of a
    gain-versus-compute curve (`benchmarks/compute_to_gain.py`)."""
    folder = out / "snapshots" / f"{step:06d}"
    save_weights(pipe, unet, folder, full_unet)
    (folder / "snapshot.json").write_text(json.dumps({"step": step, "train_seconds": round(train_seconds, 1)}) + "\n")
    return folder


def pipeline_kind(pipe: Pipeline) -> str:
    """"sdxl" or "sd15": the manifest's `kind` of a pipeline."""
    from diffusers import StableDiffusionXLPipeline

    return "sdxl" if isinstance(pipe, StableDiffusionXLPipeline) else "sd15"
