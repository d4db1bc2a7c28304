"""Every bad field is a 4xx whose OpenAI-style error body names the field; bad input is never a 5xx."""

from __future__ import annotations

import httpx
import pytest
from service_harness import PROMPT

LONG_PROMPT = " ".join(["red circle"] * 20)  # well over spo-tiny's 16-token CLIP tokenizer

BAD_BODIES = [
    ({"prompt": PROMPT, "model": "no-such-model"}, 404, "model"),
    ({"prompt": PROMPT, "size": "65x64"}, 400, "size"),
    ({"prompt": PROMPT, "size": "96x96"}, 400, "size"),  # a multiple of 8, but not an allowed size
    ({"prompt": PROMPT, "size": "big"}, 400, "size"),
    ({"prompt": PROMPT, "n": 0}, 400, "n"),
    ({"prompt": PROMPT, "n": 5}, 400, "n"),  # max_n is 4 in the test manifest
    ({"prompt": PROMPT, "n": "2"}, 400, "n"),
    ({"prompt": PROMPT, "num_inference_steps": 0}, 400, "num_inference_steps"),
    ({"prompt": PROMPT, "num_inference_steps": 61}, 400, "num_inference_steps"),
    ({"prompt": PROMPT, "guidance_scale": -1}, 400, "guidance_scale"),
    ({"prompt": PROMPT, "guidance_scale": 21}, 400, "guidance_scale"),
    ({"prompt": PROMPT, "guidance_scale": "high"}, 400, "guidance_scale"),
    ({"prompt": LONG_PROMPT}, 400, "prompt"),
    ({"prompt": "   "}, 400, "prompt"),
    ({"prompt": PROMPT, "negative_prompt": LONG_PROMPT}, 400, "negative_prompt"),
    ({"prompt": PROMPT, "response_format": "jpeg"}, 400, "response_format"),
    ({"prompt": PROMPT, "seed": -1}, 400, "seed"),
    ({"prompt": PROMPT, "seed": 2**40}, 400, "seed"),
    ({"prompt": PROMPT, "seed": 1.5}, 400, "seed"),
    ({"prompt": PROMPT, "priority": "urgent"}, 400, "priority"),
    ({"prompt": PROMPT, "style": "vivid"}, 400, "style"),  # unsupported OpenAI field: rejected, not ignored
    ({}, 400, "prompt"),
    ({"prompt": 42}, 400, "prompt"),
]


@pytest.mark.parametrize("path", ["/v1/images/generations", "/v1/jobs"])
@pytest.mark.parametrize(("body", "status", "param"), BAD_BODIES)
def test_bad_field_is_4xx_naming_it(api, path, body, status, param):
    response = httpx.post(f"{api.url}{path}", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert error["message"]


def test_malformed_bodies(api):
    not_json = httpx.post(f"{api.url}/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"})
    assert not_json.status_code == 400 and "JSON" in not_json.json()["error"]["message"]
    wrong_type = httpx.post(f"{api.url}/v1/jobs", json=["a list"])
    assert wrong_type.status_code == 400
    too_big = httpx.post(f"{api.url}/v1/jobs", json={"prompt": "x" * (70 * 1024)})
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "body_too_large"


def test_oversized_chunked_body_is_413(api):
    def chunks():
        for _ in range(100):
            yield b"x" * 1024

    response = httpx.post(f"{api.url}/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413


def test_unknown_job_and_route(api):
    for path in ("/v1/jobs/nope", "/v1/jobs/nope/images/0", "/v1/jobs/nope/events"):
        response = httpx.get(f"{api.url}{path}")
        assert response.status_code == 404 and response.json()["error"]["param"] == "job_id"
    assert httpx.post(f"{api.url}/v1/jobs/nope/cancel").status_code == 404
    assert httpx.get(f"{api.url}/v1/nothing-here").json()["error"]["code"] == "not_found"


def test_models_and_docs(api):
    models = httpx.get(f"{api.url}/v1/models").json()
    assert models["object"] == "list"
    (card,) = models["data"]
    assert card["id"] == "spo-tiny" and card["sizes"] == ["64x64", "128x128"] and card["max_prompt_tokens"] == 16
    assert httpx.get(f"{api.url}/v1/models/spo-tiny").json()["max_n"] == 4
    assert httpx.get(f"{api.url}/v1/models/other").json()["error"]["param"] == "model"
    assert httpx.get(f"{api.url}/docs").status_code == 200
    paths = httpx.get(f"{api.url}/openapi.json").json()["paths"]
    assert {"/v1/images/generations", "/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events",
            "/v1/jobs/{job_id}/cancel", "/v1/jobs/{job_id}/images/{k}", "/v1/models", "/healthz", "/readyz",
            "/metrics"} <= set(paths)


def test_sync_generation_without_worker_is_503(api):
    response = httpx.post(f"{api.url}/v1/images/generations", json={"prompt": PROMPT})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "no_worker"
    ready = httpx.get(f"{api.url}/readyz")
    assert ready.status_code == 503 and "spo-tiny" in ready.json()["error"]["message"]
    assert httpx.get(f"{api.url}/healthz").json() == {"status": "ok"}


def test_defaults_and_normalised_size(api):
    job = httpx.post(f"{api.url}/v1/jobs", json={"prompt": PROMPT, "size": "128X128"}).json()
    assert job["request"]["size"] == "128x128"
    default = httpx.post(f"{api.url}/v1/jobs", json={"prompt": PROMPT}).json()
    assert default["model"] == "spo-tiny" and default["request"]["size"] == "64x64"
    assert default["request"]["num_inference_steps"] == 4 and len(default["seeds"]) == 1
