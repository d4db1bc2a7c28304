"""The API process never imports torch (its image stays small and its start fast)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, sys
from fastapi.testclient import TestClient
from service.api.app import create_app
from service.contracts.config import Settings
app = create_app(Settings(manifest=sys.argv[1], redis_url=sys.argv[2], key_prefix=sys.argv[3]))
with TestClient(app) as client:
    statuses = [client.get("/v1/models").status_code,
                client.post("/v1/jobs", json={"prompt": "a red circle on a blue background", "n": 99}).status_code,
                client.post("/v1/jobs", json={"prompt": "red " * 40}).status_code,
                client.get("/metrics").status_code]
print(json.dumps({"statuses": statuses, "loaded": sorted(m for m in ("torch", "diffusers") if m in sys.modules)}))
"""


def test_api_process_does_not_import_torch(manifest_path, redis_url, prefix):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(manifest_path), redis_url, prefix], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["statuses"] == [200, 400, 400, 200]  # the tokenizer-based validation ran
    assert result["loaded"] == []
