"""The stand-in for `UNet2DConditionModel` that compiled backends (ONNX Runtime, TensorRT) return.

diffusers pipelines call `unet(latents, t, encoder_hidden_states=..., added_cond_kwargs=..., return_dict=False)[0]`
and read `unet.config`, `unet.dtype`, `unet.device` and, for SDXL, `unet.add_embedding.linear_1.in_features`. This
class provides exactly that and turns the call into named input tensors; subclasses run them.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from service.worker.artifacts import ShapeProfile
from service.worker.backends.onnx_export import input_names


class EngineUNet:
    """A UNet-shaped front over an engine (ONNX Runtime session, TensorRT context); `run` is the engine call."""

    def __init__(self, unet: torch.nn.Module, profile: ShapeProfile, device: torch.device, dtype: torch.dtype) -> None:
        self.config = unet.config
        self.profile = profile
        self.device = device
        self.dtype = dtype
        self.names = input_names(profile)
        embedding: Any = getattr(unet, "add_embedding", None)
        if embedding is not None:  # SDXL's pipeline validates its time ids against this
            linear = embedding.linear_1
            self.add_embedding = SimpleNamespace(linear_1=SimpleNamespace(in_features=linear.in_features))

    def feeds(self, sample: torch.Tensor, timestep: torch.Tensor | float, encoder_hidden_states: torch.Tensor,
              added_cond_kwargs: dict | None) -> dict[str, torch.Tensor]:
        """Named, contiguous inputs in the engine's dtypes; raises ValueError outside the shape profile."""
        b, _, h, w = sample.shape
        self.profile.check(b, h, w)
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).to(torch.int64).expand(b)
        feeds = {"sample": sample, "timestep": t, "encoder_hidden_states": encoder_hidden_states}
        if self.profile.sdxl:
            if not added_cond_kwargs:
                raise ValueError("an SDXL UNet needs added_cond_kwargs (text_embeds, time_ids)")
            feeds["text_embeds"] = added_cond_kwargs["text_embeds"]
            feeds["time_ids"] = added_cond_kwargs["time_ids"]
        return {k: (feeds[k] if k == "timestep" else feeds[k].to(self.dtype)).contiguous() for k in self.names}

    def run(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor | float, encoder_hidden_states: torch.Tensor,
                 *args: Any, added_cond_kwargs: dict | None = None, return_dict: bool = True, **kwargs: Any) -> Any:
        out = self.run(self.feeds(sample, timestep, encoder_hidden_states, added_cond_kwargs)).to(sample.dtype)
        return SimpleNamespace(sample=out) if return_dict else (out,)
