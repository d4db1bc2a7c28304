"""OpenAI-style error bodies `{"error": {"type", "message", "param", "code"}}` and the handlers that produce them.

Bad input is 400 (413 too large, 422 for a reused Idempotency-Key) naming the offending `param`; a failure of ours
is 500 and never caused by input; Redis trouble is 503 with `Retry-After`. Validation errors use OpenAI's codes and
message style, so clients that branch on them work: `unknown_parameter` ("Unknown parameter: 'x'."), `invalid_value`
("Invalid value: 'x'. Supported values are: 'a' and 'b'."), `invalid_type`, `integer_below_min_value`,
`integer_above_max_value`, `string_above_max_length`, ...
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


_TYPE_NAMES = {"int": "an integer", "float": "a number", "string": "a string", "bool": "a boolean",
               "dict": "an object", "list": "an array", "none": "null"}


# pydantic's bound errors -> (OpenAI's code part, the comparison, the context key of the bound).
_BOUNDS = {"greater_than_equal": ("below_min", ">=", "ge"), "greater_than": ("below_min", ">", "gt"),
           "less_than_equal": ("above_max", "<=", "le"), "less_than": ("above_max", "<", "lt")}
_BOUND_WORDS = {"below_min": "below minimum", "above_max": "above maximum"}

# bool before int: a bool is an int to isinstance.
_JSON_TYPES: tuple[tuple[type, str], ...] = ((type(None), "null"), (bool, "a boolean"), (int, "an integer"),
                                             (float, "a number"), (str, "a string"), (list, "an array"),
                                             (dict, "an object"))


def _json_type(value: object) -> str:
    return next((name for kind, name in _JSON_TYPES if isinstance(value, kind)), type(value).__name__)


# Why a value of an OpenAI parameter is refused here, appended to OpenAI's "Invalid value" message.
_HINTS = {
    "stream": "streaming is not supported; follow a job's progress at /v1/jobs/{id}/events",
    "partial_images": "partial images need streaming, which is not supported",
    "background": "these models draw opaque images only",
    "output_format": "gif and svg are not produced",
}


def _supported(expected: str) -> str:
    """Pydantic's "'a', 'b' or 'c'" -> OpenAI's "'a', 'b', and 'c'"."""
    values = [v.strip() for part in expected.split(" or ") for v in part.split(", ") if v.strip()]
    if len(values) <= 1:
        return "".join(values)
    if len(values) == 2:
        return f"{values[0]} and {values[1]}"
    return ", ".join(values[:-1]) + f", and {values[-1]}"


def openai_validation_error(err: dict) -> tuple[str, str | None, str | None]:
    """(message, param, code) in OpenAI's style for one pydantic error."""
    param = _param(tuple(err.get("loc", ())))
    kind = str(err.get("type", ""))
    ctx = err.get("ctx") or {}
    value = err.get("input")
    name = f"'{param}'" if param else "the request body"
    if kind == "json_invalid":
        return "We could not parse the JSON body of your request: it is not valid JSON.", None, "invalid_json"
    if kind == "extra_forbidden":
        return f"Unknown parameter: '{param}'.", param, "unknown_parameter"
    if kind == "missing":
        if not param:
            return "Missing request body.", None, "missing_required_parameter"
        return f"Missing required parameter: '{param}'.", param, "missing_required_parameter"
    if kind == "literal_error":
        hint = f" ({_HINTS[param]})" if param in _HINTS else ""
        return (f"Invalid value: {value!r}. Supported values are: {_supported(str(ctx.get('expected', '')))}{hint}.",
                param, "invalid_value")
    if kind == "none_required":
        return (f"Invalid value for {name}: this server does not support it; only null is accepted.", param,
                "invalid_value")
    if kind.endswith("_type") or kind in ("model_attributes_type", "dict_type"):
        wanted = _TYPE_NAMES.get(kind.removesuffix("_type").removeprefix("model_attributes"), "an object")
        if kind in ("model_type", "model_attributes_type", "dict_type"):
            wanted = "an object"
        return (f"Invalid type for {name}: expected {wanted}, but got {_json_type(value)} instead.", param,
                "invalid_type")
    if kind in _BOUNDS:
        side, op, key = _BOUNDS[kind]
        number = "integer" if isinstance(value, int) else "decimal"
        code = f"{number}_{side}_value"
        return (f"Invalid {name}: {number} {_BOUND_WORDS[side]} value. Expected a value {op} {ctx.get(key)}, but "
                f"got {value} instead.", param, code)
    if kind == "string_too_long":
        limit = ctx.get("max_length")
        return (f"Invalid {name}: string too long. Expected a string with maximum length {limit}, but got a string "
                f"with length {len(value) if isinstance(value, str) else '?'} instead.", param,
                "string_above_max_length")
    if kind in ("string_pattern_mismatch", "string_too_short") or (kind == "value_error" and param == "prompt"):
        return f"Invalid {name}: must not be empty or blank.", param, "empty_string"
    if kind == "finite_number":
        return f"Invalid {name}: expected a finite number, but got {value} instead.", param, "invalid_value"
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return (f"Invalid {name}: {msg}." if param else msg), param, kind or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, param=exc.param, type=exc.type, code=exc.code,
                              headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        # An unknown parameter is what a client most needs to hear about (it may be why others look wrong).
        first = next((e for e in errors if e.get("type") == "extra_forbidden"), errors[0] if errors else {})
        message, param, code = openai_validation_error(dict(first))
        return error_response(400, message, param=param, code=code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(exc.status_code)
        if exc.status_code == 404:
            return error_response(404, f"Invalid URL ({request.method} {request.url.path}): no such route",
                                  code=code)
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
