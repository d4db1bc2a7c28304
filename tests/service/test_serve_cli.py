"""`spo serve` on one machine with no Redis configured (embedded), driven by curl and the openai SDK exactly as the
README shows; and the serving subcommands' flag errors."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from service_harness import PROMPT, free_port, wait_process_ready

from service.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_spo_serve_with_embedded_redis(manifest_path, tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPO_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update({"SPO_TORCH_THREADS": "1", "SPO_HEARTBEAT_INTERVAL_S": "0.5"})
    log_path = tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--manifest",
                             str(manifest_path)], env=env, cwd=ROOT, stdout=log_path.open("w"),
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_process_ready(proc, url, log_path, timeout=120)
        assert "started a private embedded Redis" in log_path.read_text()

        if shutil.which("curl"):  # the README's curl example
            out = subprocess.run(
                ["curl", "-s", f"{url}/v1/images/generations", "-H", "Content-Type: application/json",
                 "-d", json.dumps({"model": "spo-tiny", "prompt": PROMPT, "size": "64x64", "seed": 7})],
                capture_output=True, text=True, check=True, timeout=60)
            reply = json.loads(out.stdout)
            assert reply["seeds"] == [7]
            assert base64.b64decode(reply["data"][0]["b64_json"]).startswith(b"\x89PNG")

        import openai  # the README's SDK example (a dev dependency)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
        result = client.images.generate(model="spo-tiny", prompt=PROMPT, size="64x64", n=2,
                                        response_format="b64_json", extra_body={"seed": 7})
        assert len(result.data) == 2

        # One /metrics shows both processes: the API's request counters and the worker's inference histogram.
        text = httpx.get(f"{url}/metrics").text
        for name in ("spo_requests_total", "spo_inference_seconds_bucket", "spo_batch_size_bucket",
                     "spo_queue_wait_seconds_bucket", "spo_unet_step_seconds_bucket", "spo_job_latency_seconds_count",
                     "spo_queue_depth", "spo_worker_heartbeat_age_seconds", "spo_jobs_total"):
            assert name in text, name
        assert 'spo_jobs_total{model="spo-tiny",status="succeeded"}' in text
        assert 'spo_requests_total{endpoint="/v1/images/generations",method="POST",status="200"}' in text
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    log = log_path.read_text()
    assert code == 0, log
    assert "stopped the embedded Redis" in log and "draining" in log


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["worker", "--model", "nope"], "--model"),
        (["worker", "--model", "spo-tiny"], "--redis-url"),
        (["api"], "--redis-url"),
        (["serve", "--manifest", "/nonexistent.yaml"], "--manifest"),
        (["serve", "--port", "70000"], "--port"),
        (["serve", "--max-batch", "0"], "--max-batch"),
    ],
)
def test_serving_flag_errors_name_the_flag(argv, flag, manifest_path, capsys, monkeypatch):
    monkeypatch.delenv("SPO_REDIS_URL", raising=False)
    if "--manifest" not in argv:
        argv = [*argv, "--manifest", str(manifest_path)]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err
