import json

import pytest
import torch
from safetensors.torch import load_file

from training.presets import BASE_PRESETS as PRESETS
from training.train_base import train_base


def _weights(folder):
    out = {}
    for part in ("unet", "text_encoder", "vae"):
        for f in (folder / part).glob("*.safetensors"):
            out.update({f"{part}.{k}": v for k, v in load_file(f).items()})
    return out


def test_same_command_and_seed_give_the_same_weights(tmp_path, smoke_model):
    again = train_base("smoke", tmp_path / "again", seed=0)
    a, b = _weights(smoke_model), _weights(again)
    assert a.keys() == b.keys() and len(a) > 50
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = _weights(train_base("smoke", tmp_path / "other", seed=1))
    assert any(not torch.equal(a[k], other[k]) for k in a)


def test_output_is_a_plain_diffusers_pipeline_with_logs(smoke_model):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(smoke_model, local_files_only=True)
    assert pipe.vae.config.latent_channels == 4 and pipe.vae_scale_factor == 8
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    records = [json.loads(x) for x in (smoke_model / "train_log.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in records} == {"vae", "denoiser"}
    assert all("loss" in r for r in records)
    assert (smoke_model / "train_curves.png").is_file()


def test_sdxl_twin_builds_and_loads(tmp_path, smoke_model):
    from diffusers import StableDiffusionXLPipeline

    out = train_base("smoke-xl", tmp_path / "xl", seed=0, vae_from=smoke_model / "vae")
    pipe = StableDiffusionXLPipeline.from_pretrained(out, local_files_only=True)
    assert pipe.unet.config.addition_embed_type == "text_time"
    image = pipe("a red circle on a blue background", num_inference_steps=2, height=64, width=64,
                 output_type="np").images[0]
    assert image.shape == (64, 64, 3)


def test_unknown_preset_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="--preset"):
        train_base("huge", tmp_path)
    assert "tiny" in PRESETS and "tiny-xl" in PRESETS
