"""The step-aware preference model: identity at init, time conditioning, save/load, checkpoints, real-size presets."""

import json

import pytest
import torch
from transformers import CLIPModel, CLIPTokenizer

from training.architectures import write_tokenizer
from training.spm import (
    SPMConfig,
    StepAwarePreferenceModel,
    build_spm,
    modulated_layer,
    tiny_clip_config,
    vit_h14_config,
)

PROMPTS = ["a red circle on a blue background", "a green square on a white background",
           "a blue triangle on a yellow background"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> CLIPTokenizer:
    return write_tokenizer(tmp_path_factory.mktemp("tok"))


def _images(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _clip_scores(clip: CLIPModel, spm: StepAwarePreferenceModel, images: torch.Tensor, prompts: list[str]):
    """Plain CLIPModel scores of each image with its own prompt (the reference for identity-at-init)."""
    out = clip(input_ids=spm.tokenize(prompts), pixel_values=spm.preprocess(images))
    return out.logits_per_image.diagonal()


@torch.no_grad()
def test_scores_equal_plain_clip_at_init_for_any_t(tokenizer):
    torch.manual_seed(0)
    spm = build_spm("tiny").eval()
    images = _images(3)
    reference = _clip_scores(spm.clip, spm, images, PROMPTS)
    for t in (0, 1, 251, 501, 999, torch.tensor([0, 500, 999])):
        torch.testing.assert_close(spm.score(images, PROMPTS, t), reference, rtol=0, atol=1e-5)
    # The modulated layer with all-zero modulation is the CLIP layer itself (gate enters as 1 + gate).
    layer = spm.clip.vision_model.encoder.layers[0]
    h = torch.randn(2, 65, 64)
    zeros = tuple(torch.zeros(2, 1, 64) for _ in range(6))
    torch.testing.assert_close(modulated_layer(layer, h, zeros), layer(h, None), rtol=0, atol=1e-6)


def test_adaln_starts_at_zero_learns_and_makes_scores_depend_on_t(tokenizer):
    torch.manual_seed(0)
    spm = build_spm("tiny")
    for name, param in spm.named_parameters():
        if "modulation" in name:
            assert torch.count_nonzero(param) == 0, name
    images = _images(3)
    spm.score(images, PROMPTS, torch.tensor([10, 500, 900])).sum().backward()
    grads = {n: p.grad for n, p in spm.named_parameters() if "modulation" in n and n.endswith("weight")}
    assert len(grads) == 4 + 1 and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    with torch.no_grad():  # after some training the modulation is non-zero: then t matters
        for name, param in spm.named_parameters():
            if "modulation" in name:
                param.normal_(std=0.05)
        a, b = spm.score(images, PROMPTS, 0), spm.score(images, PROMPTS, 900)
    assert (a - b).abs().max() > 1e-3


def test_ablation_has_no_time_modules_and_ignores_t(tokenizer):
    spm = build_spm("tiny", time_conditioning=False).eval()
    assert spm.time_parameters() == []
    with torch.no_grad():
        images = _images(3)
        torch.testing.assert_close(spm.score(images, PROMPTS, 0), spm.score(images, PROMPTS, 999))


def test_preprocess_resizes_bicubic_differentiably_and_normalises():
    spm = build_spm("tiny")
    big = _images(2, size=128).requires_grad_()
    x = spm.preprocess(big)
    assert x.shape == (2, 3, 64, 64)
    x.sum().backward()
    assert big.grad is not None and big.grad.abs().sum() > 0
    wide = torch.full((1, 3, 64, 96), 0.5)  # short side resized, centre crop
    mean, std = torch.tensor(SPMConfig().image_mean), torch.tensor(SPMConfig().image_std)
    torch.testing.assert_close(spm.preprocess(wide)[0, :, 0, 0], (0.5 - mean) / std)


@torch.no_grad()
def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    for time_conditioning in (True, False):
        spm = build_spm("tiny", time_conditioning=time_conditioning).eval()
        for param in spm.time_parameters():
            param.normal_(std=0.05)
        folder = spm.save_pretrained(tmp_path / f"spm-{time_conditioning}")
        loaded = StepAwarePreferenceModel.from_pretrained(folder).eval()
        assert loaded.config == spm.config
        images, t = _images(3), torch.tensor([0, 400, 999])
        torch.testing.assert_close(loaded.score(images, PROMPTS, t), spm.score(images, PROMPTS, t), rtol=0, atol=0)
        # The CLIP part of an SPM folder is a plain CLIP checkpoint.
        assert isinstance(CLIPModel.from_pretrained(folder), CLIPModel)
    with pytest.raises(FileNotFoundError, match="spm_config.json"):
        StepAwarePreferenceModel.from_pretrained(tmp_path)


@torch.no_grad()
def test_init_from_an_spm_continues_it_and_the_ablation_takes_its_clip_part(tmp_path):
    torch.manual_seed(0)
    spm = build_spm("tiny").eval()
    for param in spm.time_parameters():
        param.normal_(std=0.05)
    folder = spm.save_pretrained(tmp_path / "spm")
    images, t = _images(3), torch.tensor([0, 400, 999])
    continued = build_spm("tiny", init=folder).eval()
    torch.testing.assert_close(continued.score(images, PROMPTS, t), spm.score(images, PROMPTS, t), rtol=0, atol=0)
    ablation = build_spm("tiny", init=folder, time_conditioning=False).eval()
    assert not ablation.config.time_conditioning and not list(ablation.time_parameters())
    clip_only = {k: v for k, v in spm.clip.state_dict().items() if k in ablation.clip.state_dict()}
    assert len(clip_only) > 20 and all(torch.equal(v, ablation.clip.state_dict()[k]) for k, v in clip_only.items())


@torch.no_grad()
def test_wraps_a_local_pickscore_style_checkpoint(tmp_path, tokenizer):
    """PickScore_v1 is a CLIPModel folder; its tokenizer and processor live in a separate (laion CLIP-H) folder."""
    torch.manual_seed(1)
    clip = CLIPModel(tiny_clip_config(tokenizer)).eval()
    with torch.no_grad():
        clip.logit_scale.fill_(4.6052)  # PickScore's learned scale: exp -> 100
    clip.save_pretrained(tmp_path / "pickscore")
    processor = tmp_path / "processor"
    tokenizer.save_pretrained(processor)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    (processor / "preprocessor_config.json").write_text(json.dumps({"image_mean": mean, "image_std": std}))

    spm = StepAwarePreferenceModel.from_clip(tmp_path / "pickscore", tokenizer=processor).eval()
    assert spm.config.image_mean == tuple(mean) and spm.config.time_conditioning
    images = _images(3)
    pixels = (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    reference = clip(input_ids=spm.tokenize(PROMPTS), pixel_values=pixels).logits_per_image.diagonal()
    torch.testing.assert_close(spm.score(images, PROMPTS, 700), reference, rtol=0, atol=1e-4)
    assert 50 < spm.clip.logit_scale.exp() < 200


def test_sd15_and_sdxl_presets_build_the_vit_h14_architecture_without_allocating(tokenizer, tmp_path):
    from training.presets import SPM_PRESETS as PRESETS

    tokenizer.save_pretrained(tmp_path / "tok")
    with torch.device("meta"):
        spm = build_spm("sd15", tokenizer=tmp_path / "tok")
    vision, text = spm.clip.config.vision_config, spm.clip.config.text_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.patch_size, vision.image_size) == (1280, 32, 14, 224)
    assert (text.hidden_size, text.num_hidden_layers, spm.clip.config.projection_dim) == (1024, 24, 1024)
    clip_params = sum(p.numel() for p in spm.clip.parameters())
    assert 980e6 < clip_params < 990e6  # CLIP ViT-H/14: ~986M
    assert len(spm.layer_modulations) == 32
    assert spm.layer_modulations[0].proj.weight.shape == (6 * 1280, 1280)
    assert spm.post_modulation.proj.weight.shape == (2 * 1280, 1280)
    assert all(p.device.type == "meta" for p in spm.parameters())
    assert vit_h14_config().vision_config.hidden_act == "gelu"

    sd15, sdxl = PRESETS["sd15"], PRESETS["sdxl"]
    assert sd15.clip == sdxl.clip == "vit-h-14"
    assert (sd15.batch_size, sd15.micro_batch, sd15.weight_decay, sd15.warmup) == (64, 16, 0.3, 500)
    assert (sd15.lr, sd15.steps) == (3e-6, 8000) and (sdxl.lr, sdxl.steps) == (1e-6, 7000)
    assert sd15.guidance == sdxl.guidance == 5.0
