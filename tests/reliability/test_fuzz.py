"""Schemathesis against the live openapi.json with every check: a schema-valid request is accepted (the token limit
is the one documented exception, `fuzz_hooks.positive_data_accepted`), a schema-invalid one is a 4xx, every answer's
status, content type, headers and body are the documented ones, no 5xx, and with API keys on, no /v1 route answers
without one. A worker with an instant runner serves the jobs (this fuzzes the API, not the model).

SPO_FUZZ_MAX_EXAMPLES cases per operation and phase (default 25: a few hundred cases in all; the long run uses 150,
over 1,000); SPO_FUZZ_SEED for a reproducible run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import env_int
from harness import InstantRunner, table
from service_harness import ApiServer, ThreadWorker, make_settings, wait_ready

pytestmark = pytest.mark.reliability
HERE = Path(__file__).resolve().parent
KEY = "fuzz-key"


def test_schemathesis_all_checks(redis_url, prefix, manifest_path, tmp_path):
    from service.contracts.manifest import load_manifest

    settings = make_settings(redis_url, prefix, manifest_path, api_keys=[KEY], queue_max_length=1_000_000,
                             job_ttl_s=120, sync_timeout_s=20.0, visibility_timeout_s=30.0, max_wait_ms=0)
    server = ApiServer(settings).start()
    worker = ThreadWorker(settings, InstantRunner(load_manifest(manifest_path).get("spo-tiny"))).start()
    report = tmp_path / "report.json"
    examples = env_int("SPO_FUZZ_MAX_EXAMPLES", 25)
    try:
        wait_ready(server.url)
        cmd = [sys.executable, "-m", "schemathesis.cli", "run", f"{server.url}/openapi.json", "--checks", "all",
               "--exclude-checks", "positive_data_acceptance", "--max-examples", str(examples),
               "--header", f"Authorization: Bearer {KEY}", "--workers", "1", "--request-timeout", "30",
               "--seed", os.environ.get("SPO_FUZZ_SEED", "21"), "--suppress-health-check", "all",
               "--report", "json", "--report-json-path", str(report), "--no-color"]
        env = {**os.environ, "SCHEMATHESIS_HOOKS": "fuzz_hooks",
               "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3000, cwd=tmp_path)
    finally:
        server.stop()
        worker.stop()
    output = run.stdout + run.stderr
    (tmp_path / "schemathesis.txt").write_text(output)
    counts = summarize(report) if report.exists() else {}
    table("schemathesis", {"max examples per operation and phase": examples, "exit status": run.returncode,
                           **counts})
    assert run.returncode == 0, output[-12000:]
    assert int(counts.get("test cases generated") or 0) > 0, output[-3000:]


def summarize(report: Path) -> dict[str, object]:
    """Cases and failures from schemathesis' JSON run report."""
    data = json.loads(report.read_text())
    cases = data.get("test_cases", {})
    return {"operations tested": data.get("operations", {}).get("tested"),
            "test cases generated": cases.get("generated"), "cases with failures": cases.get("with_failures"),
            "errored cases": cases.get("errored"),
            "failures": {f["title"]: f["count"] for f in data.get("failures", [])} or 0,
            "errors": {e["title"]: e["count"] for e in data.get("errors", [])} or 0,
            "phases": {name: phase["status"] for name, phase in data.get("phases", {}).items()}}
