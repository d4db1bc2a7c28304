"""What operators run into: a worker backlog full of jobs its batch cannot take, pooled connections that went stale
in a Redis restart, jobs a Redis restart lost, dead workers' consumers and heartbeats, the OpenAPI document."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import threading
import time

import httpx
import pytest
import redis
from service_harness import PROMPT, ApiServer, free_port, make_settings

from service.contracts.queue import GROUP, Claim, Job, JobParams, JobQueue, Keys, connect, new_job_id
from service.embedded_redis import EmbeddedRedis


class _Spec:
    name = "spo-tiny"
    backend = "torch"


class _IdleRunner:
    """Enough of a runner for the claiming half of the worker loop."""

    spec = _Spec()
    device = "cpu"
    max_images = None


def _claim(job_id: str, n: int, size: int) -> Claim:
    params = JobParams(model="spo-tiny", prompt=PROMPT, negative_prompt="", n=n, width=size, height=size, steps=4,
                       guidance=5.0, seeds=tuple(range(n)))
    return Claim(job=Job(id=job_id, params=params, status="queued", priority="normal", created_at=time.time()),
                 stream="s", entry_id=f"0-{job_id}")


def test_backlog_of_incompatible_jobs_never_reads_with_count_below_one(settings):
    """max_batch 4; the backlog holds a 64x64 job and a 128x128 job of 4 images: the next batch (the 64x64 job) could
    grow, but the backlog has no room. The loop used to call XREADGROUP with COUNT 4 - 5 (a Redis error, logged as
    one, and a 0.2 s stall, every turn)."""
    from service.worker.loop import Worker

    async def scenario() -> list[int]:
        client = connect(settings.redis_url)
        queue = JobQueue(client, settings.key_prefix)
        counts: list[int] = []
        real_read = queue.read

        async def spy(model: str, consumer: str, count: int, block_ms: int = 0) -> list[Claim]:
            counts.append(count)
            return await real_read(model, consumer, count, block_ms)

        queue.read = spy  # type: ignore[method-assign]
        worker = Worker(queue, _IdleRunner(), settings.model_copy(update={"max_wait_ms": 300}))  # type: ignore[arg-type]
        await queue.ensure_groups("spo-tiny")
        worker.backlog = [_claim("a", 1, 64), _claim("b", 4, 128)]
        worker._under_load = True
        started = time.monotonic()
        await worker._fill_backlog()
        assert time.monotonic() - started < 1.0
        assert await queue.read("spo-tiny", "c", 0) == []  # and the queue method itself refuses such a count
        await client.aclose()
        return counts

    counts = asyncio.run(scenario())
    assert all(c >= 1 for c in counts[:-1]), counts


@pytest.fixture
def restartable(tmp_path):
    server = EmbeddedRedis(tmp_path / "redis", port=free_port())
    server.start()
    yield server
    server.close()


class StaleProxy:
    """A TCP proxy to Redis that can make every open connection stale at once, the way a Redis restart behind a
    service address (a new pod, a failover) leaves a client's pooled sockets: they look open, and the first command
    sent on one is answered with a reset."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.pairs: list[dict] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            pair = {"client": client, "upstream": socket.create_connection(("127.0.0.1", self.upstream_port)),
                    "stale": False}
            self.pairs.append(pair)
            threading.Thread(target=self._pump, args=(pair, "client", "upstream"), daemon=True).start()
            threading.Thread(target=self._pump, args=(pair, "upstream", "client"), daemon=True).start()

    def _pump(self, pair: dict, source: str, target: str) -> None:
        while True:
            try:
                data = pair[source].recv(65536)
            except OSError:
                data = b""
            if pair["stale"]:
                if source == "client" and data:  # the first command on a stale connection: reset, as a new host
                    pair["client"].setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    pair["client"].close()
                return
            if not data:
                with contextlib.suppress(OSError):
                    pair[target].shutdown(socket.SHUT_WR)
                return
            with contextlib.suppress(OSError):
                pair[target].sendall(data)

    def make_stale(self) -> None:
        for pair in self.pairs:
            pair["stale"] = True
            with contextlib.suppress(OSError):
                pair["upstream"].close()
        self.pairs = []

    def close(self) -> None:
        self.listener.close()


def test_stale_pooled_connections_are_retried_on_a_fresh_one(redis_url, prefix, manifest_path):
    """After a Redis restart every pooled connection is dead; a command on one is retried once on a fresh
    connection, so the first requests after Redis is back are served instead of answered 503."""
    proxy = StaleProxy(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    api = ApiServer(make_settings(proxy.url, prefix, manifest_path)).start()
    try:
        with httpx.Client(base_url=api.url, timeout=30) as client:
            def burst() -> list[int]:
                results: list[int] = []

                def one() -> None:
                    results.append(client.post("/v1/jobs", json={"prompt": PROMPT}).status_code)

                threads = [threading.Thread(target=one) for _ in range(6)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                return results

            assert burst() == [202] * 6  # fills the pool with several connections
            proxy.make_stale()
            assert burst() == [202] * 6
            assert client.get("/readyz").status_code == 503  # (no worker) but Redis answered: not a stale failure
    finally:
        api.stop()
        proxy.close()


def test_jobs_lost_in_a_redis_restart_are_reported_as_lost(restartable, prefix, manifest_path):
    settings = make_settings(restartable.url, prefix, manifest_path, sync_timeout_s=30.0)
    api = ApiServer(settings).start()
    client = httpx.Client(base_url=api.url, timeout=60)
    try:
        queued = client.post("/v1/jobs", json={"prompt": PROMPT}).json()["id"]
        # A sync call waiting on a job (a heartbeat stands in for a worker that never takes it)
        raw = redis.Redis.from_url(restartable.url)
        raw.hset(Keys(prefix).workers("spo-tiny"), "ghost", json.dumps({"ts": time.time() + 600}))
        raw.close()
        waiting: dict[str, httpx.Response] = {}
        thread = threading.Thread(target=lambda: waiting.setdefault(
            "r", client.post("/v1/images/generations", json={"prompt": PROMPT})))
        thread.start()
        time.sleep(1.0)
        restartable.stop()
        restartable.start()  # no persistence: every job is gone
        thread.join(30)
        lost_sync = waiting["r"]
        assert lost_sync.status_code == 503, lost_sync.text
        assert lost_sync.json()["error"]["code"] == "job_lost" and lost_sync.headers["Retry-After"]
        lost = client.get(f"/v1/jobs/{queued}")
        assert lost.status_code == 404 and lost.json()["error"]["code"] == "job_lost", lost.text
        assert "restarted" in lost.json()["error"]["message"]
        # Told apart from a job that expired, and from one that never existed.
        old = new_job_id("0" * 40, now=time.time() - settings.job_ttl_s - 60)
        assert client.get(f"/v1/jobs/{old}").json()["error"]["code"] == "job_expired"
        assert client.get("/v1/jobs/nope").json()["error"]["code"] == "job_not_found"
        fresh = client.post("/v1/jobs", json={"prompt": PROMPT}).json()["id"]
        assert client.get(f"/v1/jobs/{fresh}").status_code == 200
    finally:
        client.close()
        api.stop()


def test_dead_workers_are_pruned_from_group_heartbeats_and_metrics(settings, api):
    keys = Keys(settings.key_prefix)
    stream = keys.stream("spo-tiny", "normal")
    sync = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    now = time.time()

    async def setup_and_prune() -> tuple[list[str], list[str]]:
        client = connect(settings.redis_url)
        queue = JobQueue(client, settings.key_prefix)
        await queue.ensure_groups("spo-tiny")
        for name in ("dead-1", "dead-2", "live-1"):  # consumers that read before, with nothing pending now
            await client.xgroup_createconsumer(stream, GROUP, name)
        await client.xadd(stream, {"job": "x"})
        await client.xreadgroup(GROUP, "dead-3", {stream: ">"}, count=1)  # holds an entry: must stay
        for name, age in (("dead-1", 300), ("dead-2", 300), ("dead-3", 300), ("live-1", 0)):
            await client.hset(keys.workers("spo-tiny"), name, json.dumps({"ts": now - age}))
        await asyncio.sleep(1.2)
        # scrape before: every heartbeat, dead or alive, has a series
        scraped = httpx.get(f"{api.url}/metrics").text
        assert 'worker="dead-1"' in scraped and 'worker="live-1"' in scraped
        await client.xreadgroup(GROUP, "live-1", {stream: ">"}, count=1)  # live-1 keeps reading and beating
        await client.hset(keys.workers("spo-tiny"), "live-1", json.dumps({"ts": time.time()}))
        removed = await queue.prune("spo-tiny", stale_s=1.0, heartbeat_max_age_s=60)
        await client.aclose()
        return removed

    consumers, beats = asyncio.run(setup_and_prune())
    assert consumers == ["dead-1", "dead-2"]  # dead-3 still holds an entry (it will be reclaimed first)
    assert sorted(beats) == ["dead-1", "dead-2", "dead-3"]
    assert sorted(c["name"] for c in sync.xinfo_consumers(stream, GROUP)) == ["dead-3", "live-1"]
    assert set(sync.hkeys(keys.workers("spo-tiny"))) == {"live-1"}
    scraped = httpx.get(f"{api.url}/metrics").text
    assert 'worker="live-1"' in scraped and 'worker="dead-1"' not in scraped
    sync.close()


def test_openapi_document_matches_the_api(api, redis_url, prefix, manifest_path):
    doc = httpx.get(f"{api.url}/openapi.json").json()
    paths = doc["paths"]

    def statuses(path: str, method: str) -> set[str]:
        return set(paths[path][method]["responses"])

    assert statuses("/v1/images/generations", "post") == {"200", "400", "404", "409", "413", "422", "429", "500",
                                                          "503", "504"}
    assert statuses("/v1/jobs", "post") == {"202", "400", "404", "413", "422", "429", "503"}
    assert statuses("/v1/jobs/{job_id}/cancel", "post") == {"200", "202", "404", "409", "503"}
    assert statuses("/readyz", "get") == {"200", "503"}
    assert "image/webp" in paths["/v1/jobs/{job_id}/images/{k}"]["get"]["responses"]["200"]["content"]
    assert all("422" not in op["responses"] or path in ("/v1/images/generations", "/v1/jobs")
               for path, item in paths.items() for op in item.values())
    request = doc["components"]["schemas"]["ImageGenerationRequest"]["properties"]
    assert request["n"]["maximum"] == 4
    assert request["model"]["anyOf"][0]["enum"] == ["spo-tiny"]
    assert request["size"]["anyOf"][0]["pattern"] == "^(?:[aA][uU][tT][oO]|64[xX]64|128[xX]128)$"
    assert request["num_inference_steps"]["anyOf"][0]["maximum"] == 60
    guidance = request["guidance_scale"]["anyOf"][0]
    assert (guidance["minimum"], guidance["maximum"]) == (0.0, 20.0)
    assert request["prompt"]["x-max-tokens"] == 16 and request["prompt"]["pattern"] == r"\S"
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": doc["components"]["securitySchemes"]["bearerAuth"][
            "description"]}
    assert "security" not in paths["/v1/jobs"]["post"]  # this deployment has no keys
    # with keys, every /v1 operation requires the bearer scheme and documents 401; the ops routes stay open
    secured = ApiServer(make_settings(redis_url, prefix, manifest_path, api_keys=["k"])).start()
    try:
        doc = httpx.get(f"{secured.url}/openapi.json").json()
        for path, item in doc["paths"].items():
            for op in item.values():
                if path.startswith("/v1/"):
                    assert op["security"] == [{"bearerAuth": []}] and "401" in op["responses"], path
                else:
                    assert "security" not in op and "401" not in op["responses"], path
    finally:
        secured.stop()
