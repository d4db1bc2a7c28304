"""API keys (Bearer, constant-time check, keys file) and the per-key rate limit kept in Redis."""

from __future__ import annotations

import httpx
import pytest
from service_harness import PROMPT, ApiServer, make_settings

from service.api.auth import Authenticator, key_scope
from service.api.errors import ApiError


@pytest.fixture
def secured(redis_url, prefix, manifest_path, tmp_path):
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("# rotated monthly\nfile-key-3  # ops\n\n")
    settings = make_settings(redis_url, prefix, manifest_path, api_keys=["key-1", "key-2"], api_keys_file=keys_file,
                             rate_limit_per_minute=3)
    server = ApiServer(settings).start()
    yield server
    server.stop()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_v1_requires_a_valid_key(secured):
    url = secured.url
    missing = httpx.post(f"{url}/v1/jobs", json={"prompt": PROMPT})
    assert missing.status_code == 401
    assert missing.json()["error"]["type"] == "authentication_error"
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    assert httpx.post(f"{url}/v1/jobs", json={"prompt": PROMPT}, headers=bearer("key-9")).status_code == 401
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Basic a2V5LTE="}).status_code == 401
    assert httpx.get(f"{url}/v1/models").status_code == 401
    # Auth comes before validation: an anonymous bad request learns nothing about the API.
    assert httpx.post(f"{url}/v1/jobs", json={"prompt": PROMPT, "n": 99}).status_code == 401

    assert httpx.get(f"{url}/v1/models", headers=bearer("key-1")).status_code == 200
    job = httpx.post(f"{url}/v1/jobs", json={"prompt": PROMPT}, headers=bearer("file-key-3"))
    assert job.status_code == 202
    # Jobs are private to the key that created them.
    job_id = job.json()["id"]
    assert httpx.get(f"{url}/v1/jobs/{job_id}", headers=bearer("file-key-3")).status_code == 200
    assert httpx.get(f"{url}/v1/jobs/{job_id}", headers=bearer("key-1")).status_code == 404


def test_ops_endpoints_stay_open(secured):
    assert httpx.get(f"{secured.url}/healthz").status_code == 200
    assert httpx.get(f"{secured.url}/metrics").status_code == 200
    assert httpx.get(f"{secured.url}/readyz").status_code == 503  # no worker, but not 401
    assert httpx.get(f"{secured.url}/docs").status_code == 200


def test_rate_limit_per_key(secured):
    url = secured.url
    codes = [httpx.post(f"{url}/v1/jobs", json={"prompt": PROMPT}, headers=bearer("key-2")).status_code
             for _ in range(4)]
    assert codes == [202, 202, 202, 429]
    limited = httpx.post(f"{url}/v1/jobs", json={"prompt": PROMPT}, headers=bearer("key-2"))
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    # Another key has its own budget; reads are not counted.
    assert httpx.post(f"{url}/v1/jobs", json={"prompt": PROMPT}, headers=bearer("key-1")).status_code == 202
    assert httpx.get(f"{url}/v1/models", headers=bearer("key-2")).status_code == 200


def test_authenticator_without_keys_is_open():
    auth = Authenticator([])
    assert not auth.enabled and auth.authenticate(None) == "anonymous"
    closed = Authenticator(["secret"])
    assert closed.authenticate("Bearer secret") == key_scope("secret") != "secret"  # keys are never kept as scope
    with pytest.raises(ApiError):
        closed.authenticate("Bearer secre")


def test_idempotent_replays_do_not_count_against_the_rate_limit(secured):
    url = secured.url
    replay = {**bearer("key-2"), "Idempotency-Key": "order-7"}
    first = httpx.post(f"{url}/v1/jobs", json={"prompt": PROMPT}, headers=replay)
    assert first.status_code == 202
    for _ in range(5):  # a client retrying the same submission is not five submissions
        again = httpx.post(f"{url}/v1/jobs", json={"prompt": PROMPT}, headers=replay)
        assert again.status_code == 202 and again.headers["Idempotent-Replayed"] == "true"
        assert again.json()["id"] == first.json()["id"]
    codes = [httpx.post(f"{url}/v1/jobs", json={"prompt": PROMPT}, headers=bearer("key-2")).status_code
             for _ in range(3)]
    assert codes == [202, 202, 429]  # the limit is 3 per minute: the replays used none of it


# -- fail closed: a keys setting that yields no key stops start-up ------------------------------------------------


@pytest.mark.parametrize("raw", [" ", ",", " , ,", "\t"])
def test_keys_variable_without_a_key_is_an_error(raw, monkeypatch):
    from pydantic import ValidationError

    from service.contracts.config import Settings

    monkeypatch.setenv("SPO_API_KEYS", raw)
    with pytest.raises(ValidationError, match="contains no API key"):
        Settings()
    monkeypatch.setenv("SPO_API_KEYS", "")  # empty (docker-compose's default): no auth, as documented
    assert Settings().load_api_keys() == []
    monkeypatch.setenv("SPO_API_KEYS", " a , b ,")
    assert Settings().load_api_keys() == ["a", "b"]


def test_keys_file_without_a_key_stops_the_app(redis_url, prefix, manifest_path, tmp_path):
    from service.api.app import create_app
    from service.contracts.config import ConfigError

    comments = tmp_path / "keys.txt"
    comments.write_text("# rotated monthly\n\n   # nobody yet\n")
    with pytest.raises(ConfigError, match="holds no API key"):
        create_app(make_settings(redis_url, prefix, manifest_path, api_keys_file=comments))
    with pytest.raises(ConfigError, match="cannot read"):
        create_app(make_settings(redis_url, prefix, manifest_path, api_keys_file=tmp_path / "absent.txt"))


@pytest.mark.parametrize("setting", ["SPO_API_KEYS", "SPO_API_KEYS_FILE"])
def test_spo_api_refuses_to_start_open_when_keys_were_meant(setting, redis_url, manifest_path, tmp_path):
    """The real command: `spo api` exits with a message naming the setting, instead of serving without auth."""
    import os
    import subprocess
    import sys

    from service_harness import free_port

    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("# only comments\n")
    env = {**os.environ, setting: " , " if setting == "SPO_API_KEYS" else str(keys_file)}
    env.pop("SPO_API_KEYS" if setting == "SPO_API_KEYS_FILE" else "SPO_API_KEYS_FILE", None)
    proc = subprocess.run([sys.executable, "-m", "service.cli", "api", "--manifest", str(manifest_path),
                           "--redis-url", redis_url, "--port", str(free_port())],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert setting in proc.stderr and "API key" in proc.stderr
    assert "Uvicorn running" not in proc.stderr
