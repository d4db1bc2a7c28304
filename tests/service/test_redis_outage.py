"""Redis down: the API answers 503 with an error body (health stays up), and recovers when Redis is back; a worker
rides out the outage and serves again."""

from __future__ import annotations

import time

import httpx
from service_harness import PROMPT, ApiServer, ThreadWorker, free_port, make_settings, wait_status

from service.embedded_redis import EmbeddedRedis


def test_api_with_unreachable_redis_is_503(prefix, manifest_path):
    closed = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    server = ApiServer(make_settings(closed, prefix, manifest_path)).start()
    try:
        response = httpx.post(f"{server.url}/v1/jobs", json={"prompt": PROMPT})
        assert response.status_code == 503
        error = response.json()["error"]
        assert error["type"] == "service_unavailable" and error["code"] == "queue_unavailable"
        assert response.headers["Retry-After"]
        assert httpx.get(f"{server.url}/v1/jobs/abc").status_code == 503
        assert httpx.get(f"{server.url}/readyz").status_code == 503
        assert httpx.get(f"{server.url}/healthz").status_code == 200
        assert httpx.get(f"{server.url}/metrics").status_code == 200
        # Bad input is still a 400, not a 503.
        assert httpx.post(f"{server.url}/v1/jobs", json={"prompt": PROMPT, "n": 0}).status_code == 400
    finally:
        server.stop()


def test_redis_restart_503_then_recovery(prefix, manifest_path, runner, tmp_path):
    redis_server = EmbeddedRedis(tmp_path / "redis", port=free_port())
    redis_server.start()
    settings = make_settings(redis_server.url, prefix, manifest_path)
    server = ApiServer(settings).start()
    worker = ThreadWorker(settings, runner).start()
    client = httpx.Client(base_url=server.url, timeout=60)
    try:
        first = client.post("/v1/jobs", json={"prompt": PROMPT, "seed": 1}).json()
        wait_status(client, first["id"], {"succeeded"})

        redis_server.stop()
        down = client.post("/v1/jobs", json={"prompt": PROMPT})
        assert down.status_code == 503 and down.json()["error"]["code"] == "queue_unavailable"
        assert client.post("/v1/images/generations", json={"prompt": PROMPT}).status_code == 503
        time.sleep(1.0)  # the worker's loop sees errors and backs off meanwhile

        redis_server.start()  # same address, empty data (no persistence): groups are recreated on demand
        deadline = time.monotonic() + 20
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "service did not become ready after Redis came back"
            time.sleep(0.1)
        again = client.post("/v1/images/generations", json={"prompt": PROMPT, "seed": 1})
        assert again.status_code == 200 and again.json()["seeds"] == [1]
    finally:
        server.stop()
        worker.stop()
        redis_server.close()
