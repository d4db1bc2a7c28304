"""The real `openai` SDK with its default settings (max_retries=2, no Idempotency-Key): one job per call whatever it
retries, the parameters it and its users send by default accepted, the response fields it models filled, and the
endpoints this server lacks answered in the API's error shape."""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
import openai
import pytest
import redis
from PIL import Image
from service_harness import PROMPT, ApiServer, PacedRunner, ThreadWorker, make_settings, wait_ready

from service.contracts.queue import Keys


def sdk(url: str, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", **kwargs)  # every default, unless a test says


def jobs_created(redis_url: str, prefix: str) -> int:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        return sum(1 for key in client.scan_iter(match=f"{prefix}:job:*", count=1000) if ":image:" not in key)
    finally:
        client.close()


def fake_live_worker(redis_url: str, prefix: str) -> None:
    """A heartbeat with nothing behind it: the sync route accepts the job, and nothing ever runs it."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.hset(Keys(prefix).workers("spo-tiny"), "ghost-1-aaaaaa", json.dumps({"ts": time.time() + 600}))
    client.close()


@pytest.fixture
def stalled(redis_url, prefix, manifest_path):
    """An API whose model has a 'live' worker that never takes a job; the sync route gives up after 1 s."""
    server = ApiServer(make_settings(redis_url, prefix, manifest_path, sync_timeout_s=1.0)).start()
    fake_live_worker(redis_url, prefix)
    yield server
    server.stop()


def test_sync_timeout_is_not_retried_into_more_jobs(stalled, redis_url, prefix):
    client = sdk(stalled.url)
    assert client.max_retries == 2  # the SDK's default, which resubmitted a 504 twice (3 jobs per call)
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as raised:
        client.images.generate(model="spo-tiny", prompt=PROMPT)
    assert raised.value.status_code == 504 and raised.value.code == "sync_timeout"
    assert raised.value.response.headers["x-should-retry"] == "false"
    assert time.monotonic() - started < 2.5  # one wait of 1 s, no retries
    assert jobs_created(redis_url, prefix) == 1


def test_client_side_timeouts_rejoin_the_same_job(redis_url, prefix, manifest_path):
    """The SDK retries its own timeouts (the server never answered): each retry carries x-stainless-retry-count and
    waits for the job the first attempt queued, instead of queueing another."""
    server = ApiServer(make_settings(redis_url, prefix, manifest_path, sync_timeout_s=3.0)).start()
    fake_live_worker(redis_url, prefix)
    try:
        with pytest.raises(openai.APITimeoutError):
            sdk(server.url, timeout=0.5).images.generate(model="spo-tiny", prompt=PROMPT)  # 3 attempts
        assert jobs_created(redis_url, prefix) == 1
        # A new call (not a retry) with the same body is a new job: two users may well ask for the same thing.
        with pytest.raises(openai.APITimeoutError):
            sdk(server.url, timeout=0.5, max_retries=0).images.generate(model="spo-tiny", prompt=PROMPT)
        assert jobs_created(redis_url, prefix) == 2
    finally:
        server.stop()


def test_a_retry_after_a_client_timeout_gets_the_first_jobs_images(settings, runner):
    """The job takes ~2.4 s, the client gives up after 1 s each time: a later retry returns the first job's result."""
    server = ApiServer(settings).start()
    worker = ThreadWorker(settings, PacedRunner(runner, step_delay=0.6)).start()
    try:
        wait_ready(server.url)
        result = sdk(server.url, timeout=1.0, max_retries=6).images.generate(
            model="spo-tiny", prompt=PROMPT, extra_body={"seed": 11})
        assert result.model_extra["seeds"] == [11]
        assert jobs_created(settings.redis_url, settings.key_prefix) == 1
    finally:
        server.stop()
        worker.stop()


def test_failed_and_cancelled_sync_answers_say_do_not_retry(stalled):
    client = httpx.Client(base_url=stalled.url, timeout=30)
    timed_out = client.post("/v1/images/generations", json={"prompt": PROMPT})
    assert timed_out.status_code == 504 and timed_out.headers["x-should-retry"] == "false"
    assert timed_out.headers["X-Job-Id"] in timed_out.json()["error"]["message"]
    # Refusals that created nothing may be retried (the SDK does, with Retry-After).
    bad = client.post("/v1/images/generations", json={"prompt": PROMPT, "n": 0})
    assert bad.status_code == 400 and "x-should-retry" not in bad.headers


def test_sdk_defaults_and_benign_parameters(service):
    """What OpenAI clients send, through the real SDK: accepted, honoured where it can be (output_format, size auto)
    and the response fields the SDK models are filled."""
    client = sdk(service.url)
    result = client.images.generate(
        model="spo-tiny", prompt=PROMPT, n=2, size="auto", quality="standard", style="vivid", background="auto",
        moderation="auto", output_format="webp", output_compression=90, stream=False, partial_images=0,
        response_format="b64_json", user="user-1", extra_body={"seed": 3})
    assert result.size == "64x64" and result.output_format == "webp" and result.background == "opaque"
    assert result.quality == "standard" and result.safety_identifier == "user-1"
    assert result.usage is not None and result.usage.input_tokens > 2 and result.usage.total_tokens > 2
    assert len(result.data) == 2 and result.model_extra["seeds"] == [3, 4]
    for image in result.data:
        with Image.open(io.BytesIO(base64.b64decode(image.b64_json))) as decoded:
            assert decoded.format == "WEBP" and decoded.size == (64, 64)

    # LangChain's DALL-E wrapper sends quality; jpeg is honoured too; url links serve the same encoding.
    jpeg = client.images.generate(model="spo-tiny", prompt=PROMPT, quality="standard", output_format="jpeg",
                                  response_format="url", extra_body={"seed": 3})
    assert jpeg.output_format == "jpeg"
    linked = httpx.get(jpeg.data[0].url)
    assert linked.headers["content-type"] == "image/jpeg" and linked.content.startswith(b"\xff\xd8")
    png = client.images.generate(model="spo-tiny", prompt=PROMPT)  # no parameter beyond the prompt
    assert png.output_format == "png" and base64.b64decode(png.data[0].b64_json).startswith(b"\x89PNG")


def test_sdk_sees_openai_errors_for_unsupported_values(api):
    client = sdk(api.url, max_retries=0)
    with pytest.raises(openai.BadRequestError) as raised:
        client.images.generate(model="spo-tiny", prompt=PROMPT, background="transparent")
    assert raised.value.code == "invalid_value" and raised.value.param == "background"
    with pytest.raises(openai.BadRequestError) as raised:
        client.images.generate(model="spo-tiny", prompt=PROMPT, extra_body={"colour_space": "p3"})
    assert raised.value.code == "unknown_parameter" and "Unknown parameter: 'colour_space'." in str(raised.value)


def test_edit_and_variation_answer_not_supported(api, tmp_path):
    client = sdk(api.url)
    image = tmp_path / "in.png"
    Image.new("RGB", (512, 512), (200, 10, 10)).save(image)  # large enough to need the whole upload drained
    with pytest.raises(openai.BadRequestError) as raised:
        client.images.edit(image=image.open("rb"), prompt="make it blue")
    assert raised.value.code == "unsupported_endpoint" and "images.edit" in str(raised.value)
    with pytest.raises(openai.BadRequestError) as raised:
        client.images.create_variation(image=image.open("rb"))
    assert raised.value.code == "unsupported_endpoint" and "create_variation" in str(raised.value)
    big = httpx.post(f"{api.url}/v1/images/edits", content=b"x" * (300 * 1024),
                     headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert big.status_code == 400 and big.json()["error"]["code"] == "unsupported_endpoint"  # not a 413
