"""Converting a published step-aware preference model: a tiny checkpoint in the published key layout converts, loads
and scores exactly as the published model's formula does (multiplicative gates, its resize); files that do not fit
are refused with the keys named; a CLIP folder holding such a file is refused instead of loading random weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPModel

from tests.published_spm import MEAN, STD, write_published_spm
from training.spm import CheckpointKeyError, StepAwarePreferenceModel
from training.spm_convert import SPMConversionError, convert_spm

PROMPTS = ["a red circle on a blue background", "a green square on a white background"]


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    return write_published_spm(tmp_path_factory.mktemp("published"))


def published_scores(state: dict[str, torch.Tensor], base: Path, images: torch.Tensor, t: torch.Tensor,
                     input_ids: torch.Tensor) -> torch.Tensor:
    """The published model's formula, written out from its state dict: sinusoid (cos, sin) -> MLP, per layer
    `x + gate * branch(LN(x) * (1 + scale) + shift)`, post-LN modulation of the pooled token; its resize."""
    from transformers import CLIPConfig

    s = {k[len("model."):]: v for k, v in state.items() if not k.endswith("position_ids")}
    clip = CLIPModel(CLIPConfig.from_pretrained(base)).eval()
    clip.load_state_dict({k: v for k, v in s.items() if k in clip.state_dict()}, strict=True)
    # resize: short side to 64 with int(x * s + 0.5), bicubic without antialias, centre crop rounding half to even
    h, w = images.shape[-2:]
    scale = 64 / min(h, w)
    nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
    x = F.interpolate(images, size=(nh, nw), mode="bicubic", align_corners=False, antialias=False)
    top, left = int(round((nh - 64) / 2.0)), int(round((nw - 64) / 2.0))
    x = x[..., top:top + 64, left:left + 64].clamp(0, 1)
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)

    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    args = t.float()[:, None] * freqs[None]
    c = torch.cat([torch.cos(args), torch.sin(args)], -1)
    c = F.linear(F.silu(F.linear(c, s["t_embedder.mlp.0.weight"], s["t_embedder.mlp.0.bias"])),
                 s["t_embedder.mlp.2.weight"], s["t_embedder.mlp.2.bias"])
    vm = clip.vision_model
    hs = vm.pre_layrnorm(vm.embeddings(x))
    for i, layer in enumerate(vm.encoder.layers):
        p = f"vision_model.encoder.layers.{i}.adaLN_modulation.1."
        mod = F.linear(F.silu(c), s[p + "weight"], s[p + "bias"]).chunk(6, dim=1)
        sa, sc_a, ga, sm, sc_m, gm = (m[:, None] for m in mod)
        attn = layer.self_attn(hidden_states=layer.layer_norm1(hs) * (1 + sc_a) + sa, attention_mask=None)[0]
        hs = hs + ga * attn
        hs = hs + gm * layer.mlp(layer.layer_norm2(hs) * (1 + sc_m) + sm)
    shift, sc = F.linear(F.silu(c), s["vision_model.adaLN_modulation.1.weight"],
                         s["vision_model.adaLN_modulation.1.bias"]).chunk(2, dim=1)
    pooled = vm.post_layernorm(hs[:, 0]) * (1 + sc) + shift
    img = F.normalize(clip.visual_projection(pooled), dim=-1)
    txt = F.normalize(clip.text_projection(clip.text_model(input_ids=input_ids).pooler_output), dim=-1)
    return clip.logit_scale.exp() * (img * txt).sum(-1)


@torch.no_grad()
def test_converted_checkpoint_scores_as_the_published_formula(published, tmp_path):
    base, ckpt, state = published
    out = convert_spm(ckpt, str(base), tmp_path / "spm")  # --processor defaults to --base: one folder holds both
    spm = StepAwarePreferenceModel.from_pretrained(out).eval()
    assert spm.config.preprocessing == "reference" and spm.config.resize_to == 64
    assert spm.config.image_mean == tuple(MEAN) and spm.config.image_std == tuple(STD)
    assert json.loads((out / "converted_from.json").read_text())["ckpt"] == ckpt.name
    g = torch.Generator().manual_seed(3)
    ids = spm.tokenize(PROMPTS)
    for shape in ((48, 80), (64, 64), (100, 70), (37, 37)):  # up- and down-scaling, offsets that round half to even
        images = torch.rand(2, 3, *shape, generator=g)
        t = torch.tensor([0, 751])
        want = published_scores(state, base, images, t, ids)
        got = spm(images, ids, t)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        assert want.abs().max() > 1.0  # scores, not zeros
    # A plain rename (gate biases not shifted) scores differently: the test sees the conversion.
    spm.layer_modulations[0].proj.bias.data[2 * 64:3 * 64] += 1.0
    images = torch.rand(2, 3, 64, 64, generator=g)
    assert (spm(images, ids, 0) - published_scores(state, base, images, torch.tensor([0, 0]), ids)).abs().max() > 1e-3


def test_checkpoints_that_do_not_fit_are_refused_naming_keys(published, tmp_path):
    base, ckpt, state = published
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(SPMConversionError, match="not a readable torch checkpoint"):
        convert_spm(truncated, str(base), tmp_path / "a")

    broken = dict(state)
    del broken["model.vision_model.encoder.layers.3.adaLN_modulation.1.weight"]
    broken["model.vision_model.extra.weight"] = torch.zeros(1)
    torch.save(broken, tmp_path / "broken.bin")
    with pytest.raises(SPMConversionError) as err:
        convert_spm(tmp_path / "broken.bin", str(base), tmp_path / "b")
    assert "1 missing key (model.vision_model.encoder.layers.3.adaLN_modulation.1.weight)" in str(err.value)
    assert "1 unexpected key (model.vision_model.extra.weight)" in str(err.value)

    plain = {k[len("model."):]: v for k, v in state.items() if "adaLN" not in k and "t_embedder" not in k}
    torch.save(plain, tmp_path / "clip.bin")  # a plain CLIP state dict: nothing has the prefix
    with pytest.raises(SPMConversionError, match="missing keys .*unexpected keys"):
        convert_spm(tmp_path / "clip.bin", str(base), tmp_path / "c")

    wide = dict(state)
    wide["model.vision_model.adaLN_modulation.1.bias"] = torch.zeros(3 * 64)
    torch.save(wide, tmp_path / "wide.bin")
    with pytest.raises(SPMConversionError, match=r"shapes differ for model.vision_model.adaLN_modulation.1.bias"):
        convert_spm(tmp_path / "wide.bin", str(base), tmp_path / "d")
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_a_clip_folder_holding_a_published_file_is_refused_not_randomly_initialised(published, tmp_path):
    base, ckpt, _ = published
    folder = tmp_path / "renamed"
    folder.mkdir()
    for name in ("config.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
                 "preprocessor_config.json"):
        if (base / name).is_file():
            (folder / name).write_bytes((base / name).read_bytes())
    (folder / "pytorch_model.bin").write_bytes(ckpt.read_bytes())
    with pytest.raises(CheckpointKeyError, match="spo convert spm") as err:
        StepAwarePreferenceModel.from_clip(folder)
    assert "missing keys" in str(err.value) and "model.t_embedder.mlp.0.weight" in str(err.value)


def test_cli_convert_spm_and_its_errors(published, tmp_path, capsys):
    from training.cli import main

    base, ckpt, _ = published
    out = tmp_path / "spm"
    assert main(["convert", "spm", "--ckpt", str(ckpt), "--base", str(base), "--processor", str(base),
                 "--out", str(out)]) == 0
    assert (out / "spm_config.json").is_file() and (out / "time_conditioning.safetensors").is_file()
    for argv, flag in ((["--ckpt", str(tmp_path / "none.bin"), "--base", str(base)], "--ckpt"),
                       (["--ckpt", str(ckpt), "--base", str(tmp_path)], "--base"),
                       (["--ckpt", str(ckpt), "--base", str(base), "--processor", str(tmp_path)], "--processor")):
        with pytest.raises(SystemExit):
            main(["convert", "spm", *argv, "--out", str(tmp_path / "x")])
        assert f"argument {flag}" in capsys.readouterr().err
