"""Manifests: the shipped ones parse, bad ones fail with errors naming model and field, and the published hub
checkpoints go through the very loading call the tiny local models use."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from service.contracts.manifest import ManifestError, load_manifest
from service.worker.backends import UnknownBackendError, get_backend

ROOT = Path(__file__).resolve().parents[2]
PUBLISHED = ROOT / "deploy" / "manifests" / "spo-published.yaml"


def test_default_manifest():
    manifest = load_manifest(ROOT / "models" / "models.yaml")
    assert manifest.names[:3] == ["spo-tiny", "spo-tiny-spo", "spo-tiny-xl"]
    spo = manifest.get("spo-tiny-spo")
    assert spo.base == str(ROOT / "models" / "spo-tiny") and spo.lora == str(ROOT / "models" / "spo-tiny-spo")
    tiny = manifest.get("spo-tiny")
    assert tiny.kind == "sd15" and tiny.base == str(ROOT / "models" / "spo-tiny") and tiny.backend == "torch"
    assert manifest.get("spo-tiny-xl").kind == "sdxl"


def test_published_manifest():
    manifest = load_manifest(PUBLISHED)
    models = manifest.models
    assert set(models) == {"spo-sd15", "spo-sd15-lora", "spo-sdxl", "spo-sdxl-lora"}
    assert models["spo-sd15"].base == "SPO-Diffusion-Models/SPO-SD-v1-5_4k-p_10ep" and models["spo-sd15"].lora is None
    assert models["spo-sdxl"].base == "SPO-Diffusion-Models/SPO-SDXL_4k-p_10ep"
    assert models["spo-sd15-lora"].base == "runwayml/stable-diffusion-v1-5"
    assert models["spo-sd15-lora"].lora == "SPO-Diffusion-Models/SPO-SD-v1-5_4k-p_10ep_LoRA"
    assert models["spo-sdxl-lora"].base == "stabilityai/stable-diffusion-xl-base-1.0"
    assert models["spo-sdxl-lora"].lora == "SPO-Diffusion-Models/SPO-SDXL_4k-p_10ep_LoRA"
    for name in ("spo-sdxl", "spo-sdxl-lora"):
        spec = models[name]
        assert spec.kind == "sdxl" and spec.vae == "madebyollin/sdxl-vae-fp16-fix"
        assert spec.defaults.size == "1024x1024"
    for spec in models.values():
        assert (spec.dtype, spec.device, spec.backend) == ("float16", "cuda", "torch")
        assert spec.tokenizer_source() == (spec.base, "tokenizer")
    assert models["spo-sd15"].defaults.size == "512x512"


def test_published_models_load_through_the_shared_code_path(monkeypatch):
    """The worker's runner calls `pipeline.load_pipeline` with exactly the manifest's base / LoRA / VAE / dtype."""
    import torch

    import service.worker.model_runner as runner_module

    calls = []

    class FakePipe:  # stands in for the downloaded pipeline; only its UNet is touched after loading
        unet = torch.nn.Linear(1, 1)

    def fake_load(base, **kwargs):
        calls.append((base, kwargs))
        return FakePipe()

    monkeypatch.setattr(runner_module, "load_pipeline", fake_load)
    for spec in load_manifest(PUBLISHED).models.values():
        runner_module.ModelRunner(spec).load()
    by_base = {base: kw for base, kw in calls}
    lora = by_base["stabilityai/stable-diffusion-xl-base-1.0"]
    assert lora == {"lora": "SPO-Diffusion-Models/SPO-SDXL_4k-p_10ep_LoRA", "lora_scale": 1.0, "unet": None,
                    "vae": "madebyollin/sdxl-vae-fp16-fix", "dtype": torch.float16, "device": "cuda",
                    "lora_weight_name": "spo_sdxl_10ep_4k-data_lora_diffusers.safetensors"}
    assert by_base["runwayml/stable-diffusion-v1-5"]["lora_weight_name"] == (
        "spo-sd-v1-5_4k-p_10ep_lora_diffusers.safetensors")
    assert by_base["SPO-Diffusion-Models/SPO-SD-v1-5_4k-p_10ep"]["lora"] is None


def test_training_output_entry_is_servable_as_written(tmp_path, served_model_dir):
    """`spo train spo` writes {name, kind, base, lora, lora_scale}: sizes come from the local base's configs."""
    lora_dir = tmp_path / "lora"
    lora_dir.mkdir()
    entry = {"name": "spo-tiny-spo", "kind": "sd15", "base": str(served_model_dir), "lora": str(lora_dir),
             "lora_scale": 1.0}
    path = tmp_path / "entry.yaml"
    path.write_text(yaml.safe_dump({"models": [entry]}))
    spec = load_manifest(path).get("spo-tiny-spo")
    assert spec.defaults.size == "64x64" and spec.sizes == ["64x64"] and spec.lora == str(lora_dir)


def _write(tmp_path: Path, **changes) -> Path:
    spec = {"name": "m", "kind": "sd15", "base": "./weights", "sizes": ["64x64"],
            "defaults": {"steps": 4, "guidance": 5.0, "size": "64x64"}}
    spec.update(changes)
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"models": [spec]}))
    return path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"backend": "openvino"}, "unknown UNet backend 'openvino'"),
        ({"kind": "sd3"}, "models.0.kind"),
        ({"sizes": ["65x64"]}, "multiples of 8"),
        ({"sizes": ["128x128"]}, "defaults.size '64x64' is not one of sizes"),
        ({"max_steps": 2}, "exceeds max_steps"),
        ({"guidance_range": [6.0, 9.0]}, "outside guidance_range"),
        ({"base": "not a hub id"}, "neither a local path"),
        ({"colour": "red"}, "models.0.colour"),
        ({"base": "org/hub-model", "defaults": {"steps": 4}, "sizes": []}, "give defaults.size"),
        ({"cuda_graphs": True}, "cuda_graphs needs backend compile or tensorrt, not 'torch'"),
    ],
)
def test_bad_manifest_errors_name_the_field(tmp_path, changes, message):
    with pytest.raises(ManifestError, match="invalid manifest") as err:
        load_manifest(_write(tmp_path, **changes))
    assert message in str(err.value)


def test_local_paths_resolve_against_the_manifest_folder(tmp_path):
    (tmp_path / "weights").mkdir()
    manifest = load_manifest(_write(tmp_path))
    assert manifest.get("m").base == str(tmp_path / "weights")
    with pytest.raises(ManifestError, match="not in"):
        manifest.get("other")
    with pytest.raises(ManifestError, match="cannot read"):
        load_manifest(tmp_path / "missing.yaml")


def test_unknown_backend_is_a_clear_error():
    assert get_backend("torch").name == "torch"
    with pytest.raises(UnknownBackendError, match="'onnxruntime-gpu-nightly'; available: torch"):
        get_backend("onnxruntime-gpu-nightly")
