"""The served-model manifest: which models exist, where their weights are, and what requests they accept.

A YAML file with a `models:` list. The API validates requests against it (without importing torch) and the worker
loads weights from it, so the tiny local models and the published hub checkpoints go through the same code path.

    models:
      - name: spo-tiny
        kind: sd15                    # sd15 | sdxl
        base: ./spo-tiny              # local diffusers folder (relative to this file) or a hub id "org/name"
        lora: null                    # optional LoRA (local path or hub id), fused into the UNet at load
        weight_name: null             # the LoRA's file in that folder / hub repo, when not pytorch_lora_weights.*
        lora_scale: 1.0
        unet: null                    # optional UNet folder replacing the base's (a full fine-tune)
        vae: null                     # optional VAE override, e.g. madebyollin/sdxl-vae-fp16-fix
        defaults: {steps: 20, guidance: 5.0, size: 64x64}
        sizes: [64x64]                # allowed "WxH", multiples of 8
        max_n: 4
        max_steps: 50
        guidance_range: [0.0, 20.0]
        backend: torch                # UNet backend (service/worker/backends)
        dtype: float32                # float32 | float16 | bfloat16
        device: cpu

Only name, kind and base are required. For a local base, a missing `defaults.size` is the model's native size (UNet
sample size x VAE factor, read from its config files) and missing `sizes` is just that size, so the entry that
`spo train spo` writes next to a LoRA is servable as it is.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from service.contracts.sizes import parse_size  # noqa: F401 - re-exported: the manifest's size rules

HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class ManifestError(ValueError):
    """The manifest file is missing, not YAML, or describes an invalid model."""


class Defaults(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(20, ge=1)
    guidance: float = 5.0
    size: str

    @field_validator("size")
    @classmethod
    def _size(cls, value: str) -> str:
        parse_size(value)
        return value


# The UNet backends a manifest may name (service/worker/backends implements each; a test keeps the two in step).
KNOWN_BACKENDS = ("torch", "compile", "onnxruntime", "tensorrt")
VAE_DECODER_BACKENDS = ("onnxruntime", "compile")  # those implementing prepare_vae_decoder
CUDA_GRAPH_BACKENDS = ("compile", "tensorrt")  # those that can replay a static shape from a CUDA graph


class ModelSpec(BaseModel):
    """One served model. `base`, `lora` and `vae` are absolute paths or hub ids once loaded by `load_manifest`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_RE)
    kind: Literal["sd15", "sdxl"]
    base: str
    lora: str | None = None
    weight_name: str | None = Field(None, description="the LoRA's file name inside `lora` (a folder or hub repo) "
                                                       "when it is not diffusers' pytorch_lora_weights.safetensors")
    lora_scale: float = 1.0
    unet: str | None = None
    vae: str | None = None
    defaults: Defaults
    sizes: list[str]
    max_n: int = Field(4, ge=1)
    max_steps: int = Field(50, ge=1)
    guidance_range: tuple[float, float] = (0.0, 20.0)
    backend: str = "torch"
    compile_vae_decoder: bool = Field(False, description="run the VAE decoder on the backend too")
    cuda_graphs: bool = Field(False, description="replay each (batch, size) from a CUDA graph (compile: mode "
                                                 "reduce-overhead; tensorrt: one graph per shape); CUDA only")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = "cpu"
    description: str = ""

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("list at least one allowed size")
        for size in value:
            parse_size(size)
        return value

    @field_validator("backend")
    @classmethod
    def _backend(cls, value: str) -> str:
        if value not in KNOWN_BACKENDS:
            raise ValueError(f"unknown UNet backend {value!r}; available: {', '.join(KNOWN_BACKENDS)}")
        return value

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> ModelSpec:
        low, high = self.guidance_range
        if low > high:
            raise ValueError(f"guidance_range {list(self.guidance_range)} is empty")
        if self.defaults.size not in self.sizes:
            raise ValueError(f"defaults.size {self.defaults.size!r} is not one of sizes {self.sizes}")
        if self.defaults.steps > self.max_steps:
            raise ValueError(f"defaults.steps {self.defaults.steps} exceeds max_steps {self.max_steps}")
        if not low <= self.defaults.guidance <= high:
            raise ValueError(f"defaults.guidance {self.defaults.guidance} is outside guidance_range")
        if self.compile_vae_decoder and self.backend not in VAE_DECODER_BACKENDS:
            raise ValueError(f"compile_vae_decoder needs backend {' or '.join(VAE_DECODER_BACKENDS)}, "
                             f"not {self.backend!r}")
        if self.weight_name is not None and self.lora is None:
            raise ValueError("weight_name names a file of the LoRA: give lora too")
        if self.weight_name is not None and ("/" in self.weight_name or not self.weight_name.endswith(
                (".safetensors", ".bin"))):
            raise ValueError(f"weight_name {self.weight_name!r} must be a .safetensors or .bin file name in the LoRA "
                             f"folder or repo")
        if self.cuda_graphs and self.backend not in CUDA_GRAPH_BACKENDS:
            raise ValueError(f"cuda_graphs needs backend {' or '.join(CUDA_GRAPH_BACKENDS)}, not {self.backend!r}")
        return self

    def tokenizer_source(self) -> tuple[str, str | None]:
        """(path or hub id, subfolder) of the CLIP tokenizer the API counts prompt tokens with."""
        if is_local_ref(self.base):
            return str(Path(self.base) / "tokenizer"), None
        return self.base, "tokenizer"


class _ManifestFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[ModelSpec]


@dataclass(frozen=True)
class Manifest:
    path: Path
    models: dict[str, ModelSpec]

    @property
    def names(self) -> list[str]:
        return list(self.models)

    def get(self, name: str) -> ModelSpec:
        try:
            return self.models[name]
        except KeyError:
            raise ManifestError(f"model {name!r} is not in {self.path} (known: {', '.join(self.models)})") from None

    def select(self, names: list[str]) -> list[ModelSpec]:
        """The specs for `names`, or every model when `names` is empty."""
        return [self.get(n) for n in names] if names else list(self.models.values())


def is_local_ref(ref: str, root: Path = Path(".")) -> bool:
    """Whether a model reference names a local path rather than a hub id: `./x`, `../x`, `/x` and `~/x` always do,
    anything else (`org/name`) only when a file or folder of that name exists under `root`."""
    return ref.startswith(("./", "../", "/", "~")) or ref in (".", "..") or (root / Path(ref).expanduser()).exists()


def resolve_ref(ref: str, root: Path) -> str:
    """A local path (absolute, or relative to the manifest's folder) becomes absolute; a hub id stays as it is.

    `./x`, `../x`, `/x` and `~/x` are always local; `org/name` is a hub id unless a folder of that name exists.
    """
    if is_local_ref(ref, root):
        return str((root / Path(ref).expanduser()).resolve())
    if HUB_ID_RE.match(ref):
        return ref
    raise ValueError(f"{ref!r} is neither a local path (start it with ./ or /) nor a hub id like 'org/name'")


def native_size(base: Path) -> str | None:
    """'WxH' a local diffusers folder generates by default (UNet sample size x VAE downsampling), if readable."""
    try:
        unet = json.loads((base / "unet" / "config.json").read_text())
        vae = json.loads((base / "vae" / "config.json").read_text())
        side = int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, KeyError, TypeError, ValueError):
        return None
    return f"{side}x{side}"


def _prepare(raw: dict, root: Path) -> dict:
    """Resolve local paths and fill size defaults from a local base, before validation."""
    raw = dict(raw)
    for field in ("base", "lora", "unet", "vae"):
        if isinstance(raw.get(field), str):
            raw[field] = resolve_ref(raw[field], root)
    defaults = dict(raw.get("defaults") or {})
    if "size" not in defaults:
        sizes = raw.get("sizes")
        base = raw.get("base")
        inferred = native_size(Path(base)) if isinstance(base, str) and is_local_ref(base) else None
        size = sizes[0] if isinstance(sizes, list) and sizes else inferred
        if size is None:
            raise ValueError("give defaults.size and sizes (they can only be inferred from a local base)")
        defaults["size"] = size
    raw["defaults"] = defaults
    raw.setdefault("sizes", [defaults["size"]])
    return raw


def load_manifest(path: str | Path) -> Manifest:
    """Parse and validate a manifest file; errors name the model and field at fault."""
    path = Path(path).expanduser().resolve()
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ManifestError(f"cannot read manifest {path}: {err}") from err
    except yaml.YAMLError as err:
        raise ManifestError(f"manifest {path} is not valid YAML: {err}") from err
    if isinstance(raw, dict) and isinstance(raw.get("models"), list):
        prepared = []
        for i, entry in enumerate(raw["models"]):
            if not isinstance(entry, dict):
                prepared.append(entry)  # validation below reports it
                continue
            try:
                prepared.append(_prepare(entry, path.parent))
            except ValueError as err:
                raise ManifestError(f"invalid manifest {path}: models.{i} ({entry.get('name')}): {err}") from None
        raw = {**raw, "models": prepared}
    try:
        parsed = _ManifestFile.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors(include_url=False))
        raise ManifestError(f"invalid manifest {path}: {problems}") from None
    models: dict[str, ModelSpec] = {}
    for spec in parsed.models:
        if spec.name in models:
            raise ManifestError(f"invalid manifest {path}: model {spec.name!r} is listed twice")
        models[spec.name] = spec
    if not models:
        raise ManifestError(f"invalid manifest {path}: no models listed")
    return Manifest(path=path, models=models)
