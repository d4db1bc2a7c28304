"""OpenAI-style error bodies `{"error": {"type", "message", "param", "code"}}` and the handlers that produce them.

Bad input is 400 (413 too large, 422 for a reused Idempotency-Key) naming the offending `param`; a failure of ours
is 500 and never caused by input; Redis trouble is 503 with `Retry-After`.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"


class ApiError(Exception):
    """An error to send to the client as it is."""

    def __init__(self, status: int, message: str, *, param: str | None = None, type: str = INVALID_REQUEST,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type
        self.code = code
        self.headers = headers or {}


class BodyTooLarge(StarletteHTTPException):
    """Raised while reading a body over the limit (an HTTPException, so FastAPI's body parsing re-raises it)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds {limit} bytes")


def error_response(status: int, message: str, *, param: str | None = None, type: str = INVALID_REQUEST,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"type": type, "message": message, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _param(loc: tuple) -> str | None:
    """('body', 'size') -> 'size'; ('header', 'idempotency-key') -> 'Idempotency-Key'; the whole body -> None."""
    if not loc:
        return None
    where, *rest = loc
    if where == "header" and rest:
        return "-".join(part.capitalize() for part in str(rest[0]).replace("_", "-").split("-"))
    parts = [str(p) for p in rest if not isinstance(p, int)] if where in ("body", "query", "path") else list(loc)
    return ".".join(parts) or None


def _validation_message(err: dict) -> str:
    param = _param(tuple(err.get("loc", ())))
    kind = err.get("type", "")
    if kind == "json_invalid":
        return "request body is not valid JSON"
    if kind == "extra_forbidden":
        return f"unrecognized request argument: {param}"
    if kind == "missing":
        return f"missing required argument: {param}" if param else "missing request body"
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"{param}: {msg}" if param else msg


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, param=exc.param, type=exc.type, code=exc.code,
                              headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        param = _param(tuple(first.get("loc", ())))
        if first.get("type") == "json_invalid":
            param = None
        return error_response(400, _validation_message(first), param=param, code=first.get("type"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(exc.status_code)
        return error_response(exc.status_code, str(exc.detail), code=code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RedisError)
    async def _redis(request: Request, exc: RedisError) -> JSONResponse:
        log.warning("Redis unavailable: %s", exc)
        return error_response(503, f"the job queue (Redis) is unavailable: {type(exc).__name__}",
                              type="service_unavailable", code="queue_unavailable", headers={"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error", type="server_error")
