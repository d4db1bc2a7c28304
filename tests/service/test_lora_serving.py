"""A LoRA served through its manifest entry gives the same image as `spo generate --lora` for the same seed: the API,
queue and worker path and the command line load and run the model the same way.

Runs on a LoRA made by the fixture and on the committed `models/spo-tiny-spo` through `models/models.yaml`.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import numpy as np
import yaml
from PIL import Image
from service_harness import PROMPT, STEPS, ApiServer, ThreadWorker, make_settings, wait_ready

from service.cli import main as spo
from service.contracts.manifest import load_manifest
from service.worker.model_runner import ModelRunner

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "models" / "spo-tiny-spo"


def _api_image(redis_url: str, prefix: str, manifest: Path, name: str, seed: int) -> np.ndarray:
    runner = ModelRunner(load_manifest(manifest).get(name)).load()
    settings = make_settings(redis_url, prefix, manifest, models=[name])  # readiness waits for served models only
    server = ApiServer(settings).start()
    worker = ThreadWorker(settings, runner).start()
    try:
        wait_ready(server.url)
        body = {"model": name, "prompt": PROMPT, "n": 1, "seed": seed, "size": "64x64", "num_inference_steps": STEPS,
                "guidance_scale": 5.0}
        response = httpx.post(f"{server.url}/v1/images/generations", json=body, timeout=120)
        assert response.status_code == 200, response.text
        assert response.json()["seeds"] == [seed]
        data = base64.b64decode(response.json()["data"][0]["b64_json"])
    finally:
        server.stop()
        worker.stop()
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _cli_image(tmp_path: Path, base: Path, lora: Path, seed: int) -> np.ndarray:
    out = tmp_path / "cli.png"
    assert spo(["generate", "--model", str(base), "--lora", str(lora), "--prompt", PROMPT, "--seed", str(seed),
                "--steps", str(STEPS), "--guidance", "5", "--size", "64x64", "--out", str(out)]) == 0
    return np.asarray(Image.open(out).convert("RGB"))


def _base_image(tmp_path: Path, base: Path, seed: int) -> np.ndarray:
    out = tmp_path / "base.png"
    assert spo(["generate", "--model", str(base), "--prompt", PROMPT, "--seed", str(seed), "--steps", str(STEPS),
                "--guidance", "5", "--size", "64x64", "--out", str(out)]) == 0
    return np.asarray(Image.open(out).convert("RGB"))


def test_api_and_spo_generate_give_the_same_lora_image(tmp_path, redis_url, prefix, served_model_dir, lora_dir):
    manifest = tmp_path / "models.yaml"
    manifest.write_text(yaml.safe_dump({"models": [{
        "name": "tiny-lora", "kind": "sd15", "base": str(served_model_dir), "lora": str(lora_dir),
        "sizes": ["64x64"], "max_n": 2, "defaults": {"steps": STEPS, "guidance": 5.0, "size": "64x64"},
        "backend": "torch", "device": "cpu"}]}))
    api = _api_image(redis_url, prefix, manifest, "tiny-lora", seed=11)
    cli = _cli_image(tmp_path, served_model_dir, lora_dir, seed=11)
    assert np.array_equal(api, cli)
    # ... and the LoRA is really in both: the base model draws a different image for that seed.
    assert np.abs(api.astype(np.int16) - _base_image(tmp_path, served_model_dir, seed=11)).mean() > 1.0


def test_committed_spo_lora_is_served_as_spo_generate_draws_it(tmp_path, redis_url, prefix):
    manifest = ROOT / "models" / "models.yaml"
    spec = load_manifest(manifest).get("spo-tiny-spo")
    assert Path(spec.lora) == COMMITTED
    api = _api_image(redis_url, prefix, manifest, "spo-tiny-spo", seed=5)
    assert np.array_equal(api, _cli_image(tmp_path, Path(spec.base), COMMITTED, seed=5))
