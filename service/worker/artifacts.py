"""The compiled-artifact cache: ONNX files and TensorRT engines keyed by everything that makes them valid.

An artifact is only valid for the exact fused weights (base + LoRA + scale), backend and version, device and shape
profile it was built for. The key is a digest of all of them; the entry's `meta.json` repeats every field and is
written last, so a half-written, stale or mismatched entry is never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ShapeProfile:
    """The input shapes an artifact must accept: batch range (CFG doubles the image batch) and latent sizes."""

    min_batch: int
    opt_batch: int
    max_batch: int
    latent_sizes: tuple[tuple[int, int], ...]  # (height, width) in latent pixels, e.g. ((8, 8), (16, 16))
    text_len: int
    text_dim: int
    sdxl: bool = False
    pooled_dim: int = 0
    time_ids: int = 6

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            batches = (self.min_batch, self.opt_batch, self.max_batch)
            raise ValueError(f"need 1 <= min_batch <= opt_batch <= max_batch, got {batches}")
        if not self.latent_sizes:
            raise ValueError("the profile needs at least one latent size")

    @property
    def min_hw(self) -> tuple[int, int]:
        return min(h for h, _ in self.latent_sizes), min(w for _, w in self.latent_sizes)

    @property
    def max_hw(self) -> tuple[int, int]:
        return max(h for h, _ in self.latent_sizes), max(w for _, w in self.latent_sizes)

    def check(self, batch: int, height: int, width: int) -> None:
        """Raise ValueError when an input falls outside what the artifact was built for."""
        if not self.min_batch <= batch <= self.max_batch:
            raise ValueError(f"batch {batch} is outside the engine profile [{self.min_batch}, {self.max_batch}]")
        (h0, w0), (h1, w1) = self.min_hw, self.max_hw
        if not (h0 <= height <= h1 and w0 <= width <= w1):
            raise ValueError(f"latent size {height}x{width} is outside the engine profile {h0}x{w0}..{h1}x{w1}")


def profile_for(unet_config: Any, sizes: list[tuple[int, int]], max_images: int, text_len: int,
                vae_factor: int = 8) -> ShapeProfile:
    """The profile a served model needs: UNet batch 1..2*max_images (CFG), every allowed image size (W, H)."""
    cfg = unet_config
    sdxl = getattr(cfg, "addition_embed_type", None) == "text_time"
    pooled = (cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim) if sdxl else 0
    latent = tuple(sorted({(h // vae_factor, w // vae_factor) for w, h in sizes}))
    return ShapeProfile(min_batch=1, opt_batch=min(2, 2 * max_images), max_batch=2 * max_images, latent_sizes=latent,
                        text_len=text_len, text_dim=cfg.cross_attention_dim, sdxl=sdxl, pooled_dim=pooled)


def weights_digest(state_dict: dict[str, Any]) -> str:
    """Digest of the fused UNet weights: names, dtypes, shapes and bytes (what the artifact actually contains)."""
    import torch

    h = hashlib.blake2b(digest_size=16)
    for name in sorted(state_dict):
        t = state_dict[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class ArtifactKey:
    weights: str
    backend: str
    backend_version: str
    device: str  # e.g. "cpu" or the GPU name ("NVIDIA H100 80GB HBM3")
    profile: ShapeProfile
    options: dict[str, Any] = field(default_factory=dict)  # fp16, opset, ...

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["profile"]["latent_sizes"] = [list(s) for s in self.profile.latent_sizes]
        return d

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:24]


class ArtifactCache:
    """`root/<backend>/<digest>/` folders; `meta.json` (written last) must equal the key for an entry to count."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser()

    def path(self, key: ArtifactKey) -> Path:
        return self.root / key.backend / key.digest

    def lookup(self, key: ArtifactKey) -> Path | None:
        entry = self.path(key)
        try:
            meta = json.loads((entry / "meta.json").read_text())
        except (OSError, ValueError):
            return None
        return entry if meta == json.loads(json.dumps(key.as_dict())) else None

    @contextmanager
    def building(self, key: ArtifactKey) -> Iterator[Path]:
        """A scratch folder to build into; moved into place with its meta.json only if the block succeeds."""
        self.root.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".build-{key.digest}-", dir=self.root))
        try:
            yield scratch
            (scratch / "meta.json").write_text(json.dumps(key.as_dict(), indent=2, sort_keys=True))
            final = self.path(key)
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():
                shutil.rmtree(final)
            os.replace(scratch, final)
        finally:
            if scratch.exists():
                shutil.rmtree(scratch, ignore_errors=True)


def default_cache_dir() -> Path:
    """Where compiled artifacts live unless a caller says otherwise (`SPO_ENGINE_CACHE`)."""
    from service.contracts.config import Settings

    return Settings().engine_cache.expanduser()
