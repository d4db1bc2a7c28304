"""The API's HTTP server: uvicorn, with request limits that hold whatever HTTP parser it runs (httptools, h11, ...).

uvicorn's parsers differ in what they bound: httptools buffers a request line and headers of any size, h11 stops at
16 KiB with a 400, and neither times out a request that stops arriving half-way (a partial header or body is held
for as long as the client keeps the connection). `GuardedProtocol` sits between the transport and uvicorn's protocol
and enforces, for every HTTP/1.x request:

- its line + headers at most `SPO_MAX_HEADER_BYTES`: past that, 431 and the connection is closed (the parser never
  sees more than the limit, so 20 clients each sending a 4 MiB header cost 20 x the limit, not 80 MiB);
- the whole request (line, headers, body) within `SPO_REQUEST_TIMEOUT_S` of its first byte: past that, 408 (or just
  the close, if the app has already started answering) and the connection is closed;
- a connection that sends nothing is closed after `SPO_KEEPALIVE_TIMEOUT_S` (uvicorn's keep-alive timeout covers the
  time between requests once one has been answered).

It frames requests itself (Content-Length or chunked bodies, pipelined requests); what it cannot frame (an
`Upgrade`, HTTP/2, a malformed head) is passed through for the parser to judge. The body-size limit (413) is the
app's (`app.BodySizeLimit`). `spo api` and `spo serve` run the app through `run_api`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
from dataclasses import dataclass
from typing import Any, cast

import uvicorn
from uvicorn.config import HTTP_PROTOCOLS
from uvicorn.importer import import_from_string

from service.contracts import metrics
from service.contracts.config import Settings

log = logging.getLogger(__name__)

_EMPTY_LINE = re.compile(rb"\n\r?\n")  # ends a head (after its last header line) or a trailer section
_MAX_CHUNK_LINE = 4096  # a chunk-size line (hex size + extensions) longer than this is passed to the parser to judge
_H2_PREFACE = b"PRI * HTTP/2.0"


@dataclass(frozen=True)
class HttpLimits:
    max_header_bytes: int = 32 * 1024
    request_timeout_s: float = 15.0
    keepalive_timeout_s: float = 5.0

    @classmethod
    def of(cls, settings: Settings) -> HttpLimits:
        return cls(settings.max_header_bytes, settings.request_timeout_s, settings.keepalive_timeout_s)


class HeadTooLarge(Exception):
    pass


class RequestFramer:
    """Follows HTTP/1.x request boundaries in the bytes a client sends, without keeping more than one request head.

    `feed` returns nothing; `in_request` says whether a request has begun and not fully arrived, `in_head` whether its
    line and headers are still incomplete, and `passthrough` whether framing stopped (everything after goes to the
    parser unchecked). Raises HeadTooLarge when a head (or a chunked body's trailers) passes the limit."""

    def __init__(self, max_head: int) -> None:
        self.max_head = max_head
        self.state = "idle"  # idle | head | body | chunk_size | chunk_data | chunk_crlf | trailers | passthrough
        self.buffer = b""
        self.remaining = 0

    @property
    def in_request(self) -> bool:
        return self.state not in ("idle", "passthrough")

    @property
    def in_head(self) -> bool:
        return self.state == "head"

    @property
    def passthrough(self) -> bool:
        return self.state == "passthrough"

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view and self.state != "passthrough":
            view = self._step(view)

    def _step(self, view: memoryview) -> memoryview:
        """Consume what the current state takes from `view`; return the rest."""
        if self.state == "idle":
            data = bytes(view)
            skip = len(data) - len(data.lstrip(b"\r\n"))  # blank lines between requests are allowed
            if skip < len(data):
                self.state, self.buffer = "head", b""
            return view[skip:]
        if self.state in ("head", "trailers"):
            start = max(0, len(self.buffer) - 3)  # the empty line may straddle two reads
            self.buffer += bytes(view)
            found = _EMPTY_LINE.search(self.buffer, start)
            end = found.end() if found is not None else len(self.buffer)
            if end > self.max_head + (1 if self.state == "trailers" else 0):
                raise HeadTooLarge
            if found is None:
                return view[len(view):]
            head, rest = self.buffer[:end], self.buffer[end:]
            self.buffer = b""
            if self.state == "head":
                self._after_head(head)
            else:
                self.state = "idle"
            return memoryview(rest)
        if self.state in ("body", "chunk_data"):
            taken = min(self.remaining, len(view))
            self.remaining -= taken
            if self.remaining == 0:
                self.state = "idle" if self.state == "body" else "chunk_crlf"
            return view[taken:]
        if self.state == "chunk_crlf":  # the CRLF after a chunk's data
            byte = bytes(view[:1])
            if byte == b"\r" and not self.buffer:
                self.buffer = b"\r"
                return view[1:]
            if byte == b"\n":
                self.state, self.buffer = "chunk_size", b""
                return view[1:]
            self.state = "passthrough"
            return view
        if self.state == "chunk_size":
            data = bytes(view)
            newline = data.find(b"\n")
            if newline < 0:
                self.buffer += data
                if len(self.buffer) > _MAX_CHUNK_LINE:
                    self.state = "passthrough"
                return view[len(view):]
            line, self.buffer = (self.buffer + data[:newline]).strip(), b""
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                self.state = "passthrough"
                return view
            if size == 0:
                # the trailer section (often empty) ends at an empty line; the buffer holds the newline just read
                self.state, self.buffer = "trailers", b"\n"
            else:
                self.state, self.remaining = "chunk_data", size
            return view[newline + 1:]
        return view[len(view):]

    def _after_head(self, head: bytes) -> None:
        lines = re.split(rb"\r?\n", head.strip(b"\r\n"))
        if lines[0].startswith(_H2_PREFACE):
            self.state = "passthrough"
            return
        length, chunked, upgrade = 0, False, False
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                continue
            name, value = name.strip().lower(), value.strip()
            if name == b"content-length":
                if not value.isdigit():
                    self.state = "passthrough"  # the parser answers 400
                    return
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"upgrade":
                upgrade = True
        method = lines[0].split(b" ", 1)[0].upper()
        if upgrade or method == b"CONNECT":
            self.state = "passthrough"  # what follows is another protocol (websocket, h2c, a tunnel)
        elif chunked:
            self.state, self.buffer = "chunk_size", b""
        elif length > 0:
            self.state, self.remaining = "body", length
        else:
            self.state = "idle"


class _WatchedTransport:
    """The transport as uvicorn's protocol sees it: everything passes through; `wrote` tells whether a response has
    begun since the guard last reset it."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self.wrote = False

    def write(self, data: bytes) -> None:
        self.wrote = True
        self._transport.write(data)

    def writelines(self, data: Any) -> None:
        self.wrote = True
        self._transport.writelines(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def _error_bytes(status: int, reason: str, message: str, code: str) -> bytes:
    body = json.dumps({"error": {"type": "invalid_request_error", "message": message, "param": None,
                                 "code": code}}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n\r\n").encode()
    return head + body


class GuardedProtocol(asyncio.Protocol):
    """Wraps one of uvicorn's HTTP protocols (`INNER`) with `LIMITS`; see the module docstring."""

    INNER: type[asyncio.Protocol]
    LIMITS: HttpLimits

    def __init__(self, config: uvicorn.Config, server_state: Any, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.inner = self.INNER(config=config, server_state=server_state, app_state=app_state,  # type: ignore[call-arg]
                                _loop=_loop)
        self.loop = _loop or asyncio.get_event_loop()
        self.framer = RequestFramer(self.LIMITS.max_header_bytes)
        self.transport: asyncio.Transport | None = None
        self.watched: _WatchedTransport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.closed = False

    # -- asyncio.Protocol ------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio.Transport subclasses
        self.transport = transport
        self.watched = _WatchedTransport(transport)
        self.inner.connection_made(self.watched)  # type: ignore[arg-type]
        self._arm(self.LIMITS.keepalive_timeout_s, self._idle_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._disarm()
        self.inner.connection_lost(exc)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self.framer.passthrough:
            self.inner.data_received(data)
            return
        was_in_request = self.framer.in_request
        try:
            self.framer.feed(data)
        except HeadTooLarge:
            self._reject(431, "Request Header Fields Too Large",
                         f"the request line and headers exceed {self.LIMITS.max_header_bytes} bytes",
                         "request_header_fields_too_large")
            return
        if self.framer.passthrough:
            self._disarm()
        elif self.framer.in_request:
            if not was_in_request or self.timer is None or self._timer_kind != "request":
                assert self.watched is not None
                self.watched.wrote = False
                self._arm(self.LIMITS.request_timeout_s, self._request_timeout, kind="request")
        else:
            self._disarm()  # the request has fully arrived: the app takes its time, uvicorn does keep-alive
        self.inner.data_received(data)

    # -- timers ----------------------------------------------------------------------------------------------

    _timer_kind = ""

    def _arm(self, delay: float, callback: Any, kind: str = "idle") -> None:
        self._disarm()
        self.timer = self.loop.call_later(delay, callback)
        self._timer_kind = kind

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
            self._timer_kind = ""

    def _idle_timeout(self) -> None:
        self.timer = None
        if not self.closed and not self.framer.in_request and self.transport is not None:
            self.transport.close()

    def _request_timeout(self) -> None:
        self.timer = None
        if self.closed or not self.framer.in_request:
            return
        where = "headers" if self.framer.in_head else "body"
        if self.watched is not None and self.watched.wrote:  # the app already answered: just end it
            self._close()
            return
        self._reject(408, "Request Timeout", f"the request {where} did not arrive within "
                                             f"{self.LIMITS.request_timeout_s:g}s of its first byte",
                     "request_timeout")

    def _reject(self, status: int, reason: str, message: str, code: str) -> None:
        metrics.REQUESTS.labels("unmatched", "", str(status)).inc()
        log.info("closing a connection: %d %s", status, message)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_error_bytes(status, reason, message, code))
        self._close()

    def _close(self) -> None:
        self._disarm()
        self.framer.state = "passthrough"
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def guarded(inner: type[asyncio.Protocol] | str, limits: HttpLimits) -> type[GuardedProtocol]:
    """A protocol class for uvicorn's `http=`: `inner` (a class, or uvicorn's name: auto, h11, httptools) behind the
    guard."""
    inner_class = import_from_string(HTTP_PROTOCOLS.get(inner, inner)) if isinstance(inner, str) else inner
    return type(f"Guarded{inner_class.__name__}", (GuardedProtocol,), {"INNER": inner_class, "LIMITS": limits})


def server_config(app: Any, settings: Settings, *, host: str, port: int, log_level: str | None = None,
                  http: str = "auto", **kwargs: Any) -> uvicorn.Config:
    """The uvicorn Config `spo api` / `spo serve` run the app with (tests build theirs here too)."""
    limits = HttpLimits.of(settings)
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=guarded(http, limits),
                          log_config=None,  # uvicorn's records go to the process's handler: one log format
                          # h11's own bound stays above ours, so the client hears 431 rather than h11's 400
                          h11_max_incomplete_event_size=settings.max_header_bytes + 4096,
                          timeout_keep_alive=max(1, math.ceil(settings.keepalive_timeout_s)), **kwargs)


def run_api(app: Any, settings: Settings, *, host: str, port: int, log_level: str | None = None) -> None:
    """Serve until SIGINT/SIGTERM (uvicorn's graceful shutdown, then the signal is re-raised), as uvicorn.run does;
    a server that could not start (port taken, lifespan failure) exits with uvicorn's status 3."""
    server = uvicorn.Server(server_config(app, settings, host=host, port=port, log_level=log_level))
    server.run()
    if not server.started:
        raise SystemExit(3)
