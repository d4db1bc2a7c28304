"""The web playground at `/`: a page that drives the public API, so a person can try the service before writing a
client. No torch, no build step.

The page is static files in `static/` (HTML, CSS, JS, an icon), served from this process with a Content-Security-Policy
that allows only this origin: it loads nothing from elsewhere and talks only to the routes any client uses
(`/v1/models`, `/v1/jobs...`). The one route it adds, `/playground/status`, reports per model what `/metrics`
already exports openly (queue depth, live workers), as JSON the page can poll. `SPO_PLAYGROUND=false` mounts none
of it (`/` is then a 404, as without the playground).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from redis.exceptions import RedisError

from service.api.errors import ApiError, error_response
from service.contracts.queue import JobQueue

STATIC = Path(__file__).with_name("static")
# name in the URL -> media type; only these files are served (nothing else in the folder is reachable)
ASSETS = {"playground.js": "text/javascript; charset=utf-8", "playground.css": "text/css; charset=utf-8",
          "favicon.svg": "image/svg+xml"}

# Everything from this origin only. Images are fetched with the API key and shown as blob: URLs of this page
# (an <img src> cannot send an Authorization header), which 'self' does not cover, hence `img-src 'self' blob:`.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
       "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-cache"}


class _Serving(Protocol):
    """What the status route reads from the app's shared state (`app.Service`)."""

    specs: dict[str, Any]
    queue: JobQueue
    settings: Any


router = APIRouter(include_in_schema=False)


@router.get("/")
async def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/playground/status")  # before /playground/{name}, which would match it
async def status(request: Request) -> JSONResponse:
    """Queue depth (queued + running) and live workers per served model; 503 when Redis is unreachable."""
    service: _Serving = request.app.state.service
    models = {}
    try:
        for name in service.specs:
            workers = await service.queue.live_workers(name, service.settings.worker_stale_s)
            models[name] = {"queue_depth": await service.queue.depth(name), "workers": len(workers)}
    except RedisError as err:
        return error_response(503, f"the job queue (Redis) is unavailable: {type(err).__name__}",
                              type="service_unavailable", code="queue_unavailable", headers={"Retry-After": "5"})
    return JSONResponse({"models": models}, headers={"Cache-Control": "no-store"})


@router.get("/playground/{name}")
async def asset(name: str) -> FileResponse:
    if name not in ASSETS:
        raise ApiError(404, f"no playground file {name!r}", code="not_found")
    return FileResponse(STATIC / name, media_type=ASSETS[name], headers=HEADERS)


def mount_playground(app: FastAPI, enabled: bool) -> bool:
    """Add the playground's routes unless switched off (`SPO_PLAYGROUND`); returns whether it did."""
    if enabled:
        app.include_router(router)
    return enabled
