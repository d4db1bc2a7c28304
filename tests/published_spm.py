"""A tiny step-aware preference model file in the published layout, for the converter's and the trainer's tests.

Written from the published format's description (a `model.`-prefixed fp32 state dict of a time-conditioned CLIP,
gates that multiply and sit near 1, float `position_ids` buffers), over a tiny CLIP config in a folder that holds
the config, the tokenizer and a CLIP processor config (64 px).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import CLIPModel

from training.architectures import write_tokenizer
from training.spm import tiny_clip_config

MEAN, STD = [0.5, 0.45, 0.4], [0.27, 0.26, 0.28]


def write_published_spm(root: Path) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """(base folder, the .bin, its state dict) under `root`."""
    base = root / "base"
    tokenizer = write_tokenizer(base)
    torch.manual_seed(0)
    clip = CLIPModel(tiny_clip_config(tokenizer))
    clip.config.save_pretrained(base)
    (base / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 64},
        "crop_size": {"height": 64, "width": 64}, "image_mean": MEAN, "image_std": STD}))
    hidden, layers = 64, 4
    g = torch.Generator().manual_seed(1)

    def rnd(*shape: int, std: float = 0.05) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    state = {f"model.{k}": v.clone() for k, v in clip.state_dict().items()}
    state["model.vision_model.embeddings.position_ids"] = torch.arange(65, dtype=torch.float32)[None]
    state["model.text_model.embeddings.position_ids"] = torch.arange(clip.config.text_config.max_position_embeddings,
                                                                    dtype=torch.float32)[None]
    state.update({"model.t_embedder.mlp.0.weight": rnd(hidden, 256, std=0.1),
                  "model.t_embedder.mlp.0.bias": rnd(hidden),
                  "model.t_embedder.mlp.2.weight": rnd(hidden, hidden, std=0.1),
                  "model.t_embedder.mlp.2.bias": rnd(hidden)})
    for i in range(layers):
        bias = rnd(6 * hidden)
        bias[2 * hidden:3 * hidden] += 1.0  # trained gates sit near the published initialisation, 1
        bias[5 * hidden:] += 1.0
        state[f"model.vision_model.encoder.layers.{i}.adaLN_modulation.1.weight"] = rnd(6 * hidden, hidden)
        state[f"model.vision_model.encoder.layers.{i}.adaLN_modulation.1.bias"] = bias
    state["model.vision_model.adaLN_modulation.1.weight"] = rnd(2 * hidden, hidden)
    state["model.vision_model.adaLN_modulation.1.bias"] = rnd(2 * hidden)
    ckpt = root / "sd-v1-5_step-aware_preference_model.bin"
    torch.save(state, ckpt)
    return base, ckpt, state
