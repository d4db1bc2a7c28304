"""The playground's HTTP side, without a browser: what `/` serves and with which headers, that the page loads
nothing from elsewhere, the switch that turns it off, its status route, and that the static files ship in the
package (the API image installs the package, so that is all the page adds to it)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from service_harness import ApiServer, free_port, make_settings

from service.api.app import create_app
from service.api.playground import CSP, STATIC
from service.contracts.config import DEFAULT_MANIFEST

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "a white triangle on a black background"


def settings_for(redis_url: str, prefix: str = "spotest:playground", **overrides):
    return make_settings(redis_url, prefix, DEFAULT_MANIFEST, models=["spo-tiny"], **overrides)


@pytest.fixture
def client(monkeypatch) -> TestClient:
    """The app without its lifespan (no Redis needed for static files)."""
    monkeypatch.delenv("SPO_PLAYGROUND", raising=False)
    return TestClient(create_app(settings_for(f"redis://127.0.0.1:{free_port()}/0")))


class Page(HTMLParser):
    """Every tag with its attributes, and the text inside <script> and <style> elements."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.inline: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in = tag if tag in ("script", "style") else None

    def handle_endtag(self, tag):
        self._in = None

    def handle_data(self, data):
        if self._in and data.strip():
            self.inline.append(data)


def test_index_is_the_playground_with_a_same_origin_policy(client):
    response = client.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    policy = dict(part.strip().split(" ", 1) for part in response.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'self'" and policy["script-src"] == "'self'" and policy["style-src"] == "'self'"
    assert policy["connect-src"] == "'self'" and policy["img-src"] == "'self' blob:"
    assert policy["object-src"] == "'none'" and policy["frame-ancestors"] == "'none'"
    assert response.headers["content-security-policy"] == CSP
    assert response.headers["x-content-type-options"] == "nosniff"

    page = Page()
    page.feed(response.text)
    tags = page.tags
    # The form a test and a screen reader rely on: a labelled prompt textarea and a submit button.
    assert ("textarea", {"id": "prompt", "name": "prompt", "rows": "3", "required": None,
                         "aria-describedby": "prompt-error",
                         "placeholder": "a red circle on a blue background"}) in tags
    assert any(t == "button" and a.get("type") == "submit" for t, a in tags)
    labelled = {a["for"] for t, a in tags if t == "label"}
    controls = {a["id"] for t, a in tags if t in ("input", "select", "textarea")}
    assert controls <= labelled, controls - labelled  # every control has a label
    # Nothing inline (the policy would block it) and nothing from another origin.
    assert page.inline == []
    assert not [a for _, a in tags for name in a if name == "style" or name.startswith("on")]
    urls = [a[k] for _, a in tags for k in ("src", "href") if a.get(k) and not a[k].startswith("#")]
    assert urls and all(u.startswith("/playground/") for u in urls), urls
    for url in urls:  # each one is served
        assert client.get(url).status_code == 200, url


def test_assets_only_the_listed_files(client):
    script = client.get("/playground/playground.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert script.text == (STATIC / "playground.js").read_text()
    assert client.get("/playground/playground.css").headers["content-type"].startswith("text/css")
    for name in ("index.html", "nope.js", "..%2Fplayground.py", "%2E%2E%2Fapp.py"):
        missing = client.get(f"/playground/{name}")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found", name
    # The API's own routes are unchanged (and still documented); the page's are not part of the API schema.
    schema = client.get("/openapi.json").json()["paths"]
    assert "/v1/jobs" in schema and "/" not in schema and not [p for p in schema if p.startswith("/playground")]


@pytest.mark.parametrize("value", ["false", "0", "no"])
def test_spo_playground_false_switches_it_off(monkeypatch, value):
    monkeypatch.setenv("SPO_PLAYGROUND", value)
    client = TestClient(create_app(settings_for(f"redis://127.0.0.1:{free_port()}/0")))
    for path in ("/", "/playground/playground.js", "/playground/status"):
        assert client.get(path).status_code == 404, path
    assert client.get("/healthz").status_code == 200


def test_status_reports_queue_depth_and_live_workers(redis_url, prefix, monkeypatch):
    monkeypatch.delenv("SPO_PLAYGROUND", raising=False)
    server = ApiServer(settings_for(redis_url, prefix, api_keys=["k"])).start()
    try:
        status = httpx.get(f"{server.url}/playground/status")  # open, like /metrics, even with keys set
        assert status.status_code == 200 and status.json() == {"models": {"spo-tiny": {"queue_depth": 0,
                                                                                       "workers": 0}}}
        for _ in range(2):
            assert httpx.post(f"{server.url}/v1/jobs", json={"prompt": PROMPT},
                              headers={"Authorization": "Bearer k"}).status_code == 202
        assert httpx.get(f"{server.url}/playground/status").json()["models"]["spo-tiny"]["queue_depth"] == 2
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'spo_queue_depth{model="spo-tiny"} 2.0' in metrics  # the same number /metrics exports
    finally:
        server.stop()


def test_status_is_503_while_redis_is_down(prefix, monkeypatch):
    monkeypatch.delenv("SPO_PLAYGROUND", raising=False)
    server = ApiServer(settings_for(f"redis://127.0.0.1:{free_port()}/0", prefix)).start()
    try:
        down = httpx.get(f"{server.url}/playground/status")
        assert down.status_code == 503 and down.json()["error"]["code"] == "queue_unavailable"
        assert down.headers["retry-after"] == "5"
    finally:
        server.stop()


def test_the_static_files_ship_in_the_package(tmp_path):
    """Build the wheel the way the API image does (pip, isolated build, from the pyproject, README, service and
    training it copies): the page's files are in it, beside the module that serves them."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("service", "training"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"service/api/static/{p.name}" for p in STATIC.iterdir()}
    assert shipped <= names, shipped - names
    assert "service/api/playground.py" in names
