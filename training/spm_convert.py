"""Convert a published step-aware preference model (the SPO authors' `*_step-aware_preference_model.bin`) into this
project's SPM folder (`StepAwarePreferenceModel.from_pretrained` loads it; `spo train spo --spm` takes it).

The published file is a torch-pickled fp32 state dict (DeepSpeed's zero-to-fp32 output) of a time-conditioned
`CLIPModel`, every key prefixed `model.`:

    model.<CLIPModel key>                                         vision_model.*, text_model.*, projections, logit_scale
    model.t_embedder.mlp.{0,2}.{weight,bias}                      -> time_embedding.mlp.{0,2}.*
    model.vision_model.encoder.layers.{i}.adaLN_modulation.1.*    -> layer_modulations.{i}.proj.*  (6 x hidden)
    model.vision_model.adaLN_modulation.1.*                       -> post_modulation.proj.*        (2 x hidden)
    model.*.embeddings.position_ids                               dropped (a buffer, sometimes stored as floats)

The published model multiplies each branch by its gate (`x + gate * branch`, gate bias initialised at 1); this
project's adaLN uses `x + (1 + gate) * branch` (identity at zero init, docs/spo.md §1). So the gate chunks of each
layer's bias (the 3rd and 6th of shift, scale, gate for attention, then for the MLP) lose 1; a plain rename would
leave every gate 1 too large. The file carries no config: the architecture comes from `--base` (PickScore_v1's
`config.json`), the tokenizer and image statistics from `--processor` (the CLIP-ViT-H-14-laion2B processor), and
the result records the published model's own resize (`SPMConfig.preprocessing = "reference"`), used whenever it
scores. Keys are checked both ways: a file that does not fit the base refuses to convert, naming the keys.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPConfig, CLIPTokenizer

from .spm import SPMConfig, StepAwarePreferenceModel, describe_keys

PREFIX = "model."
CONVERTED_FROM = "converted_from.json"
_LAYER = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.adaLN_modulation\.1\.(weight|bias)$")
_POST = re.compile(r"^vision_model\.adaLN_modulation\.1\.(weight|bias)$")
_TIME = re.compile(r"^t_embedder\.mlp\.([02])\.(weight|bias)$")
GATE_CHUNKS = (2, 5)  # of (shift, scale, gate) x (attention, MLP)


class SPMConversionError(ValueError):
    """The checkpoint, base config or processor cannot make an SPM; the message says which and why."""


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a torch-pickled state dict, read without executing pickled code."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:  # the legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(err):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise SPMConversionError(f"--ckpt {path}: not a readable torch checkpoint (truncated download?): "
                                 f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SPMConversionError(f"--ckpt {path}: expected a state dict (key -> tensor), got {type(obj).__name__}")
    return {str(k): v for k, v in obj.items()}


def spm_key(reference_key: str) -> str | None:
    """This project's name for a published key; None for a key that is dropped; the key itself when it lacks the
    `model.` prefix (it then shows up as unexpected)."""
    if not reference_key.startswith(PREFIX):
        return reference_key
    key = reference_key[len(PREFIX):]
    if key.endswith("embeddings.position_ids"):
        return None
    if m := _TIME.match(key):
        return f"time_embedding.mlp.{m[1]}.{m[2]}"
    if m := _LAYER.match(key):
        return f"layer_modulations.{m[1]}.proj.{m[2]}"
    if m := _POST.match(key):
        return f"post_modulation.proj.{m[1]}"
    return f"clip.{key}"


def reference_key(key: str) -> str:
    """The published name of one of this project's keys (for naming what a checkpoint lacks)."""
    if key.startswith("clip."):
        return PREFIX + key[len("clip."):]
    if m := re.match(r"^time_embedding\.mlp\.([02])\.(weight|bias)$", key):
        return f"{PREFIX}t_embedder.mlp.{m[1]}.{m[2]}"
    if m := re.match(r"^layer_modulations\.(\d+)\.proj\.(weight|bias)$", key):
        return f"{PREFIX}vision_model.encoder.layers.{m[1]}.adaLN_modulation.1.{m[2]}"
    if m := re.match(r"^post_modulation\.proj\.(weight|bias)$", key):
        return f"{PREFIX}vision_model.adaLN_modulation.1.{m[1]}"
    return key


def to_spm_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Renamed tensors with the gate biases shifted by -1, and new name -> published name."""
    out: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}
    for ref, tensor in state.items():
        key = spm_key(ref)
        if key is None:
            continue
        is_layer_bias = key.startswith("layer_modulations.") and key.endswith(".bias")
        if is_layer_bias and tensor.ndim == 1 and tensor.numel() % 6 == 0:
            tensor = tensor.detach().clone()
            hidden = tensor.numel() // 6
            for chunk in GATE_CHUNKS:
                tensor[chunk * hidden:(chunk + 1) * hidden] -= 1.0
        out[key], names[key] = tensor, ref
    return out, names


def _require_file(flag: str, ref: str, name: str, **hub_kwargs: Any) -> Path:
    """`name` in a local folder or a hub repo (cache included), or an error naming the flag."""
    from transformers.utils import cached_file

    try:
        path = cached_file(ref, name, **hub_kwargs)
    except (OSError, ValueError) as err:
        raise SPMConversionError(f"{flag} {ref}: no {name} ({str(err).splitlines()[0]})") from err
    if path is None:
        raise SPMConversionError(f"{flag} {ref}: no {name}")
    return Path(path)


def _processor_config(processor: str, **hub_kwargs: Any) -> dict[str, Any]:
    cfg = json.loads(_require_file("--processor", processor, "preprocessor_config.json", **hub_kwargs).read_text())
    return cfg.get("image_processor", cfg)


def _edge(value: Any, *names: str) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        for name in names:
            if isinstance(value.get(name), int):
                return int(value[name])
    raise SPMConversionError(f"--processor: cannot read a size from {value!r}")


def spm_config_for(state: dict[str, torch.Tensor], processor_cfg: dict[str, Any], image_size: int) -> SPMConfig:
    """What the converted SPM records: the file's timestep feature width, the processor's statistics and size, and
    the published model's own resize."""
    first = state.get("time_embedding.mlp.0.weight")
    frequency_dim = int(first.shape[1]) if first is not None and first.ndim == 2 else SPMConfig.frequency_dim
    short = _edge(processor_cfg.get("size", image_size), "shortest_edge", "height")
    crop = _edge(processor_cfg.get("crop_size", image_size), "height", "shortest_edge")
    if crop != image_size:
        raise SPMConversionError(f"--processor crops to {crop} px but the --base vision tower takes {image_size} px")
    mean, std = processor_cfg.get("image_mean"), processor_cfg.get("image_std")
    if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == 3):
        raise SPMConversionError("--processor: preprocessor_config.json lacks image_mean / image_std")
    return SPMConfig(time_conditioning=True, frequency_dim=frequency_dim, image_mean=tuple(mean),
                     image_std=tuple(std), preprocessing="reference", resize_to=short)


def load_reference_spm(ckpt: Path | str, base: str, processor: str | None = None,
                       **hub_kwargs: Any) -> StepAwarePreferenceModel:
    """The published SPM in `ckpt` as a `StepAwarePreferenceModel`, over `base`'s CLIP config and `processor`'s
    tokenizer and statistics (`processor` defaults to `base`: one folder holding both)."""
    from accelerate import init_empty_weights

    ckpt, processor = Path(ckpt), processor or base
    _require_file("--base", base, "config.json", **hub_kwargs)
    _require_file("--processor", processor, "vocab.json", **hub_kwargs)
    try:
        clip_config = CLIPConfig.from_pretrained(base, **hub_kwargs)
    except (OSError, ValueError) as err:
        raise SPMConversionError(f"--base {base}: no CLIP config ({err})") from err
    try:
        tokenizer = CLIPTokenizer.from_pretrained(processor, **hub_kwargs)
    except (OSError, ValueError, TypeError) as err:
        raise SPMConversionError(f"--processor {processor}: no CLIP tokenizer ({err})") from err
    processor_cfg = _processor_config(processor, **hub_kwargs)
    state, names = to_spm_state(read_checkpoint(ckpt))
    config = spm_config_for(state, processor_cfg, clip_config.vision_config.image_size)
    with init_empty_weights():  # no second copy of ~1B random weights: the file's tensors are assigned below
        model = StepAwarePreferenceModel.from_config(clip_config, tokenizer, config)
    expected = model.state_dict()
    missing = [reference_key(k) for k in expected if k not in state]
    unexpected = [names[k] for k in state if k not in expected]
    if missing or unexpected:
        raise SPMConversionError(f"--ckpt {ckpt} does not fit a step-aware CLIP of the --base config: "
                                 f"{describe_keys(missing, unexpected)}")
    wrong = [f"{names[k]} {tuple(v.shape)} (expected {tuple(expected[k].shape)})" for k, v in state.items()
             if tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        raise SPMConversionError(f"--ckpt {ckpt} does not fit the --base config: shapes differ for "
                                 f"{', '.join(wrong[:8])}" + (f" and {len(wrong) - 8} more" if len(wrong) > 8 else ""))
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True, assign=True)
    return model.eval()


def convert_spm(ckpt: Path | str, base: str, out: Path | str, processor: str | None = None,
                **hub_kwargs: Any) -> Path:
    """Write the SPM folder for a published checkpoint; returns `out`."""
    model = load_reference_spm(ckpt, base, processor, **hub_kwargs)
    out = model.save_pretrained(out)
    (out / CONVERTED_FROM).write_text(json.dumps(
        {"ckpt": str(Path(ckpt).name), "base": base, "processor": processor or base,
         "gate_bias_shift": -1.0, "spm_config": asdict(model.config)}, indent=2) + "\n")
    return out
