"""End-to-end generation through the real API, queue and worker: the OpenAI SDK works unchanged, and an image
depends only on its request and seed, not on what else was batched with it."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
from PIL import Image
from service_harness import PROMPT, STEPS, ThreadWorker, wait_ready, wait_status


def _decode_png(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"))


def test_openai_sdk_images_generate(service):
    import openai  # a dev dependency: its absence is a broken install, not a skip
    client = openai.OpenAI(base_url=f"{service.url}/v1", api_key="unused")
    result = client.images.generate(model="spo-tiny", prompt=PROMPT, size="64x64", n=2,
                                    response_format="b64_json", extra_body={"seed": 7})
    assert len(result.data) == 2
    images = [_decode_png(base64.b64decode(d.b64_json)) for d in result.data]
    assert all(im.shape == (64, 64, 3) for im in images)
    assert not np.array_equal(images[0], images[1])  # seeds 7 and 8
    assert result.model_extra["seeds"] == [7, 8]


def test_same_seed_same_image_alone_or_batched(settings, api, runner):
    """Four jobs queued before the worker starts run as one batch of 4; each matches the same request run alone."""
    client = httpx.Client(base_url=api.url, timeout=60)
    bodies = [{"prompt": p, "seed": s, "num_inference_steps": STEPS}
              for p, s in [(PROMPT, 11), ("a green square on a yellow background", 12),
                           ("a blue triangle on a white background", 13), (PROMPT, 14)]]
    batched = [client.post("/v1/jobs", json=b).json()["id"] for b in bodies]
    worker = ThreadWorker(settings, runner).start()
    try:
        wait_ready(api.url)
        jobs = [wait_status(client, job_id, {"succeeded"}) for job_id in batched]
        assert [j["batch_size"] for j in jobs] == [4, 4, 4, 4]
        alone = [client.post("/v1/images/generations", json=b).json() for b in (bodies[0], bodies[2])]
        again = client.post("/v1/images/generations", json=bodies[0]).json()
    finally:
        worker.stop()
    for job_id, single in zip([batched[0], batched[2]], alone, strict=True):
        batch_image = _decode_png(client.get(f"/v1/jobs/{job_id}/images/0").content).astype(np.int16)
        single_image = _decode_png(base64.b64decode(single["data"][0]["b64_json"])).astype(np.int16)
        assert np.abs(batch_image - single_image).mean() <= 1.0  # mean abs difference <= 1/255
    first = _decode_png(base64.b64decode(alone[0]["data"][0]["b64_json"]))
    assert np.array_equal(first, _decode_png(base64.b64decode(again["data"][0]["b64_json"])))
    # Different prompts really give different images (the comparison above is not vacuous).
    assert not np.array_equal(first, _decode_png(base64.b64decode(alone[1]["data"][0]["b64_json"])))
