"""The step-aware preference model (SPM): a CLIP dual encoder whose vision tower is told the denoising step.

SPO (docs/spo.md §1) compares candidate images in the middle of sampling, when all it has is the model's predicted
clean image x0 at step t: blurry and noisy early on, sharp at the end. A plain preference model (PickScore) only ever
saw clean images, so the SPM conditions the vision tower on t with DiT-style adaLN (Peebles & Xie 2023):

    t -> 256-d sinusoidal -> Linear-SiLU-Linear -> c (hidden size)
    every vision layer:  (shift, scale, gate) x {attention, MLP} = Linear(SiLU(c)) -> 6 * hidden
                         x = x + (1 + gate) * branch(LN(x) * (1 + scale) + shift)
    pooled output:       post_LN(pooled) * (1 + scale) + shift

The CLIP layer norms keep their pretrained affine parameters and the modulation acts on top of them. All modulation
projections start at exactly zero (weights and biases), and the gate enters as (1 + gate), so at initialisation every
modulated layer *is* the plain CLIP layer and the SPM's scores equal the CLIP / PickScore checkpoint's for any t.
(Zero-initialising a DiT-style multiplicative gate would instead switch every branch off.)

Score = logit_scale.exp() * cos(image embedding, text embedding), as in PickScore. A saved SPM folder is a regular
CLIPModel folder (`CLIPModel.from_pretrained` reads its CLIP part) plus `time_conditioning.safetensors` and
`spm_config.json`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TIME_WEIGHTS = "time_conditioning.safetensors"
SPM_CONFIG = "spm_config.json"


# --------------------------------------------------------------------------------------------------------- configs

def vit_h14_config() -> CLIPConfig:
    """CLIP ViT-H/14 (laion2B), the backbone of PickScore_v1 and of the reference SPMs for SD 1.5 and SDXL (~986M)."""
    return CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                         num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", bos_token_id=49406,
                         eos_token_id=49407, pad_token_id=1),
        vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                           image_size=224, patch_size=14, hidden_act="gelu"),
        projection_dim=1024,
    )


def tiny_clip_config(tokenizer: CLIPTokenizer) -> CLIPConfig:
    """A CLIP for the 64x64 shapes world: 8x8 patches, 4 vision layers, 2 text layers, width 64 (~0.4M params).

    The logit scale starts at 100, the trained value of CLIP / PickScore ("about 100 x cosine", docs/spo.md §1), not at
    CLIP's from-scratch 1/0.07: with 14 x cosine a fresh tower's near-equal scores give the pairwise loss a weak
    signal, and it learns clear preferences about twice as slowly (tests/test_spm_learning.py).
    """
    return CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
                         hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                           image_size=64, patch_size=8, hidden_act="quick_gelu"),
        projection_dim=64, logit_scale_init_value=math.log(100.0),
    )


@dataclass(frozen=True)
class SPMConfig:
    """What the SPM adds to a CLIP config (stored next to it as `spm_config.json`)."""

    time_conditioning: bool = True  # False: the plain CLIP model (the "no timestep conditioning" ablation)
    frequency_dim: int = 256  # sinusoidal timestep features
    max_period: float = 10_000.0
    num_train_timesteps: int = 1000  # the diffusion model's t range, for the record
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    # How images become the tower's input (`preprocess`). "antialiased": this project's, like CLIP's PIL processor.
    # "reference": the published SPMs' own (bicubic without antialias, their rounding); a converted SPM records it,
    # since its scores were learned through that resize and move by up to 3 logits under the other one.
    preprocessing: str = "antialiased"
    resize_to: int = 0  # short side before the centre crop; 0: the vision tower's image size


PREPROCESSING = ("antialiased", "reference")


# --------------------------------------------------------------------------------------------------------- modules

def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """DiT/ADM sinusoidal features of (possibly fractional) timesteps: [cos(t f_k), sin(t f_k)], k < dim/2."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    """t -> sinusoidal features -> Linear-SiLU-Linear -> the vision tower's hidden size."""

    def __init__(self, hidden: int, frequency_dim: int = 256, max_period: float = 10_000.0) -> None:
        super().__init__()
        self.frequency_dim, self.max_period = frequency_dim, max_period
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        for layer in (self.mlp[0], self.mlp[2]):  # DiT's initialisation
            assert isinstance(layer, nn.Linear)
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = timestep_features(t, self.frequency_dim, self.max_period)
        return self.mlp(features.to(next(self.mlp.parameters()).dtype))


class AdaLNModulation(nn.Module):
    """SiLU -> Linear(hidden -> n * hidden), zero-initialised: n modulation vectors that all start at 0."""

    def __init__(self, hidden: int, n: int) -> None:
        super().__init__()
        self.n = n
        self.proj = nn.Linear(hidden, n * hidden)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.proj(F.silu(c))[:, None, :].chunk(self.n, dim=-1)  # each (N, 1, hidden): broadcast over tokens


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def modulated_layer(layer: Any, h: torch.Tensor, mod: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """A transformers `CLIPEncoderLayer` with adaLN: its own weights, plus shift/scale/gate for each branch."""
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod
    attn, _ = layer.self_attn(hidden_states=modulate(layer.layer_norm1(h), shift_a, scale_a), attention_mask=None)
    h = h + (1 + gate_a) * attn
    return h + (1 + gate_m) * layer.mlp(modulate(layer.layer_norm2(h), shift_m, scale_m))


# --------------------------------------------------------------------------------------------------------- model

class StepAwarePreferenceModel(nn.Module):
    """CLIP + timestep-conditioned vision tower. `score(images, prompts, timesteps)` is what SPO calls."""

    image_mean: torch.Tensor  # buffers: CLIP's normalisation
    image_std: torch.Tensor

    def __init__(self, clip: CLIPModel, tokenizer: CLIPTokenizer, config: SPMConfig = SPMConfig()) -> None:
        super().__init__()
        self.clip, self.tokenizer, self.config = clip, tokenizer, config
        self.gradient_checkpointing = False
        vision = clip.config.vision_config
        hidden = vision.hidden_size
        if config.time_conditioning:
            self.time_embedding = TimestepEmbedding(hidden, config.frequency_dim, config.max_period)
            self.layer_modulations = nn.ModuleList(AdaLNModulation(hidden, 6) for _ in range(vision.num_hidden_layers))
            self.post_modulation = AdaLNModulation(hidden, 2)
        self.register_buffer("image_mean", torch.tensor(config.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(config.image_std).view(1, 3, 1, 1), persistent=False)

    # -- construction -------------------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, clip_config: CLIPConfig, tokenizer: CLIPTokenizer, config: SPMConfig = SPMConfig()
                    ) -> StepAwarePreferenceModel:
        """Random CLIP weights (the toy trains its CLIP from scratch)."""
        return cls(CLIPModel(clip_config), tokenizer, config)

    @classmethod
    def from_clip(cls, path: Path | str, config: SPMConfig = SPMConfig(), tokenizer: Path | str | None = None,
                  **load_kwargs: Any) -> StepAwarePreferenceModel:
        """Wrap a CLIP / PickScore checkpoint folder; the new time modules start as the identity.

        PickScore_v1's folder has no tokenizer (it uses laion/CLIP-ViT-H-14's processor): pass that folder as
        `tokenizer`. Normalisation constants come from a `preprocessor_config.json` when one is there.
        """
        path = Path(path)
        clip = load_clip_strict(path, **load_kwargs)
        tok_path = Path(tokenizer) if tokenizer is not None else path
        mean, std = _image_stats(tok_path) or _image_stats(path) or (config.image_mean, config.image_std)
        config = SPMConfig(**{**asdict(config), "image_mean": tuple(mean), "image_std": tuple(std)})
        return cls(clip, CLIPTokenizer.from_pretrained(tok_path), config)

    @classmethod
    def from_pretrained(cls, path: Path | str, **load_kwargs: Any) -> StepAwarePreferenceModel:
        """Load a folder written by `save_pretrained` (what the SPO trainer calls)."""
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / SPM_CONFIG).is_file():
            raise FileNotFoundError(f"no SPM at {path} ({SPM_CONFIG} missing)")
        raw = json.loads((path / SPM_CONFIG).read_text())
        config = SPMConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})  # type: ignore[arg-type]
        if config.preprocessing not in PREPROCESSING:
            raise ValueError(f"{path / SPM_CONFIG}: preprocessing must be one of {PREPROCESSING}, "
                             f"got {config.preprocessing!r}")
        model = cls(load_clip_strict(path, **load_kwargs), CLIPTokenizer.from_pretrained(path), config)
        if config.time_conditioning:
            state = load_file(path / TIME_WEIGHTS)
            missing, unexpected = model.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.startswith("clip.")]
            if missing or unexpected:
                raise ValueError(f"{path / TIME_WEIGHTS}: missing {missing}, unexpected {unexpected}")
            model.to(model.clip.dtype)
        return model

    def save_pretrained(self, path: Path | str) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.clip.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        if self.config.time_conditioning:
            state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()
                     if not k.startswith("clip.")}
            save_file(state, path / TIME_WEIGHTS)
        (path / SPM_CONFIG).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        return path

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in the backward pass (ViT-H at batch 16 per GPU needs it, docs/spo.md §4)."""
        self.gradient_checkpointing = True
        self.clip.activation_checkpointing_enable()

    def time_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("clip.")]

    # -- inputs -------------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.clip.logit_scale.device

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(list(prompts), padding="max_length", truncation=True, return_tensors="pt",
                              max_length=self.tokenizer.model_max_length).input_ids.to(self.device)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (N, 3, H, W), e.g. a decoded x0 prediction -> CLIP input, differentiably.

        As CLIP's processor: bicubic resize of the short side, centre crop to the tower's size, clamp to [0, 1] (the
        processor works on uint8), normalise. The resize is the one the config names (`SPMConfig.preprocessing`).
        """
        size = self.clip.config.vision_config.image_size
        short = self.config.resize_to or size
        x = images.float()
        if self.config.preprocessing == "reference":
            x = reference_resize_crop(x, short, size)
        else:
            h, w = x.shape[-2:]
            if (h, w) != (size, size):
                s = short / min(h, w)
                nh, nw = max(size, round(h * s)), max(size, round(w * s))
                x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
                top, left = (nh - size) // 2, (nw - size) // 2
                x = x[..., top:top + size, left:left + size]
        x = (x.clamp(0.0, 1.0) - self.image_mean) / self.image_std
        return x.to(self.clip.dtype)

    # -- towers -------------------------------------------------------------------------------------------------

    def image_embeddings(self, pixel_values: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Projected (unnormalised) image embeddings of CLIP-normalised pixels at the given timesteps."""
        vision = self.clip.vision_model
        if not self.config.time_conditioning:
            return self.clip.visual_projection(vision(pixel_values=pixel_values).pooler_output)
        c = self.time_embedding(timesteps.to(pixel_values.device))
        h = vision.pre_layrnorm(vision.embeddings(pixel_values))
        for layer, modulation in zip(vision.encoder.layers, self.layer_modulations, strict=True):
            if self.gradient_checkpointing and self.training:
                h = torch.utils.checkpoint.checkpoint(
                    lambda h_, c_, layer=layer, modulation=modulation: modulated_layer(layer, h_, modulation(c_)),
                    h, c, use_reentrant=False)
            else:
                h = modulated_layer(layer, h, modulation(c))
        shift, scale = self.post_modulation(c)
        pooled = modulate(vision.post_layernorm(h[:, :1]), shift, scale)[:, 0]
        return self.clip.visual_projection(pooled)

    def text_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        pooled = self.clip.text_model(input_ids=input_ids).pooler_output
        return self.clip.text_projection(pooled)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Scores (N,) of images in [0, 1] against texts; with M texts, image i is scored against text i % M.

        `timesteps`: one per image (N), one per text (M, repeated like the texts) or a single int.

        Passing [images_0; images_1] with the M captions once saves a second pass of the text tower in training.
        """
        n, m = images.shape[0], input_ids.shape[0]
        if n % m:
            raise ValueError(f"{n} images cannot be matched to {m} texts")
        timesteps = torch.as_tensor(timesteps, device=images.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(n)
        elif timesteps.shape[0] == m:  # one timestep per text, like the texts
            timesteps = timesteps.repeat(n // m)
        img = F.normalize(self.image_embeddings(self.preprocess(images), timesteps).float(), dim=-1)
        txt = F.normalize(self.text_embeddings(input_ids).float(), dim=-1).repeat(n // m, 1)
        return self.clip.logit_scale.exp().float() * (img * txt).sum(-1)

    def score(self, images: torch.Tensor, prompts: list[str], timesteps: torch.Tensor | int) -> torch.Tensor:
        """PickScore-style scores (about 100 x cosine) of images in [0, 1] (N, 3, H, W) for their prompts at step t."""
        return self(images, self.tokenize(prompts), timesteps)


def reference_resize_crop(x: torch.Tensor, short: int, crop: int) -> torch.Tensor:
    """The published SPMs' resize: bicubic without antialias of the short side to `short` (sides rounded as
    `int(x * s + 0.5)`), then a `crop` centre crop whose offsets round half to even (only non-square images move)."""
    h, w = x.shape[-2:]
    s = short / min(h, w)
    nh, nw = int(h * s + 0.5), int(w * s + 0.5)
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=False)
    if nh < crop or nw < crop:
        raise ValueError(f"a {h}x{w} image resized to {nh}x{nw} is smaller than the {crop} px crop")
    top, left = round((nh - crop) / 2), round((nw - crop) / 2)  # Python's round: half to even
    return x[..., top:top + crop, left:left + crop]


class CheckpointKeyError(ValueError):
    """A checkpoint's tensors do not fit the model: never silently left at their random initialisation."""


def describe_keys(missing: list[str], unexpected: list[str], limit: int = 8) -> str:
    """'3 missing keys (a, b, c); 1 unexpected key (d)': what a key-mismatch error names."""
    parts = []
    for what, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            shown = ", ".join(sorted(keys)[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
            parts.append(f"{len(keys)} {what} key{'s' if len(keys) > 1 else ''} ({shown})")
    return "; ".join(parts)


def load_clip_strict(path: Path | str, **load_kwargs: Any) -> CLIPModel:
    """`CLIPModel.from_pretrained` that refuses a checkpoint whose keys do not match (transformers only warns and
    leaves those tensors random: a published SPM file renamed `pytorch_model.bin` would score around 0)."""
    clip, info = CLIPModel.from_pretrained(path, output_loading_info=True, **load_kwargs)
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
    unexpected = [k for k in info.get("unexpected_keys", []) if not k.endswith("position_ids")]
    mismatched = [str(k[0] if isinstance(k, (tuple, list)) else k) for k in info.get("mismatched_keys", [])]
    if missing or unexpected or mismatched:
        hint = ""
        if any(k.startswith("model.") for k in unexpected):
            hint = (" This looks like a published step-aware preference model file: convert it with "
                    "`spo convert spm --ckpt FILE --base PICKSCORE --processor CLIP_PROCESSOR --out DIR`.")
        detail = describe_keys(missing, unexpected)
        if mismatched:
            detail += ("; " if detail else "") + f"shape mismatch for {', '.join(mismatched[:8])}"
        raise CheckpointKeyError(f"{path}: the CLIP checkpoint does not match its config: {detail}.{hint}")
    return clip


def _image_stats(folder: Path) -> tuple[list[float], list[float]] | None:
    f = folder / "preprocessor_config.json"
    if not f.is_file():
        return None
    cfg = json.loads(f.read_text())
    cfg = cfg.get("image_processor", cfg)
    if "image_mean" in cfg and "image_std" in cfg:
        return cfg["image_mean"], cfg["image_std"]
    return None


def build_spm(preset: str, *, init: Path | str | None = None, tokenizer: Path | str | None = None,
              time_conditioning: bool = True) -> StepAwarePreferenceModel:
    """The SPM a training preset starts from.

    `tiny`: a fresh tiny CLIP with the shapes world's tokenizer (nothing to download; trained from scratch).
    `sd15` / `sdxl`: the PickScore_v1 (CLIP ViT-H/14) architecture; `init` is the checkpoint folder to wrap (without
    it the weights are random, which is only useful for checking the architecture). A time-conditioned SPM as `init`
    is continued as it is, time modules included; for the no-time ablation its CLIP part is wrapped.
    """
    config = SPMConfig(time_conditioning=time_conditioning)
    if init is not None and time_conditioning and (Path(init) / TIME_WEIGHTS).is_file():
        return StepAwarePreferenceModel.from_pretrained(init)  # an SPM: continued, its time conditioning included
    if init is not None:
        return StepAwarePreferenceModel.from_clip(init, config, tokenizer=tokenizer)
    if preset == "tiny":
        import tempfile

        from .architectures import write_tokenizer

        with tempfile.TemporaryDirectory() as tmp:
            tok = CLIPTokenizer.from_pretrained(tokenizer) if tokenizer else write_tokenizer(Path(tmp))
        return StepAwarePreferenceModel.from_config(tiny_clip_config(tok), tok, config)
    if preset in ("sd15", "sdxl"):
        if tokenizer is None:
            raise ValueError("a random ViT-H/14 SPM needs a CLIP tokenizer folder (--tokenizer)")
        return StepAwarePreferenceModel.from_config(vit_h14_config(), CLIPTokenizer.from_pretrained(tokenizer), config)
    raise ValueError(f"unknown preset {preset!r}")
