"""Job events for the API: one Redis pattern subscription per process, fanned out to waiting requests.

The sync route and the SSE route wait on a job through `EventHub.subscribe`, so they wake on the worker's published
progress and completion instead of polling the job hash.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

from redis.exceptions import RedisError

from service.contracts.queue import Keys, connect

log = logging.getLogger(__name__)


class EventHub:
    """One pattern subscription per API process, fanned out to the requests waiting on a job.

    Requests `subscribe(job_id)` *before* reading the job's state, so no event is missed between read and wait.
    If the subscription drops (Redis restart), it reconnects and sends every listener a `resync` event so it
    re-reads the job state.
    """

    def __init__(self, url: str, keys: Keys) -> None:
        self.url = url
        self.keys = keys
        self._listeners: dict[str, set[asyncio.Queue]] = defaultdict(set)
        self._task: asyncio.Task | None = None
        self.connected = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="spo-event-hub")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @contextlib.asynccontextmanager
    async def subscribe(self, job_id: str) -> AsyncIterator[asyncio.Queue]:
        queue: asyncio.Queue = asyncio.Queue()
        self._listeners[job_id].add(queue)
        try:
            yield queue
        finally:
            self._listeners[job_id].discard(queue)
            if not self._listeners[job_id]:
                del self._listeners[job_id]

    def _broadcast(self, job_id: str | None, event: dict[str, Any]) -> None:
        targets = self._listeners.get(job_id, ()) if job_id else [q for qs in self._listeners.values() for q in qs]
        for q in list(targets):
            q.put_nowait(event)

    async def _run(self) -> None:
        prefix_len = len(self.keys.events(""))
        backoff = 0.2
        while True:
            client = connect(self.url, socket_timeout=None)
            pubsub = client.pubsub()
            try:
                await pubsub.psubscribe(self.keys.events_pattern())
                self.connected.set()
                backoff = 0.2
                self._broadcast(None, {"type": "resync"})  # events may have been missed while disconnected
                while True:
                    # Blocks until a message arrives (None after 30 s of silence, or for a non-data reply); the
                    # client's health_check_interval pings a silent connection, so a dead server is noticed.
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=30.0)
                    if message is None or message["type"] != "pmessage":
                        continue
                    self._broadcast(message["channel"][prefix_len:], json.loads(message["data"]))
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as err:
                if self.connected.is_set():
                    log.warning("event subscription lost (%s); reconnecting", err)
                self.connected.clear()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                    await client.aclose()
