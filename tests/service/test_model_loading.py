"""The worker's loading path on real (tiny) weights: a LoRA from the manifest is fused into the UNet, a UNet folder
replaces the base's, and an SDXL-architecture model is served through the same queue and worker code."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import yaml
from service_harness import PROMPT, ApiServer, ThreadWorker, make_settings, wait_status

from service.contracts.manifest import load_manifest
from service.worker.model_runner import ModelRunner
from service.worker.runner import ImageRequest


def _image(spec) -> np.ndarray:
    runner = ModelRunner(spec).load()
    (image,) = runner.run([ImageRequest(PROMPT, 3)], width=64, height=64, steps=3, guidance=5.0)
    return image.astype(np.int16)


def _manifest(tmp_path, *entries) -> object:
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"models": list(entries)}))
    return load_manifest(path)


def test_lora_is_fused_at_load(tmp_path, served_model_dir, lora_dir):
    common = {"kind": "sd15", "base": str(served_model_dir)}
    manifest = _manifest(tmp_path, {"name": "base", **common},
                         {"name": "with-lora", **common, "lora": str(lora_dir), "lora_scale": 1.0},
                         {"name": "lora-off", **common, "lora": str(lora_dir), "lora_scale": 0.0})
    base, with_lora, lora_off = (_image(manifest.get(n)) for n in ("base", "with-lora", "lora-off"))
    assert np.abs(with_lora - base).mean() > 2.0  # the LoRA changes the model...
    assert np.abs(lora_off - base).mean() <= 1.0  # ...by its scale: at 0 it is the base model


def test_unet_folder_replaces_the_base_unet(tmp_path, served_model_dir):
    import torch
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(served_model_dir / "unet")
    with torch.no_grad():
        unet.conv_out.weight.mul_(-1.0)
    unet.save_pretrained(tmp_path / "unet")
    common = {"kind": "sd15", "base": str(served_model_dir)}
    manifest = _manifest(tmp_path, {"name": "base", **common}, {"name": "tuned", **common,
                                                                 "unet": str(tmp_path / "unet")})
    assert np.abs(_image(manifest.get("tuned")) - _image(manifest.get("base"))).mean() > 2.0


@pytest.fixture(scope="session")
def sdxl_model_dir(tmp_path_factory):
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    if (root / "models" / "spo-tiny-xl" / "model_index.json").is_file():
        return root / "models" / "spo-tiny-xl"
    from training.train_base import train_base

    return train_base("smoke-xl", tmp_path_factory.mktemp("smoke-xl") / "model", seed=0)


def test_sdxl_model_served_through_the_queue(tmp_path, served_model_dir, sdxl_model_dir, redis_url, prefix):
    """A manifest with both kinds; this worker serves only the SDXL one (a worker loads only what it is told)."""
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"models": [
        {"name": "spo-tiny", "kind": "sd15", "base": str(served_model_dir)},
        {"name": "spo-tiny-xl", "kind": "sdxl", "base": str(sdxl_model_dir),
         "defaults": {"steps": 3, "guidance": 5.0, "size": "64x64"}},
    ]}))
    settings = make_settings(redis_url, prefix, path)
    runner = ModelRunner(load_manifest(path).get("spo-tiny-xl")).load()
    server = ApiServer(settings).start()
    worker = ThreadWorker(settings, runner).start()
    try:
        client = httpx.Client(base_url=server.url, timeout=60)
        job = client.post("/v1/jobs", json={"model": "spo-tiny-xl", "prompt": PROMPT, "seed": 1, "n": 2}).json()
        done = wait_status(client, job["id"], {"succeeded", "failed"})
        assert done["status"] == "succeeded" and len(done["images"]) == 2
        assert client.get(done["images"][0]).content.startswith(b"\x89PNG")
        # The SD 1.5 model has no worker here: readiness says so by name.
        assert "spo-tiny" in client.get("/readyz").json()["error"]["message"]
    finally:
        worker.stop()
        server.stop()
