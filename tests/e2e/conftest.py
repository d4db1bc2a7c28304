"""Fixtures for the browser tests of the web playground: the system's Chromium driven by playwright, and the
service it talks to (a real `spo serve`, or the API alone in a thread from the service tests' harness).

Chromium is Debian's `chromium` package (`apt-get install -y chromium`; .ci/run installs it), found on PATH or at
SPO_CHROMIUM; playwright's own browser downloads are not used. Without either, the browser tests skip and say why.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "service"))  # the service tests' harness (service_harness.py)

from playground_harness import DESKTOP  # noqa: E402
from service_harness import free_port, wait_process_ready  # noqa: E402


def chromium_path() -> str | None:
    for candidate in (os.environ.get("SPO_CHROMIUM"), "chromium", "chromium-browser"):
        if candidate and (found := shutil.which(candidate)):
            return found
    return None


def _missing(message: str) -> None:
    """Skip the browser tests, or fail them in CI, which installs the browser and must run them."""
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI=true: .ci/run should have installed it)")
    pytest.skip(message)


@pytest.fixture(scope="module")  # not the session: playwright's sync API keeps an asyncio loop running in this
def browser():                    # thread while it is open, and later tests' asyncio.run() would refuse to start
    path = chromium_path()
    if path is None:
        _missing("no Chromium on PATH (Debian: apt-get install -y chromium; .ci/run installs it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright package is not installed (pip install -e '.[dev]')")
    with sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
        launched = playwright.chromium.launch(executable_path=path, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser):
    """A fresh browser context (its own localStorage and sessionStorage) at desktop size. Collects page errors,
    Content-Security-Policy violations and every request URL, so a test can show the page broke no rule."""
    context = browser.new_context(viewport=DESKTOP)
    opened = context.new_page()
    opened.problems = []
    opened.requests = []
    opened.on("pageerror", lambda err: opened.problems.append(f"page error: {err}"))
    opened.on("console", lambda msg: opened.problems.append(f"console: {msg.text}")
              if "Content Security Policy" in msg.text else None)
    opened.on("request", lambda req: opened.requests.append(req.url))
    yield opened
    context.close()


def _serve_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPO_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update({"SPO_TORCH_THREADS": "1", "SPO_HEARTBEAT_INTERVAL_S": "0.5", **extra})
    return env


@pytest.fixture(scope="module")
def spo_serve(tmp_path_factory) -> Iterator[str]:
    """`spo serve` as a user starts it: the default manifest's embedded default model (spo-tiny) and a private
    Redis; yields its base URL once /readyz answers 200, and stops it with SIGTERM afterwards."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--model",
                             "spo-tiny"], env=_serve_env(), cwd=ROOT, stdout=log_path.open("w"),
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_process_ready(proc, url, log_path, timeout=180)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
