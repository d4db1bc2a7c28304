"""Every bad field is a 4xx whose OpenAI-style error body names the field (with OpenAI's codes); bad input is never
a 5xx. Types are strict: a number is not a string, a boolean is not a number."""

from __future__ import annotations

import httpx
import pytest
from service_harness import PROMPT

LONG_PROMPT = " ".join(["red circle"] * 20)  # well over spo-tiny's 16-token CLIP tokenizer

BAD_BODIES = [
    ({"prompt": PROMPT, "model": "no-such-model"}, 404, "model", "model_not_found"),
    ({"prompt": PROMPT, "size": "65x64"}, 400, "size", "invalid_value"),
    ({"prompt": PROMPT, "size": "96x96"}, 400, "size", "invalid_value"),  # a multiple of 8, but not an allowed size
    ({"prompt": PROMPT, "size": "big"}, 400, "size", "invalid_value"),
    ({"prompt": PROMPT, "size": " 64x64"}, 400, "size", "invalid_value"),  # exactly a size (the schema's pattern)
    ({"prompt": PROMPT, "n": 0}, 400, "n", "integer_below_min_value"),
    ({"prompt": PROMPT, "n": 5}, 400, "n", "integer_above_max_value"),  # max_n is 4 in the test manifest
    ({"prompt": PROMPT, "n": "2"}, 400, "n", "invalid_type"),
    ({"prompt": PROMPT, "n": True}, 400, "n", "invalid_type"),
    ({"prompt": PROMPT, "num_inference_steps": 0}, 400, "num_inference_steps", "integer_below_min_value"),
    ({"prompt": PROMPT, "num_inference_steps": 61}, 400, "num_inference_steps", "integer_above_max_value"),
    ({"prompt": PROMPT, "guidance_scale": -1}, 400, "guidance_scale", "decimal_below_min_value"),
    ({"prompt": PROMPT, "guidance_scale": 21}, 400, "guidance_scale", "decimal_above_max_value"),
    ({"prompt": PROMPT, "guidance_scale": "high"}, 400, "guidance_scale", "invalid_type"),
    ({"prompt": PROMPT, "guidance_scale": "5"}, 400, "guidance_scale", "invalid_type"),  # strict, as n and seed
    ({"prompt": PROMPT, "guidance_scale": True}, 400, "guidance_scale", "invalid_type"),
    ({"prompt": LONG_PROMPT}, 400, "prompt", "string_above_max_length"),
    ({"prompt": "   "}, 400, "prompt", "empty_string"),
    ({"prompt": PROMPT, "negative_prompt": LONG_PROMPT}, 400, "negative_prompt", "string_above_max_length"),
    ({"prompt": PROMPT, "response_format": "jpeg"}, 400, "response_format", "invalid_value"),
    ({"prompt": PROMPT, "seed": -1}, 400, "seed", "integer_below_min_value"),
    ({"prompt": PROMPT, "seed": 2**40}, 400, "seed", "integer_above_max_value"),
    ({"prompt": PROMPT, "seed": 1.5}, 400, "seed", "invalid_type"),  # (1.0 is an integer, as in JSON Schema)
    ({"prompt": PROMPT, "priority": "urgent"}, 400, "priority", "invalid_value"),
    ({"prompt": PROMPT, "bogus": 1}, 400, "bogus", "unknown_parameter"),
    # OpenAI parameters whose value this server cannot honour: refused as OpenAI does, naming them
    ({"prompt": PROMPT, "stream": True}, 400, "stream", "invalid_value"),
    ({"prompt": PROMPT, "partial_images": 2}, 400, "partial_images", "invalid_value"),
    ({"prompt": PROMPT, "background": "transparent"}, 400, "background", "invalid_value"),
    ({"prompt": PROMPT, "output_format": "gif"}, 400, "output_format", "invalid_value"),
    ({"prompt": PROMPT, "output_compression": 101}, 400, "output_compression", "integer_above_max_value"),
    ({"prompt": PROMPT, "quality": "ultra"}, 400, "quality", "invalid_value"),
    ({"prompt": PROMPT, "style": "cubist"}, 400, "style", "invalid_value"),
    ({"prompt": PROMPT, "frame_count": 4}, 400, "frame_count", "invalid_value"),
    ({"prompt": PROMPT, "svg": {"model": "x"}}, 400, "svg", "invalid_value"),
    ({}, 400, "prompt", "missing_required_parameter"),
    ({"prompt": 42}, 400, "prompt", "invalid_type"),
]


@pytest.mark.parametrize("path", ["/v1/images/generations", "/v1/jobs"])
@pytest.mark.parametrize(("body", "status", "param", "code"), BAD_BODIES)
def test_bad_field_is_4xx_naming_it(api, path, body, status, param, code):
    response = httpx.post(f"{api.url}{path}", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["code"] == code
    assert error["type"] == "invalid_request_error"
    assert error["message"]


def test_openai_message_style(api):
    def error(body: dict) -> dict:
        return httpx.post(f"{api.url}/v1/jobs", json={"prompt": PROMPT, **body}).json()["error"]

    assert error({"bogus": 1})["message"] == "Unknown parameter: 'bogus'."
    assert error({"quality": "ultra"})["message"].startswith(
        "Invalid value: 'ultra'. Supported values are: 'auto', 'low', 'medium', 'high', 'xhigh', 'max', 'standard', "
        "and 'hd'.")
    assert error({"size": "96x96"})["message"].startswith(
        "Invalid value: '96x96'. Supported values are: '64x64', '128x128', and 'auto'")
    assert error({"n": "2"})["message"] == "Invalid type for 'n': expected an integer, but got a string instead."


BENIGN = [  # what OpenAI clients send by default (LangChain's DALL-E wrapper sends quality), all accepted
    {"quality": "standard"}, {"quality": "hd"}, {"quality": "auto"}, {"quality": "high"}, {"style": "vivid"},
    {"style": "natural"}, {"output_format": "png"}, {"output_format": "jpeg", "output_compression": 80},
    {"output_format": "webp"}, {"output_compression": 100}, {"background": "auto"}, {"background": "opaque"},
    {"moderation": "auto"}, {"moderation": "low"}, {"stream": False}, {"partial_images": 0}, {"size": "auto"},
    {"complexity": "low"}, {"user": "u-1"}, {"safety_identifier": "h-1"}, {"frame_count": None}, {"svg": None},
    {"response_format": "url"}, {"quality": None, "style": None, "stream": None},
]


def test_benign_openai_parameters_are_accepted(api):
    for extra in BENIGN:
        response = httpx.post(f"{api.url}/v1/jobs", json={"prompt": PROMPT, **extra})
        assert response.status_code == 202, (extra, response.text)
        if "size" in extra:
            assert response.json()["request"]["size"] == "64x64"  # auto: the model's default


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
    # An image index is an integer as written: "1.0" or "+1" is a 400, not image 1
    for k in ("1.0", "+1", "x"):
        bad = httpx.get(f"{api.url}/v1/jobs/nope/images/{k}")
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "k", (k, bad.text)


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
