"""The deployment's OpenAPI document: what the routes really accept and answer.

FastAPI's generated document knows the request model's types but not the served models' limits, lists a 422
validation error no route sends (validation errors are 400 here), and none of the statuses a route raises itself.
`install` replaces `app.openapi` with one built from FastAPI's and then corrected:

- every status each route can answer (`STATUSES`, one table for the whole API), errors in the `ErrorResponse` shape,
  with the content types actually sent (images, SSE, Prometheus text);
- the served models' limits in the request schema: `model` as the served ids, `size` as a pattern of the allowed sizes
  (plus `auto`, either case of `x`), the maxima of `n` and `num_inference_steps`, the range of `guidance_scale` (a
  deployment serving several models gets the union; GET /v1/models has each model's own), and the prompt's token
  limit as `x-max-tokens` (CLIP tokens are not characters, so JSON Schema cannot state it; a prompt over it is a
  400 `string_above_max_length`, the one 400 a schema-valid body can get);
- the bearer security scheme, required by every /v1 operation when API keys are configured.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service.api.schemas import ErrorResponse
from service.api.validation import PromptTokenizer
from service.contracts.config import Settings
from service.contracts.manifest import ModelSpec

_BAD = "invalid parameter (named in `error.param`), with OpenAI's codes"
_AUTH = "missing or invalid API key"
_REDIS = "the job queue (Redis) is unavailable (Retry-After)"

# (method, path) -> {status: description}. The success status comes first.
STATUSES: dict[tuple[str, str], dict[int, str]] = {
    ("post", "/v1/images/generations"): {
        200: "the images", 400: _BAD, 401: _AUTH, 404: "unknown model, or the job or an image expired",
        409: "the job was cancelled", 413: "request body too large", 422: "Idempotency-Key reused with another body",
        429: "queue full or rate limit reached (Retry-After)", 500: "the generation failed (x-should-retry: false)",
        503: "Redis unavailable, no live worker for the model, or the job was lost by a Redis restart (Retry-After)",
        504: "not finished within SPO_SYNC_TIMEOUT_S; the job goes on (its id is in the message and X-Job-Id)",
    },
    ("post", "/v1/jobs"): {
        202: "the queued job (Location: its URL; Idempotent-Replayed: true for a replay)", 400: _BAD, 401: _AUTH,
        404: "unknown model, or the job of this Idempotency-Key expired", 413: "request body too large",
        422: "Idempotency-Key reused with another body", 429: "queue full or rate limit reached (Retry-After)",
        503: _REDIS,
    },
    ("get", "/v1/jobs/{job_id}"): {200: "the job", 401: _AUTH, 404: "unknown, expired or lost job", 503: _REDIS},
    ("get", "/v1/jobs/{job_id}/events"): {
        200: "Server-Sent Events: status, progress, then end", 401: _AUTH, 404: "unknown, expired or lost job",
        503: _REDIS,
    },
    ("post", "/v1/jobs/{job_id}/cancel"): {
        200: "the job was queued and is now cancelled", 202: "the job is running: it stops at its next step",
        401: _AUTH, 404: "unknown, expired or lost job", 409: "the job has already finished", 503: _REDIS,
    },
    ("get", "/v1/jobs/{job_id}/images/{k}"): {
        200: "the image, in the job's output_format", 400: _BAD, 401: _AUTH,
        404: "unknown job, no such image index, or the image expired", 409: "the job has not succeeded",
        503: _REDIS,
    },
    ("post", "/v1/images/edits"): {400: "not supported (code unsupported_endpoint)", 401: _AUTH},
    ("post", "/v1/images/variations"): {400: "not supported (code unsupported_endpoint)", 401: _AUTH},
    ("get", "/v1/models"): {200: "the served models and their limits", 401: _AUTH},
    ("get", "/v1/models/{model_id}"): {200: "the model and its limits", 401: _AUTH, 404: "unknown model"},
    ("get", "/healthz"): {200: "the API process is alive"},
    ("get", "/readyz"): {200: "Redis reachable and every served model has a live worker",
                         503: "Redis unavailable, or a served model has no live worker"},
    ("get", "/metrics"): {200: "Prometheus text exposition"},
}
_DESCRIPTIONS = {200: "OK", 202: "Accepted"}

_IMAGE_CONTENT = {media: {"schema": {"type": "string", "format": "binary"}}
                  for media in ("image/png", "image/jpeg", "image/webp")}
_SPECIAL_CONTENT: dict[tuple[str, str], dict[str, Any]] = {
    ("get", "/v1/jobs/{job_id}/images/{k}"): _IMAGE_CONTENT,
    ("get", "/v1/jobs/{job_id}/events"): {"text/event-stream": {"schema": {
        "type": "object", "required": ["data"],
        "description": "one event: `status` {status}, `progress` {step, total}, then `end` (the final job view, or "
                       "{id, status: expired|lost}); `data` is JSON",
        "properties": {"event": {"type": "string", "enum": ["status", "progress", "end"]},
                       "data": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"}}}}},
    ("get", "/metrics"): {"text/plain": {"schema": {"type": "string"}}},
    ("get", "/healthz"): {"application/json": {"schema": {
        "type": "object", "properties": {"status": {"type": "string", "enum": ["ok"]}}, "required": ["status"]}}},
    ("get", "/readyz"): {"application/json": {"schema": {
        "type": "object", "required": ["status", "workers"],
        "properties": {"status": {"type": "string", "enum": ["ready"]},
                       "workers": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 1}}}}}},
}
_RESPONSE_HEADERS: dict[int, dict[str, Any]] = {
    429: {"Retry-After": {"schema": {"type": "string"}, "description": "seconds to wait"}},
    503: {"Retry-After": {"schema": {"type": "string"}, "description": "seconds to wait"}},
}

DESCRIPTION = (
    "Text-to-image generation with SPO-tuned Stable Diffusion models. OpenAI-compatible `POST "
    "/v1/images/generations` (the parameters the `openai` SDK sends are accepted, or refused with OpenAI's codes), "
    "plus asynchronous jobs. Errors are `{\"error\": {\"type\", \"message\", \"param\", \"code\"}}`. The server also "
    "answers 431 when a request's line and headers exceed SPO_MAX_HEADER_BYTES and 408 when a request does not "
    "arrive within SPO_REQUEST_TIMEOUT_S of its first byte (then it closes the connection).")


# Where a created job's id is used next (schemathesis' stateful phase follows these).
_JOB_ROUTES = {"GetJob": ("get", "/v1/jobs/{job_id}"), "JobEvents": ("get", "/v1/jobs/{job_id}/events"),
               "CancelJob": ("post", "/v1/jobs/{job_id}/cancel"), "JobImage": ("get", "/v1/jobs/{job_id}/images/{k}")}
_LINKED = {("post", "/v1/jobs"): ("202", "$response.body#/id"),
           ("post", "/v1/images/generations"): ("200", "$response.body#/job_id")}


def _links(doc: dict[str, Any]) -> None:
    ids = {name: doc["paths"].get(path, {}).get(method, {}).get("operationId") for name, (method, path)
           in _JOB_ROUTES.items()}
    for (method, path), (status, expression) in _LINKED.items():
        response = doc["paths"].get(path, {}).get(method, {}).get("responses", {}).get(status)
        if response is None:
            continue
        response["links"] = {name: {"operationId": op_id, "parameters": {"job_id": expression, **(
            {"k": 0} if name == "JobImage" else {})}} for name, op_id in ids.items() if op_id}


def size_pattern(sizes: Sequence[str]) -> str:
    """A regex for the sizes as the API accepts them: exactly one of `sizes` or 'auto', 'x' in either case."""
    alternatives = ["[aA][uU][tT][oO]"] + [re.escape(s).replace("x", "[xX]") for s in sizes]
    return "^(?:" + "|".join(alternatives) + ")$"


def _string_branch(prop: dict[str, Any]) -> dict[str, Any]:
    """The non-null branch of an Optional's anyOf (or the property itself)."""
    for branch in prop.get("anyOf", []):
        if branch.get("type") != "null":
            return branch
    return prop


def _limit_request(schema: dict[str, Any], specs: Sequence[ModelSpec], tokenizers: Sequence[PromptTokenizer]) -> None:
    props = schema["properties"]
    sizes = sorted({s for spec in specs for s in spec.sizes}, key=lambda s: tuple(int(v) for v in s.split("x")))
    _string_branch(props["model"])["enum"] = [spec.name for spec in specs]
    _string_branch(props["size"])["pattern"] = size_pattern(sizes)
    props["n"]["maximum"] = max(spec.max_n for spec in specs)
    _string_branch(props["num_inference_steps"])["maximum"] = max(spec.max_steps for spec in specs)
    guidance = _string_branch(props["guidance_scale"])
    guidance["minimum"] = min(spec.guidance_range[0] for spec in specs)
    guidance["maximum"] = max(spec.guidance_range[1] for spec in specs)
    max_tokens = max(t.max_tokens for t in tokenizers)
    for name in ("prompt", "negative_prompt"):
        props[name]["x-max-tokens"] = max_tokens
    per_model = ", ".join(f"{spec.name}: {t.max_tokens}" for spec, t in zip(specs, tokenizers, strict=True))
    props["prompt"]["description"] += f" (here {per_model})"


def build(app: FastAPI, settings: Settings, specs: Sequence[ModelSpec], tokenizers: Sequence[PromptTokenizer], *,
          auth: bool) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=app.version, description=DESCRIPTION, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    error_schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(error_schema.pop("$defs", {}))
    schemas["ErrorResponse"] = error_schema
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    if "ImageGenerationRequest" in schemas:
        _limit_request(schemas["ImageGenerationRequest"], specs, tokenizers)
    doc["components"]["securitySchemes"] = {"bearerAuth": {
        "type": "http", "scheme": "bearer",
        "description": "an API key of SPO_API_KEYS / SPO_API_KEYS_FILE" + ("" if auth else
                                                                            " (this deployment has no keys: open)")}}
    max_index = max(spec.max_n for spec in specs) - 1
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            statuses = STATUSES.get((method, path))
            if statuses is None:
                continue
            generated = operation.get("responses", {})
            responses: dict[str, Any] = {}
            for status, description in statuses.items():
                entry: dict[str, Any] = {"description": description}
                special = _SPECIAL_CONTENT.get((method, path))
                if status < 400:
                    if special is not None:
                        entry["content"] = special
                    else:
                        content = (generated.get(str(status)) or generated.get("200") or {}).get("content")
                        if content:
                            entry["content"] = content
                else:
                    entry["content"] = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
                    if status in _RESPONSE_HEADERS:
                        entry["headers"] = _RESPONSE_HEADERS[status]
                if status == 401 and not (auth and path.startswith("/v1/")):
                    continue
                responses[str(status)] = entry
            operation["responses"] = responses
            if path.startswith("/v1/") and auth:
                operation["security"] = [{"bearerAuth": []}]
            for param in operation.get("parameters", []):
                if param.get("name") == "k" and param.get("in") == "path":
                    param["schema"]["maximum"] = max_index
    _links(doc)
    return doc


def install(app: FastAPI, settings: Settings, specs: Sequence[ModelSpec], tokenizers: Sequence[PromptTokenizer], *,
            auth: bool) -> None:
    """Serve `build`'s document at /openapi.json (built once, on first request)."""
    cache: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        if "doc" not in cache:
            cache["doc"] = build(app, settings, specs, tokenizers, auth=auth)
        return cache["doc"]

    app.openapi = openapi  # type: ignore[method-assign]
