"""Request limits the API's server enforces whatever uvicorn's HTTP parser (httptools, h11): a request line and headers
over SPO_MAX_HEADER_BYTES get 431, a request that does not arrive within SPO_REQUEST_TIMEOUT_S gets 408, an idle
connection is closed. Raw sockets against the real uvicorn server, and against a real `spo api` process."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from service_harness import PROMPT, ApiServer, free_port, make_settings

ROOT = Path(__file__).resolve().parents[2]
MAX_HEADER = 8192
TIMEOUT_S = 1.0


@pytest.fixture(params=["httptools", "h11"])
def limited(request, redis_url, prefix, manifest_path):
    settings = make_settings(redis_url, prefix, manifest_path, max_header_bytes=MAX_HEADER,
                             request_timeout_s=TIMEOUT_S, keepalive_timeout_s=TIMEOUT_S)
    server = ApiServer(settings, http=request.param).start()
    yield server
    server.stop()


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def read_all(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything until the server closes the connection (raises if it does not within `timeout`)."""
    sock.settimeout(timeout)
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def error_of(response: bytes) -> dict:
    return json.loads(response.split(b"\r\n\r\n", 1)[1])["error"]


def send_quietly(sock: socket.socket, data: bytes) -> None:
    """Send what the server may stop reading half-way (it closes the connection once a limit is passed)."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(data)


def test_oversized_headers_are_431(limited):
    sock = connect(limited.url)
    send_quietly(sock, b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * (64 * 1024) + b"\r\n\r\n")
    response = read_all(sock)
    assert status_of(response) == 431, response[:200]
    assert error_of(response)["code"] == "request_header_fields_too_large"
    # Just under the limit is served.
    sock = connect(limited.url)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\nX-Big: " + b"a" * (MAX_HEADER - 200)
                 + b"\r\n\r\n")
    assert status_of(read_all(sock)) == 200


def test_unfinished_huge_headers_do_not_hold_memory(limited):
    """20 connections each sending an unfinished 4 MiB header: each is cut off at the limit (431) and the server
    holds none of it (with httptools alone this took the process from ~100 to ~230 MiB)."""
    process = psutil.Process()
    before = process.memory_info().rss
    socks = [connect(limited.url) for _ in range(20)]
    for sock in socks:
        send_quietly(sock, b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: ")
    piece = b"b" * (256 * 1024)
    for _ in range(16):  # 4 MiB each, never terminated
        for sock in socks:
            send_quietly(sock, piece)
    responses = [read_all(sock) for sock in socks]
    grown_mib = (process.memory_info().rss - before) / 2**20
    assert all(status_of(r) == 431 for r in responses)
    assert grown_mib < 30, f"RSS grew {grown_mib:.0f} MiB"


def test_partial_headers_time_out(limited):
    sock = connect(limited.url)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: ")
    started = time.monotonic()
    response = read_all(sock)
    assert status_of(response) == 408 and error_of(response)["code"] == "request_timeout"
    assert TIMEOUT_S * 0.8 < time.monotonic() - started < TIMEOUT_S + 3


def test_partial_body_times_out(limited):
    sock = connect(limited.url)
    body = json.dumps({"prompt": PROMPT}).encode()
    sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body) + 50).encode() + b"\r\n\r\n" + body)  # 50 bytes never come
    started = time.monotonic()
    response = read_all(sock)
    assert status_of(response) == 408, response[:300]
    assert time.monotonic() - started < TIMEOUT_S + 3


def test_idle_connection_is_closed(limited):
    sock = connect(limited.url)
    started = time.monotonic()
    assert read_all(sock) == b""  # closed without a word: nothing was asked
    assert time.monotonic() - started < TIMEOUT_S + 3


def test_normal_traffic_is_unaffected(limited):
    """Pipelined requests, a chunked body, a body sent in slow pieces (within the timeout) and keep-alive."""
    sock = connect(limited.url)
    get = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
    sock.sendall(get + get + b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert read_all(sock).count(b"HTTP/1.1 200") == 3

    body = json.dumps({"prompt": PROMPT}).encode()
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:10], body[10:]))
    sock = connect(limited.url)
    sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                 b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunked + b"0\r\n\r\n")
    assert status_of(read_all(sock)) == 202

    sock = connect(limited.url)
    head = (b"POST /v1/jobs HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n")
    for piece in (head[:20], head[20:], body[:5], body[5:]):
        sock.sendall(piece)
        time.sleep(TIMEOUT_S / 8)
    sock.settimeout(10)
    first = sock.recv(65536)
    assert status_of(first) == 202
    time.sleep(TIMEOUT_S / 2)  # kept alive between requests
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert b"200 OK" in read_all(sock)


def test_spo_api_enforces_the_limits(redis_url, prefix, manifest_path, tmp_path):
    """The real command, with the limits from its environment."""
    port = free_port()
    env = {**os.environ, "SPO_KEY_PREFIX": prefix, "SPO_MAX_HEADER_BYTES": str(MAX_HEADER),
           "SPO_REQUEST_TIMEOUT_S": "1", "SPO_LOG_LEVEL": "WARNING"}
    env.pop("SPO_API_KEYS", None)
    env.pop("SPO_API_KEYS_FILE", None)
    log = tmp_path / "api.log"
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "api", "--manifest", str(manifest_path),
                             "--redis-url", redis_url, "--host", "127.0.0.1", "--port", str(port)],
                            env=env, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                sock = connect(url)
                break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        send_quietly(sock, b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * (1024 * 1024) + b"\r\n\r\n")
        assert status_of(read_all(sock)) == 431
        sock = connect(url)
        sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{")
        assert status_of(read_all(sock)) == 408
        sock = connect(url)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert b"200 OK" in read_all(sock)
    finally:
        proc.terminate()
        proc.wait(30)
