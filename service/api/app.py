"""The HTTP entrypoint: a FastAPI app that validates requests, enqueues jobs and reads results. No torch here.

Generation never happens in this process: `POST /v1/images/generations` enqueues a job and waits for its completion
event (no polling), `POST /v1/jobs` enqueues and returns at once. Requests are validated first (`validation`), so a
bad request never reaches the queue.

Routes: /v1/images/generations, /v1/jobs, /v1/jobs/{id}, /v1/jobs/{id}/events (SSE), /v1/jobs/{id}/cancel,
/v1/jobs/{id}/images/{k}, /v1/models, /v1/models/{id}, and /v1/images/edits and /v1/images/variations, which answer
that they are not supported (auth + rate limit when keys are set); /healthz, /readyz, /metrics, /docs (open).

Client retries never multiply work on the sync route: its answers that a retry would repeat (504 timeout, 500
failed generation, 409 cancelled, 404 expired) say `x-should-retry: false` (the OpenAI SDKs obey it), and a retry the
client makes anyway (`x-stainless-retry-count` >= 1, sent by those SDKs) rejoins the caller's latest job with the same
request fingerprint instead of queueing another; an `Idempotency-Key` works as on /v1/jobs. The OpenAPI document is
the deployment's (`openapi.install`): the served models' limits, every status, the bearer scheme when auth is on.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Header, Path, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from redis.exceptions import RedisError
from sse_starlette import EventSourceResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api import images, openapi
from service.api.auth import Authenticator
from service.api.errors import ApiError, BodyTooLarge, error_response, install_error_handlers
from service.api.events import EventHub
from service.api.playground import mount_playground
from service.api.schemas import (
    ImageData,
    ImageGenerationRequest,
    ImagesResponse,
    InputTokensDetails,
    JobRequest,
    JobView,
    ModelCard,
    ModelList,
    Progress,
    Timings,
    Usage,
)
from service.api.validation import PromptTokenizer, fingerprint, prompt_tokens, validate_request
from service.contracts import metrics
from service.contracts.config import Settings
from service.contracts.manifest import Manifest, ModelSpec, load_manifest
from service.contracts.queue import Job, JobQueue, QueueFull, connect

log = logging.getLogger(__name__)
STARTED = int(time.time())


# -- application state ------------------------------------------------------------------------------------------


@dataclass
class Service:
    """Everything the routes share; built by `create_app`, connected in the lifespan."""

    settings: Settings
    specs: dict[str, ModelSpec]
    tokenizers: dict[str, PromptTokenizer]
    auth: Authenticator
    queue: JobQueue = field(init=False)  # set by connect(), before the first request
    hub: EventHub = field(init=False)
    _clients: list[Any] = field(default_factory=list)

    def spec(self, name: str | None) -> ModelSpec:
        if name is None:
            return next(iter(self.specs.values()))
        if name not in self.specs:
            raise ApiError(404, f"model {name!r} does not exist; available: {', '.join(self.specs)}",
                           param="model", code="model_not_found")
        return self.specs[name]

    async def connect(self) -> None:
        url = self.settings.redis_url
        if not url:
            raise RuntimeError("no Redis configured: set SPO_REDIS_URL (or use `spo serve`, which starts one)")
        redis, raw = connect(url), connect(url, decode=False)
        self._clients = [redis, raw]
        self.queue = JobQueue(redis, self.settings.key_prefix, job_ttl_s=self.settings.job_ttl_s,
                              max_length=self.settings.queue_max_length, raw=raw)
        self.hub = EventHub(url, self.queue.keys)
        await self.hub.start()

    async def close(self) -> None:
        if self.hub is not None:
            await self.hub.stop()
        for client in self._clients:
            await client.aclose()


def service_of(request: Request) -> Service:
    return request.app.state.service


async def caller(request: Request, authorization: str | None = Header(None, include_in_schema=False)) -> str:
    """Dependency of every /v1 route: authenticates and returns the caller's scope."""
    scope = service_of(request).auth.authenticate(authorization)
    request.state.caller = scope
    return scope


# -- middleware -------------------------------------------------------------------------------------------------


class BodySizeLimit:
    """Rejects bodies over `max_bytes` with 413: by Content-Length up front, else while they stream in. Paths in
    `unread` are routes that never keep a body (they answer "not supported"), so a large upload there hears why."""

    def __init__(self, app: ASGIApp, max_bytes: int, unread: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.unread = unread

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.unread:
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = error_response(413, f"request body exceeds {self.max_bytes} bytes", code="body_too_large")
            await response(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited, send)


class RequestMetrics:
    """Counts requests by route template and status, and times them."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", "unmatched")
            method = scope.get("method", "")
            metrics.REQUESTS.labels(endpoint, method, str(status)).inc()
            metrics.REQUEST_DURATION.labels(endpoint, method).observe(time.perf_counter() - started)


# -- views ------------------------------------------------------------------------------------------------------


def job_view(job: Job, request: Request, position: int | None = None) -> JobView:
    p = job.params
    ended = job.finished_at
    timings = Timings(
        queue_wait_s=round(job.started_at - job.created_at, 4) if job.started_at else None,
        run_s=round(ended - job.started_at, 4) if ended and job.started_at else None,
        inference_s=job.inference_s,
        total_s=round(ended - job.created_at, 4) if ended else None,
    )
    links = [str(request.url_for("job_image", job_id=job.id, k=str(k))) for k in range(job.images)] \
        if job.status == "succeeded" else []
    total = job.progress_total or p.steps
    step = total if job.status == "succeeded" else job.progress_step
    return JobView(
        id=job.id, model=p.model, status=job.status, priority=job.priority, created_at=job.created_at,
        started_at=job.started_at, finished_at=job.finished_at, queue_position=position,
        progress=Progress(step=step, total=total, fraction=round(step / total, 4) if total else 0.0),
        attempts=job.attempts, batch_size=job.batch_size, cancel_requested=job.cancel_requested, timings=timings,
        seeds=list(p.seeds), images=links,
        error={"type": job.error_type, "message": job.error_message} if job.status == "failed" else None,
        request=JobRequest(prompt=p.prompt, negative_prompt=p.negative_prompt, n=p.n, size=f"{p.width}x{p.height}",
                           num_inference_steps=p.steps, guidance_scale=p.guidance,
                           response_format=p.response_format),
    )


def model_card(spec: ModelSpec, tokenizer: PromptTokenizer) -> ModelCard:
    return ModelCard(id=spec.name, created=STARTED, kind=spec.kind, description=spec.description, sizes=spec.sizes,
                     default_size=spec.defaults.size, default_steps=spec.defaults.steps,
                     default_guidance=spec.defaults.guidance, max_n=spec.max_n, max_steps=spec.max_steps,
                     guidance_range=list(spec.guidance_range), max_prompt_tokens=tokenizer.max_tokens)


# -- routes -----------------------------------------------------------------------------------------------------

# Every status each route can answer is documented by `openapi.install` (one table there), not per decorator.
v1 = APIRouter(prefix="/v1", dependencies=[Depends(caller)])
ops = APIRouter()
NO_RETRY = {"x-should-retry": "false"}  # the OpenAI SDKs' header: retrying this answer would not help


async def _missing_job(service: Service, job_id: str, headers: dict[str, str] | None = None) -> ApiError:
    """The 404 for a job that is not in Redis, saying why when that can be told (job ids carry their origin)."""
    reason = await service.queue.missing_reason(job_id)
    if reason == "lost":
        return ApiError(404, f"job {job_id!r} was lost: the queue (Redis) restarted without persistence after it was "
                             f"created; submit it again", param="job_id", code="job_lost", headers=headers)
    if reason == "expired":
        return ApiError(404, f"job {job_id!r} expired (jobs are kept {service.settings.job_ttl_s} s)", param="job_id",
                        code="job_expired", headers=headers)
    return ApiError(404, f"job {job_id!r} not found (unknown, or expired)", param="job_id", code="job_not_found",
                    headers=headers)


async def _get_job(service: Service, job_id: str, caller_scope: str) -> Job:
    job = await service.queue.get(job_id)
    if job is None:
        raise await _missing_job(service, job_id)
    # A job is visible only to the key that created it (when auth is on).
    if service.auth.enabled and job.owner != caller_scope:
        raise ApiError(404, f"job {job_id!r} not found (unknown, or expired)", param="job_id", code="job_not_found")
    return job


async def _wait_finished(service: Service, job_id: str, events: asyncio.Queue, timeout: float) -> Job | None:
    """Wait for the job's terminal status event; `events` was subscribed before the state is read here."""
    deadline = time.monotonic() + timeout
    job = await service.queue.get(job_id)
    while job is not None and not job.finished:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            event = await asyncio.wait_for(events.get(), timeout=min(remaining, 30.0))
            if event.get("type") == "progress":
                continue
        except asyncio.TimeoutError:
            pass  # safety net: re-read the state at most every 30 s even if an event was lost
        job = await service.queue.get(job_id)
    return job


async def _submit(service: Service, body: ImageGenerationRequest, scope: str, *, idempotency_key: str | None = None,
                  need_worker: bool = False, rejoin: bool = False, remember: bool = False) -> tuple[Job, bool]:
    """Validate, find a replay, rate-limit and enqueue, in that order (bad input is a 400 even when nothing could
    serve it; a replay is neither counted by the rate limit nor queued again). A replay is the job of the same
    Idempotency-Key, or with `rejoin` (a client's automatic retry) the caller's latest job with the same request
    fingerprint, which `remember` records."""
    spec = service.spec(body.model)
    params = validate_request(body, spec, service.tokenizers[spec.name])
    request_print = fingerprint(body)
    replay = await _replayed(service, scope, request_print, idempotency_key, rejoin)
    if replay is not None:
        return replay, False
    await service.auth.check_rate(service.queue.redis, service.queue.keys, scope)
    if need_worker and not await service.queue.live_workers(spec.name, service.settings.worker_stale_s):
        raise ApiError(503, f"no worker is serving model {spec.name!r}; POST /v1/jobs queues jobs anyway",
                       param="model", type="service_unavailable", code="no_worker", headers={"Retry-After": "10"})
    try:
        job_id, created = await service.queue.submit(
            await service.queue.new_job_id(), params, priority=body.priority, fingerprint=request_print, owner=scope,
            idempotency=(scope, idempotency_key) if idempotency_key else None,
            remember=remember and not idempotency_key)
    except QueueFull as full:
        raise ApiError(429, f"model {spec.name!r} has {full.depth} jobs waiting or running (the limit); retry later",
                       type="rate_limit_error", code="queue_full",
                       headers={"Retry-After": str(full.retry_after)}) from None
    job = await service.queue.get(job_id)
    if job is None:
        raise ApiError(404, f"job {job_id!r} for this Idempotency-Key has expired", param="Idempotency-Key",
                       code="job_expired")
    if not created and job.fingerprint != request_print:
        raise ApiError(422, "Idempotency-Key was already used with a different request", param="Idempotency-Key",
                       code="idempotency_key_reused")
    return job, created


async def _replayed(service: Service, scope: str, request_print: str, idempotency_key: str | None,
                    rejoin: bool) -> Job | None:
    if idempotency_key:
        job_id = await service.queue.idempotent_job(scope, idempotency_key)
    elif rejoin:
        job_id = await service.queue.recent_job(scope, request_print)
    else:
        return None
    job = await service.queue.get(job_id) if job_id else None
    if job is None:
        return None  # never seen, or expired: submit (an expired Idempotency-Key job is reported by submit)
    if job.fingerprint != request_print:
        raise ApiError(422, "Idempotency-Key was already used with a different request", param="Idempotency-Key",
                       code="idempotency_key_reused")
    return job


def _is_retry(request: Request) -> bool:
    """A client's automatic retry of this same call: the OpenAI (Stainless) SDKs count their attempts."""
    count = request.headers.get("x-stainless-retry-count", "0").strip()
    return count.isdigit() and int(count) > 0


async def _encoded(service: Service, job: Job, k: int) -> bytes | None:
    png = await service.queue.image(job.id, k)
    if png is None or job.params.output_format == "png":
        return png
    return await asyncio.to_thread(images.encode, png, job.params.output_format, job.params.output_compression)


@v1.post("/images/generations", response_model=ImagesResponse, summary="Generate images (waits for the result)")
async def create_images(body: ImageGenerationRequest, request: Request, response: Response,
                        scope: str = Depends(caller),
                        idempotency_key: str | None = Header(None, max_length=255,
                                                             description="same key + same body: same job")
                        ) -> ImagesResponse:
    service = service_of(request)
    job, _ = await _submit(service, body, scope, idempotency_key=idempotency_key, need_worker=True,
                           rejoin=_is_retry(request), remember=True)
    response.headers["X-Job-Id"] = job.id
    async with service.hub.subscribe(job.id) as events:
        finished = await _wait_finished(service, job.id, events, service.settings.sync_timeout_s)
    headers = {"X-Job-Id": job.id, **NO_RETRY}
    if finished is None:
        missing = await _missing_job(service, job.id, headers)
        if missing.code == "job_lost":  # nothing runs it any more: a retry (a new job) is the right thing
            raise ApiError(503, f"job {job.id} was lost: the queue (Redis) restarted without persistence while it "
                                f"waited; submit it again", type="service_unavailable", code="job_lost",
                           headers={"X-Job-Id": job.id, "Retry-After": "1"})
        raise ApiError(404, f"job {job.id} expired before it finished", code="job_expired", headers=headers)
    if finished.status == "failed":
        raise ApiError(500, f"generation failed: {finished.error_message}", type="server_error",
                       code=finished.error_type, headers=headers)
    if finished.status == "cancelled":
        raise ApiError(409, f"job {job.id} was cancelled", code="job_cancelled", headers=headers)
    if finished.status != "succeeded":
        raise ApiError(504, f"job {job.id} did not finish within {service.settings.sync_timeout_s:.0f}s; follow it "
                            f"at /v1/jobs/{job.id} (it goes on; retrying this call would wait for the same job)",
                       type="timeout", code="sync_timeout", headers=headers)
    data = []
    p = finished.params
    for k, seed in enumerate(p.seeds):
        if p.response_format == "url":
            data.append(ImageData(url=str(request.url_for("job_image", job_id=job.id, k=str(k))), seed=seed))
            continue
        encoded = await _encoded(service, finished, k)
        if encoded is None:
            raise ApiError(404, f"image {k} of job {job.id} expired", code="image_expired", headers=headers)
        data.append(ImageData(b64_json=base64.b64encode(encoded).decode(), seed=seed))
    tokens = prompt_tokens(body, service.tokenizers[p.model])
    return ImagesResponse(created=int(finished.finished_at or time.time()), data=data, model=p.model,
                          seeds=list(p.seeds), job_id=job.id, size=f"{p.width}x{p.height}",
                          output_format=p.output_format, quality=body.quality,
                          safety_identifier=body.safety_identifier or body.user or None,
                          usage=Usage(input_tokens=tokens, input_tokens_details=InputTokensDetails(text_tokens=tokens),
                                      total_tokens=tokens))


@v1.post("/jobs", status_code=202, response_model=JobView, summary="Queue a generation and return at once")
async def create_job(body: ImageGenerationRequest, request: Request, response: Response,
                     scope: str = Depends(caller),
                     idempotency_key: str | None = Header(None, max_length=255,
                                                          description="same key + same body: same job")) -> JobView:
    service = service_of(request)
    job, created = await _submit(service, body, scope, idempotency_key=idempotency_key)
    response.headers["Location"] = str(request.url_for("get_job", job_id=job.id))
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return job_view(job, request, await service.queue.position(job))


@v1.get("/jobs/{job_id}", response_model=JobView, summary="A job's status, progress, timings and image links")
async def get_job(job_id: str, request: Request, scope: str = Depends(caller)) -> JobView:
    service = service_of(request)
    job = await _get_job(service, job_id, scope)
    return job_view(job, request, await service.queue.position(job))


@v1.get("/jobs/{job_id}/events", summary="Server-Sent Events: status, progress, then end",
        response_class=EventSourceResponse)
async def job_events(job_id: str, request: Request, scope: str = Depends(caller)) -> EventSourceResponse:
    service = service_of(request)
    await _get_job(service, job_id, scope)  # 404 before the stream starts

    async def stream() -> AsyncIterator[dict[str, Any]]:
        async with service.hub.subscribe(job_id) as events:
            job = await service.queue.get(job_id)
            if job is not None:
                yield {"event": "status", "data": json.dumps({"status": job.status})}
            while job is not None and not job.finished:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=30.0)
                except asyncio.TimeoutError:
                    event = {"type": "resync"}
                if event.get("type") == "progress":
                    yield {"event": "progress", "data": json.dumps({"step": event["step"], "total": event["total"]})}
                    continue
                previous, job = job.status, await service.queue.get(job_id)
                if job is not None and job.status != previous and not job.finished:
                    yield {"event": "status", "data": json.dumps({"status": job.status})}
            if job is None:
                reason = await service.queue.missing_reason(job_id)
                yield {"event": "end", "data": json.dumps({"id": job_id,
                                                           "status": "lost" if reason == "lost" else "expired"})}
            else:
                yield {"event": "end", "data": job_view(job, request).model_dump_json()}

    return EventSourceResponse(stream(), ping=15)


@v1.post("/jobs/{job_id}/cancel", response_model=JobView,
         summary="Cancel: a queued job never runs; a running one stops at its next denoising step")
async def cancel_job(job_id: str, request: Request, scope: str = Depends(caller)) -> JSONResponse:
    service = service_of(request)
    await _get_job(service, job_id, scope)
    outcome = await service.queue.cancel(job_id)
    if outcome == "missing":
        raise ApiError(404, f"job {job_id!r} not found (unknown, or expired)", param="job_id", code="job_not_found")
    if outcome not in ("cancelled_now", "cancelling"):
        raise ApiError(409, f"job {job_id} already {outcome}; only queued or running jobs can be cancelled",
                       param="job_id", code="job_finished")
    job = await _get_job(service, job_id, scope)  # 404, not a crash, if it expired in between
    status = 200 if outcome == "cancelled_now" else 202
    return JSONResponse(job_view(job, request).model_dump(mode="json"), status_code=status)


@v1.get("/jobs/{job_id}/images/{k}", name="job_image",
        summary="Image k of a succeeded job, in the job's output_format (PNG by default)", response_class=Response)
async def job_image(job_id: str, request: Request,
                    k: int = Path(ge=0, description="image index, 0..n-1"),
                    scope: str = Depends(caller)) -> Response:
    service = service_of(request)
    if not request.path_params["k"].isdigit():  # "1.0" or "+1" is not an index (the schema says integer)
        raise ApiError(400, f"Invalid type for 'k': expected an integer, but got {request.path_params['k']!r} "
                            f"instead.", param="k", code="invalid_type")
    job = await _get_job(service, job_id, scope)
    if job.status != "succeeded":
        raise ApiError(409, f"job {job_id} is {job.status}; images exist once it has succeeded", param="job_id",
                       code="job_not_succeeded")
    if not 0 <= k < job.images:
        raise ApiError(404, f"image index must be between 0 and {job.images - 1}, got {k}", param="k",
                       code="image_not_found")
    data = await _encoded(service, job, k)
    if data is None:
        raise ApiError(404, f"image {k} of job {job_id} expired", param="k", code="image_expired")
    return Response(data, media_type=images.MEDIA_TYPES[job.params.output_format],
                    headers={"Cache-Control": f"private, max-age={service.settings.job_ttl_s}, immutable"})


@v1.post("/images/edits", summary="Not supported: image edits (OpenAI images.edit)", status_code=400,
         response_model=None)
async def images_edit(request: Request) -> JSONResponse:
    return await _not_supported(request, "images.edit (POST /v1/images/edits)")


@v1.post("/images/variations", summary="Not supported: image variations (OpenAI images.create_variation)",
         status_code=400, response_model=None)
async def images_variation(request: Request) -> JSONResponse:
    return await _not_supported(request, "images.create_variation (POST /v1/images/variations)")


NOT_SUPPORTED_PATHS = frozenset({"/v1/images/edits", "/v1/images/variations"})
_DRAIN_LIMIT = 64 * 1024 * 1024  # read (and drop) an upload up to this size, so the client reads our answer


async def _not_supported(request: Request, what: str) -> JSONResponse:
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > _DRAIN_LIMIT:
            break
    return error_response(400, f"{what} is not supported by this server: its models generate images from text only; "
                               f"use POST /v1/images/generations", type="invalid_request_error",
                          code="unsupported_endpoint", headers={**NO_RETRY, "Connection": "close"})


@v1.get("/models", response_model=ModelList, summary="Served models and their limits")
async def list_models(request: Request) -> ModelList:
    service = service_of(request)
    return ModelList(data=[model_card(s, service.tokenizers[s.name]) for s in service.specs.values()])


@v1.get("/models/{model_id}", response_model=ModelCard, summary="One served model")
async def get_model(model_id: str, request: Request) -> ModelCard:
    service = service_of(request)
    spec = service.spec(model_id)
    return model_card(spec, service.tokenizers[spec.name])


@ops.get("/healthz", summary="The API process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@ops.get("/readyz", summary="Redis is reachable and every served model has a live worker")
async def readyz(request: Request) -> JSONResponse:
    service = service_of(request)
    try:
        await service.queue.redis.ping()
        workers = {name: len(await service.queue.live_workers(name, service.settings.worker_stale_s))
                   for name in service.specs}
    except RedisError as err:
        return error_response(503, f"the job queue (Redis) is unavailable: {type(err).__name__}",
                              type="service_unavailable", code="queue_unavailable")
    missing = [name for name, count in workers.items() if count == 0]
    if missing:
        return error_response(503, f"no live worker for model(s): {', '.join(missing)}",
                              type="service_unavailable", code="no_worker")
    return JSONResponse({"status": "ready", "workers": workers})


@ops.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics_endpoint(request: Request) -> Response:
    service = service_of(request)
    try:  # queue-wide gauges are read from Redis at scrape time, so any API replica reports them
        for name in service.specs:
            metrics.QUEUE_DEPTH.labels(name).set(await service.queue.depth(name))
            beats = await service.queue.all_heartbeats(name)
            metrics.WORKERS_ALIVE.labels(name).set(sum(b["age_s"] <= service.settings.worker_stale_s for b in beats))
            metrics.HEARTBEAT_AGE.set_model(name, {b["consumer"]: round(b["age_s"], 3) for b in beats})
        metrics.redis_up().set(1)
    except RedisError as err:
        metrics.redis_up().set(0)
        log.debug("metrics: Redis unavailable (%s); exporting process metrics only", err)
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)


# -- factory ----------------------------------------------------------------------------------------------------


def create_app(settings: Settings | None = None, manifest: Manifest | None = None) -> FastAPI:
    """Build the app: reads the manifest and tokenizers now (so misconfiguration fails at startup), connects to
    Redis in the lifespan (so the app starts, and reports 503, while Redis is down)."""
    settings = settings or Settings()
    manifest = manifest or load_manifest(settings.manifest)
    specs = {spec.name: spec for spec in manifest.select(settings.models)}
    auth = Authenticator(settings.load_api_keys(), rate_limit_per_minute=settings.rate_limit_per_minute)
    service = Service(settings=settings, specs=specs, auth=auth,
                      tokenizers={name: PromptTokenizer(spec) for name, spec in specs.items()})

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.connect()
        log.info("API serving %s; queue %s (prefix %r); auth %s", ", ".join(specs), _redacted(settings.redis_url),
                 settings.key_prefix, "on" if service.auth.enabled else "off")
        try:
            yield
        finally:
            await service.close()

    app = FastAPI(title="spo-diffusion", version="1", lifespan=lifespan,
                  description="Text-to-image generation with SPO-tuned Stable Diffusion models. "
                              "OpenAI-compatible `POST /v1/images/generations`, plus asynchronous jobs.")
    app.state.service = service
    install_error_handlers(app)
    app.include_router(v1)
    app.include_router(ops)
    mount_playground(app, settings.playground)  # the web page at / (SPO_PLAYGROUND=false: off)
    metrics.initialise_api((r.path, method, r.status_code or 200) for r in (*v1.routes, *ops.routes)
                           if isinstance(r, APIRoute) for method in sorted(r.methods or ()))
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes, unread=NOT_SUPPORTED_PATHS)
    app.add_middleware(RequestMetrics)
    openapi.install(app, settings, list(specs.values()), [service.tokenizers[name] for name in specs],
                    auth=service.auth.enabled)
    return app


def _redacted(url: str | None) -> str:
    """A Redis URL without its password, for logs."""
    if not url or "@" not in url:
        return str(url)
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}"
