"""One log format for uvicorn and the application: with SPO_LOG_FORMAT=json every line `spo api` writes is one JSON
object (so a cluster's log pipeline parses all of them), uvicorn's startup and access lines included; the default
text format puts uvicorn's lines in the application's pattern too."""

from __future__ import annotations

import json
import re
import sys

import httpx
import pytest
from deploy_paths import ROOT
from processes import Proc, service_env, wait_for
from service_harness import free_port


def run_api(tmp_path, redis_url: str, prefix: str, fmt: str) -> list[str]:
    port = free_port()
    env = service_env(SPO_REDIS_URL=redis_url, SPO_KEY_PREFIX=prefix, SPO_MANIFEST=str(ROOT / "models" /
                      "models.yaml"), SPO_MODELS="spo-tiny", SPO_LOG_FORMAT=fmt, SPO_LOG_LEVEL="INFO")
    api = Proc(f"api-{fmt}", [sys.executable, "-m", "service.cli", "api", "--host", "127.0.0.1", "--port", str(port)],
               env, tmp_path)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for("the API", lambda: httpx.get(f"{url}/healthz", timeout=5).status_code == 200, [api], 60)
        assert httpx.get(f"{url}/v1/models/nope", timeout=5).status_code == 404
        wait_for("the access log line", lambda: "/v1/models/nope" in api.log.read_text(), [api], 10)
    finally:
        api.stop()
    return [line for line in api.log.read_text().splitlines() if line.strip()]


def test_json_logs_are_one_object_per_line(tmp_path, redis_url, prefix):
    lines = run_api(tmp_path, redis_url, prefix, "json")
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON line: {line!r}\n" + "\n".join(lines))
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records), records
    loggers = {r["logger"] for r in records}
    assert "uvicorn.error" in loggers and "uvicorn.access" in loggers, loggers
    assert any(r["logger"] == "uvicorn.access" and "/v1/models/nope" in r["message"] and "404" in r["message"]
               for r in records)
    assert any(r["logger"].startswith("service") for r in records), loggers


def test_text_logs_share_one_pattern(tmp_path, redis_url, prefix):
    lines = run_api(tmp_path, redis_url, prefix, "text")
    pattern = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+: ")
    odd = [line for line in lines if not pattern.match(line) and not line.startswith((" ", "Traceback"))]
    assert not odd, odd
    assert any(" uvicorn.access: " in line for line in lines), lines
