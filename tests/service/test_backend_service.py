"""The onnxruntime backend end to end: a manifest entry with `backend: onnxruntime` is served through the real API,
queue and worker, and its images equal the torch backend's within 1/255 mean abs for the same requests and seeds."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image
from service_harness import PROMPT, STEPS, ApiServer, ThreadWorker, make_settings, wait_ready


@pytest.fixture(scope="module")
def two_backends(served_model_dir, tmp_path_factory):
    """One manifest, the same weights twice: `spo-tiny` on torch and `spo-tiny-ort` on onnxruntime."""
    path = tmp_path_factory.mktemp("manifest-backends") / "models.yaml"
    common = {"kind": "sd15", "base": str(served_model_dir), "sizes": ["64x64", "128x128"], "max_n": 4,
              "defaults": {"steps": STEPS, "guidance": 5.0, "size": "64x64"}, "device": "cpu"}
    path.write_text(yaml.safe_dump({"models": [{"name": "spo-tiny", "backend": "torch", **common},
                                               {"name": "spo-tiny-ort", "backend": "onnxruntime", **common}]}))
    return path


@pytest.fixture(scope="module")
def ort_runner(two_backends, tmp_path_factory, monkeypatch_module):
    from service.contracts.manifest import load_manifest
    from service.worker.model_runner import ModelRunner

    monkeypatch_module.setenv("SPO_ENGINE_CACHE", str(tmp_path_factory.mktemp("engines")))
    return ModelRunner(load_manifest(two_backends).get("spo-tiny-ort")).load()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _images(client: httpx.Client, model: str, body: dict) -> list[np.ndarray]:
    response = client.post("/v1/images/generations", json={"model": model, **body})
    assert response.status_code == 200, response.text
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))).convert("RGB")).astype(np.int16)
            for d in response.json()["data"]]


def test_onnxruntime_backend_through_the_service_equals_torch(redis_url, prefix, two_backends, runner, ort_runner):
    assert ort_runner.backend.describe() != runner.backend.describe()
    assert type(ort_runner.pipe.unet).__name__ != type(runner.pipe.unet).__name__  # really a different UNet
    settings = make_settings(redis_url, prefix, two_backends)
    server = ApiServer(settings).start()
    workers = [ThreadWorker(settings, runner).start(), ThreadWorker(settings, ort_runner).start()]
    try:
        wait_ready(server.url)
        client = httpx.Client(base_url=server.url, timeout=120)
        for body in ({"prompt": PROMPT, "n": 2, "seed": 21, "size": "64x64"},
                     {"prompt": "a green square on a yellow background", "n": 1, "seed": 5, "size": "128x128"}):
            ours, theirs = _images(client, "spo-tiny-ort", body), _images(client, "spo-tiny", body)
            assert len(ours) == len(theirs) == body["n"]
            for a, b in zip(ours, theirs, strict=True):
                assert a.shape == b.shape
                assert np.abs(a - b).mean() <= 1.0  # <= 1/255 mean abs difference
        job = client.get("/v1/models").json()
        assert {m["id"] for m in job["data"]} >= {"spo-tiny", "spo-tiny-ort"}
    finally:
        server.stop()
        for w in workers:
            w.stop()
