"""The job queue on Redis Streams, shared by the API (producer) and the workers (consumers).

Layout (every key starts with the configured prefix `P`):

    P:queue:{model}:{priority}   stream of entries {job: id}; consumer group "workers"; priority high|normal|low
    P:dead:{model}               dead-letter stream: jobs that failed, with reason and message
    P:job:{id}                   hash: the job's request, status, progress, timings, error (expires after job_ttl)
    P:job:{id}:image:{k}         PNG bytes of image k (same TTL)
    P:idem:{scope}:{key}         Idempotency-Key -> job id (same TTL)
    P:recent:{scope}:{print}     the caller's latest sync job for that request fingerprint, which a client's
                                 automatic retry (x-stainless-retry-count >= 1) rejoins instead of queueing anew
    P:events:{id}                pub/sub channel: JSON {"type": "status"|"progress", ...}
    P:workers:{model}            hash: consumer name -> JSON heartbeat

Protocol (at-least-once, no visible duplicates):
- `submit` is one Lua script: idempotency lookup, bounded-queue check (entries still in the model's streams, i.e.
  queued or running), job hash, XADD. So the bound holds under concurrency.
- Workers `read` with XREADGROUP (high priority first), `start` a job (queued|running -> running, attempts + 1; fails
  it once attempts reach the limit), `complete` it (images + status in one script, only while it is still running:
  the first result stored wins, so a reclaimed job never overwrites what a client may have read), then `ack`
  (XACK + XDEL). A dead worker's entries stay pending; live workers `reclaim` them with XAUTOCLAIM after the
  visibility timeout, and `touch` their own in-flight entries so long batches are not reclaimed.
- Every status change and progress step is published on the job's channel; `EventHub` (API side) fans one pattern
  subscription out to waiting requests, so nothing polls.
- Job ids carry their creation time and a tag of the Redis run id (`INFO server`), so a job missing from a Redis that
  restarted without persistence is reported as lost (`missing_reason`), not as expired.
- Workers `prune` what dead workers leave: consumers with nothing pending, idle past the stale age and without a
  fresh heartbeat, and heartbeats older than the prune age.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import secrets
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

log = logging.getLogger(__name__)

GROUP = "workers"
PRIORITIES = ("high", "normal", "low")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
DEAD_LETTER_MAXLEN = 10_000


class QueueFull(Exception):
    """The model's queue holds `queue_max_length` jobs; the client should retry after `retry_after` seconds."""

    def __init__(self, depth: int, retry_after: int) -> None:
        super().__init__(f"queue full ({depth} jobs waiting or running)")
        self.depth = depth
        self.retry_after = retry_after


class Keys:
    """Names of every Redis key, in one place."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def stream(self, model: str, priority: str) -> str:
        return f"{self.prefix}:queue:{model}:{priority}"

    def streams(self, model: str) -> list[str]:
        return [self.stream(model, p) for p in PRIORITIES]

    def dead(self, model: str) -> str:
        return f"{self.prefix}:dead:{model}"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def image(self, job_id: str, k: int) -> str:
        return f"{self.prefix}:job:{job_id}:image:{k}"

    def idempotency(self, scope: str, key: str) -> str:
        digest = hashlib.sha256(key.encode()).hexdigest()[:32]
        return f"{self.prefix}:idem:{scope}:{digest}"

    def events(self, job_id: str) -> str:
        return f"{self.prefix}:events:{job_id}"

    def events_pattern(self) -> str:
        return f"{self.prefix}:events:*"

    def workers(self, model: str) -> str:
        return f"{self.prefix}:workers:{model}"

    def stats(self, model: str) -> str:
        return f"{self.prefix}:stats:{model}"

    def rate(self, scope: str, window: int) -> str:
        return f"{self.prefix}:rate:{scope}:{window}"

    def recent(self, scope: str, fingerprint: str) -> str:
        return f"{self.prefix}:recent:{scope}:{fingerprint[:32]}"


@dataclass(frozen=True)
class JobParams:
    """What to generate: everything a worker needs, already validated and with seeds drawn."""

    model: str
    prompt: str
    negative_prompt: str
    n: int
    width: int
    height: int
    steps: int
    guidance: float
    seeds: tuple[int, ...]
    response_format: str = "b64_json"
    output_format: str = "png"  # how the API encodes the stored PNGs for the client (the worker always stores PNG)
    output_compression: int | None = None  # jpeg/webp quality in percent


@dataclass
class Job:
    """A job as stored in its hash."""

    id: str
    params: JobParams
    status: str
    priority: str
    created_at: float
    entry_id: str = ""
    fingerprint: str = ""
    owner: str = ""
    attempts: int = 0
    worker: str = ""
    started_at: float | None = None
    finished_at: float | None = None
    progress_step: int = 0
    progress_total: int = 0
    batch_size: int | None = None
    inference_s: float | None = None
    images: int = 0
    error_type: str = ""
    error_message: str = ""
    cancel_requested: bool = False

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> Job:
        def opt_float(key: str) -> float | None:
            return float(h[key]) if h.get(key) else None

        params = JobParams(
            model=h["model"], prompt=h["prompt"], negative_prompt=h.get("negative_prompt", ""), n=int(h["n"]),
            width=int(h["width"]), height=int(h["height"]), steps=int(h["steps"]), guidance=float(h["guidance"]),
            seeds=tuple(json.loads(h["seeds"])), response_format=h.get("response_format", "b64_json"),
            output_format=h.get("output_format") or "png",
            output_compression=int(h["output_compression"]) if h.get("output_compression") else None)
        return cls(
            id=h["id"], params=params, status=h["status"], priority=h.get("priority", "normal"),
            created_at=float(h["created_at"]), entry_id=h.get("entry_id", ""), fingerprint=h.get("fingerprint", ""),
            owner=h.get("owner", ""), attempts=int(h.get("attempts", 0)), worker=h.get("worker", ""),
            started_at=opt_float("started_at"),
            finished_at=opt_float("finished_at"), progress_step=int(h.get("progress_step", 0)),
            progress_total=int(h.get("progress_total", params.steps)),
            batch_size=int(h["batch_size"]) if h.get("batch_size") else None, inference_s=opt_float("inference_s"),
            images=int(h.get("images", 0)), error_type=h.get("error_type", ""),
            error_message=h.get("error_message", ""), cancel_requested=h.get("cancel_requested") == "1")

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL


@dataclass
class Claim:
    """A stream entry a worker has read (or reclaimed) and must acknowledge."""

    job: Job
    stream: str
    entry_id: str
    received_at: float = field(default_factory=time.monotonic)


# -- Lua scripts: each state transition is atomic, so API and any number of workers can race safely. ------------

_SUBMIT = """
-- KEYS: job hash, target stream, idempotency key ('' = none), recent-sync key ('' = none), then every stream of
-- the model. ARGV: job id, max length, ttl, field/value pairs...
if KEYS[3] ~= '' then
  local existing = redis.call('GET', KEYS[3])
  if existing then return {'existing', existing} end
end
-- The same job id again is a resend of this very call (the client retried it on a fresh connection): no second entry
if redis.call('EXISTS', KEYS[1]) == 1 then return {'created', ARGV[1]} end
local depth = 0
for i = 5, #KEYS do depth = depth + redis.call('XLEN', KEYS[i]) end
if depth >= tonumber(ARGV[2]) then return {'full', tostring(depth)} end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
local entry = redis.call('XADD', KEYS[2], '*', 'job', ARGV[1])
redis.call('HSET', KEYS[1], 'entry_id', entry, 'stream', KEYS[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
if KEYS[3] ~= '' then redis.call('SET', KEYS[3], ARGV[1], 'EX', ARGV[3]) end
if KEYS[4] ~= '' then redis.call('SET', KEYS[4], ARGV[1], 'EX', ARGV[3]) end
return {'created', ARGV[1]}
"""

_START = """
-- KEYS: job hash. ARGV: consumer, max attempts, now. Returns ok | exhausted | cancelled | missing | <status>
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if status ~= 'queued' and status ~= 'running' then return status end
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[3])
  return 'cancelled'
end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
if attempts >= tonumber(ARGV[2]) then return 'exhausted' end
redis.call('HSET', KEYS[1], 'status', 'running', 'attempts', attempts + 1, 'worker', ARGV[1],
           'started_at', ARGV[3], 'progress_step', 0)
return 'ok'
"""

_COMPLETE = """
-- KEYS: job hash, image keys. ARGV: ttl, now, field/value count, field/value pairs..., then one PNG per image key
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'running' then return status or 'missing' end
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[2])
  return 'cancelled'
end
local nfields = tonumber(ARGV[3])
for i = 2, #KEYS do redis.call('SET', KEYS[i], ARGV[3 + nfields + i - 1], 'EX', ARGV[1]) end
redis.call('HSET', KEYS[1], 'status', 'succeeded', 'finished_at', ARGV[2], 'images', #KEYS - 1,
           unpack(ARGV, 4, 3 + nfields))
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 'succeeded'
"""

_FAIL = """
-- KEYS: job hash, dead-letter stream. ARGV: error type, message, now, dead-letter maxlen, job id
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'queued' and status ~= 'running' then return status or 'missing' end
redis.call('HSET', KEYS[1], 'status', 'failed', 'error_type', ARGV[1], 'error_message', ARGV[2], 'finished_at', ARGV[3])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'job', ARGV[5], 'reason', ARGV[1], 'message', ARGV[2],
           'failed_at', ARGV[3])
return 'failed'
"""

_CANCEL = """
-- KEYS: job hash. ARGV: now. Returns cancelled_now (was queued) | cancelling (running: stops at its next step) |
-- missing | the job's (terminal) status
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if status == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[1])
  return 'cancelled_now'
end
if status == 'running' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1')
  return 'cancelling'
end
return status
"""

_PROGRESS = """
-- KEYS: job hashes. ARGV: step, total, event JSON, then one channel per key. Returns each job's cancel flag.
-- Only existing hashes are updated: a job whose record expired mid-run must not come back as a partial hash.
local flags = {}
for i, key in ipairs(KEYS) do
  flags[i] = ''
  if redis.call('EXISTS', key) == 1 then
    redis.call('HSET', key, 'progress_step', ARGV[1], 'progress_total', ARGV[2])
    flags[i] = redis.call('HGET', key, 'cancel_requested') or ''
  end
  redis.call('PUBLISH', ARGV[3 + i], ARGV[3])
end
return flags
"""

_MARK_CANCELLED = """
-- KEYS: job hash. ARGV: now. A running job whose cancellation the worker has honoured.
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[1])
return 1
"""

_DROP_IDLE_CONSUMER = """
-- KEYS: stream. ARGV: group, consumer. Deletes the consumer only if it holds no pending entry (checked and done in
-- one step, so an entry it reads meanwhile cannot be dropped with it).
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return 0 end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
"""


def connect(url: str, *, socket_timeout: float | None = 5.0, decode: bool = True) -> aioredis.Redis:
    """An asyncio client that fails fast when Redis is down and reconnects when it is back.

    A command that fails with a connection error is retried once, at once, on a fresh connection: after a Redis
    restart every pooled connection is dead, and without the retry the first request on each would fail although
    Redis is up. Only connection errors are retried (a refused connection fails again in milliseconds, so a down
    Redis still answers fast); a timeout is not (the command may have run). Every script this module sends is safe to
    run twice on a reconnect (submit recognises its own job id)."""
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return aioredis.Redis.from_url(url, decode_responses=decode, socket_timeout=socket_timeout,
                                   socket_connect_timeout=2.0,
                                   retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
                                   health_check_interval=30)


# -- job ids -----------------------------------------------------------------------------------------------------
# 32 hex digits: creation time in ms (12), a tag of the Redis run id the job was stored in (6), random (14). A job
# missing from Redis can then be told apart: expired (older than the TTL), lost (Redis has another run id: it
# restarted without persistence since), or never there.

RUN_TAG_LEN = 6


def new_job_id(run_id: str, now: float | None = None) -> str:
    millis = int((time.time() if now is None else now) * 1000)
    return f"{millis:012x}{run_id[:RUN_TAG_LEN].ljust(RUN_TAG_LEN, '0')}{secrets.token_hex(7)}"


def job_id_origin(job_id: str) -> tuple[float, str] | None:
    """(created, run tag) of an id made by `new_job_id`, or None for anything else (ids of older versions)."""
    if len(job_id) != 32:
        return None
    try:
        millis = int(job_id[:12], 16)
        int(job_id, 16)
    except ValueError:
        return None
    created = millis / 1000
    if not 1.6e9 <= created <= time.time() + 86400:
        return None
    return created, job_id[12:12 + RUN_TAG_LEN]


class JobQueue:
    """Every queue operation of the API and the workers, as methods over one Redis connection pool."""

    def __init__(self, redis: aioredis.Redis, prefix: str, *, job_ttl_s: int = 3600, max_length: int = 256,
                 raw: aioredis.Redis | None = None) -> None:
        self.redis = redis
        self.raw = raw  # a client without response decoding, to read PNG bytes
        self.keys = Keys(prefix)
        self.job_ttl_s = job_ttl_s
        self.max_length = max_length
        self._groups_ready: set[str] = set()
        self._run_id: tuple[float, str] | None = None  # (read at, Redis run id)
        self._submit = redis.register_script(_SUBMIT)
        self._start = redis.register_script(_START)
        self._complete = redis.register_script(_COMPLETE)
        self._fail = redis.register_script(_FAIL)
        self._cancel = redis.register_script(_CANCEL)
        self._mark_cancelled = redis.register_script(_MARK_CANCELLED)
        self._progress = redis.register_script(_PROGRESS)
        self._drop_idle_consumer = redis.register_script(_DROP_IDLE_CONSUMER)

    # -- shared ----------------------------------------------------------------------------------------------

    async def ensure_groups(self, model: str) -> None:
        """Create the model's streams and consumer group (idempotent; entries added before creation are kept)."""
        for stream in self.keys.streams(model):
            if stream in self._groups_ready:
                continue
            try:
                await self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except ResponseError as err:
                if "BUSYGROUP" not in str(err):
                    raise
            self._groups_ready.add(stream)

    def forget_groups(self) -> None:
        """Forget which groups exist (after a Redis restart lost them), so the next `ensure_groups` recreates."""
        self._groups_ready.clear()

    async def get(self, job_id: str) -> Job | None:
        h = cast("dict[str, str]", await self.redis.hgetall(self.keys.job(job_id)))  # decode_responses=True
        return Job.from_hash(h) if h.get("id") else None  # absent (never existed, or expired)

    async def publish(self, job_id: str, event: dict[str, Any]) -> None:
        await self.redis.publish(self.keys.events(job_id), json.dumps(event))

    async def depth(self, model: str) -> int:
        """Jobs queued or running for `model` (entries not yet acknowledged)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream in self.keys.streams(model):
                pipe.xlen(stream)
            return sum(await pipe.execute())

    async def run_id(self, max_age_s: float = 1.0) -> str:
        """The Redis server's run id (new at every restart), cached for `max_age_s`."""
        now = time.monotonic()
        if self._run_id is None or now - self._run_id[0] > max_age_s:
            info = await self.redis.info("server")
            self._run_id = (now, str(info.get("run_id", "")))
        return self._run_id[1]

    async def new_job_id(self) -> str:
        return new_job_id(await self.run_id())

    async def missing_reason(self, job_id: str) -> str:
        """Why a job is not in Redis: 'expired' (older than the TTL), 'lost' (stored in an earlier run of a Redis that
        restarted without persistence, within its TTL), or 'unknown'."""
        origin = job_id_origin(job_id)
        if origin is None:
            return "unknown"
        created, tag = origin
        if time.time() - created > self.job_ttl_s:
            return "expired"
        current = (await self.run_id(max_age_s=0.0))[:RUN_TAG_LEN]
        return "lost" if tag != current else "unknown"

    # -- API side --------------------------------------------------------------------------------------------

    async def idempotent_job(self, scope: str, key: str) -> str | None:
        """The job id an Idempotency-Key of `scope` already names, if any."""
        return cast("str | None", await self.redis.get(self.keys.idempotency(scope, key)))

    async def recent_job(self, scope: str, fingerprint: str) -> str | None:
        """The caller's latest sync job with this request fingerprint (still within its TTL), if any."""
        return cast("str | None", await self.redis.get(self.keys.recent(scope, fingerprint)))

    async def submit(self, job_id: str, params: JobParams, *, priority: str = "normal",
                     idempotency: tuple[str, str] | None = None, fingerprint: str = "",
                     owner: str = "", remember: bool = False) -> tuple[str, bool]:
        """Enqueue a job; returns (job id, created). With an idempotency (scope, key) already used, returns the
        original job id and created=False (the caller compares fingerprints). With `remember`, the job becomes the
        owner's recent job for its fingerprint (`recent_job`). Raises QueueFull."""
        await self.ensure_groups(params.model)
        now = time.time()
        fields: dict[str, Any] = {
            "id": job_id, "model": params.model, "status": "queued", "priority": priority, "created_at": now,
            "prompt": params.prompt, "negative_prompt": params.negative_prompt, "n": params.n,
            "width": params.width, "height": params.height, "steps": params.steps, "guidance": params.guidance,
            "seeds": json.dumps(list(params.seeds)), "response_format": params.response_format,
            "output_format": params.output_format,
            "output_compression": "" if params.output_compression is None else params.output_compression,
            "fingerprint": fingerprint, "owner": owner, "attempts": 0, "progress_step": 0,
            "progress_total": params.steps,
        }
        idem_key = self.keys.idempotency(*idempotency) if idempotency else ""
        args: list[Any] = [job_id, self.max_length, self.job_ttl_s]
        for name, value in fields.items():
            args += [name, value]
        recent_key = self.keys.recent(owner, fingerprint) if remember and fingerprint else ""
        keys = [self.keys.job(job_id), self.keys.stream(params.model, priority), idem_key, recent_key,
                *self.keys.streams(params.model)]
        outcome, value = await self._submit(keys=keys, args=args)
        if outcome == "full":
            raise QueueFull(int(value), await self.retry_after(params.model, int(value)))
        return value, outcome == "created"

    async def retry_after(self, model: str, depth: int) -> int:
        """Seconds until the queue has room, from the workers' recent seconds-per-image and their number."""
        stats = await self.redis.hgetall(self.keys.stats(model))
        per_image = float(stats.get("seconds_per_image", 1.0))
        workers = max(1, len(await self.live_workers(model, stale_s=60.0)))
        return max(1, min(600, math.ceil(depth * per_image / workers)))

    async def cancel(self, job_id: str) -> str:
        """Returns 'cancelled_now' (it was queued), 'cancelling' (running: it stops at its next step), 'missing',
        or the status of a job that had already finished."""
        outcome = await self._cancel(keys=[self.keys.job(job_id)], args=[time.time()])
        if outcome == "cancelled_now":
            job = await self.get(job_id)
            if job is not None and job.entry_id:
                # The entry will never run: drop it so it stops counting against the queue bound.
                await self.redis.xdel(self.keys.stream(job.params.model, job.priority), job.entry_id)
            await self.publish(job_id, {"type": "status", "status": "cancelled"})
        elif outcome == "cancelling":
            await self.publish(job_id, {"type": "cancel_requested"})
        return outcome

    async def position(self, job: Job) -> int | None:
        """How many undelivered jobs are ahead of a queued one (higher priorities first), or None if not queued."""
        if job.status != "queued" or not job.entry_id:
            return None
        ahead = 0
        groups = {}
        for stream in self.keys.streams(job.params.model):
            try:
                info = await self.redis.xinfo_groups(stream)
            except ResponseError:
                info = []
            groups[stream] = next((g["last-delivered-id"] for g in info if g["name"] == GROUP), "0-0")
        for priority in PRIORITIES:
            stream = self.keys.stream(job.params.model, priority)
            last = groups[stream]
            if priority == job.priority:
                if _entry_le(job.entry_id, last):
                    return 0  # already handed to a worker, about to start
                ahead += len(await self.redis.xrange(stream, f"({last}", f"({job.entry_id}") or ())
                return ahead
            ahead += len(await self.redis.xrange(stream, f"({last}", "+") or ())
        return ahead

    async def image(self, job_id: str, k: int) -> bytes | None:
        client = self.raw or self.redis
        data = await client.get(self.keys.image(job_id, k))
        return data.encode() if isinstance(data, str) else data

    async def live_workers(self, model: str, stale_s: float) -> list[dict[str, Any]]:
        beats = await self.redis.hgetall(self.keys.workers(model))
        now = time.time()
        alive = []
        for consumer, raw in beats.items():
            beat = json.loads(raw)
            beat["consumer"] = consumer
            beat["age_s"] = max(0.0, now - float(beat["ts"]))
            if beat["age_s"] <= stale_s:
                alive.append(beat)
        return alive

    async def all_heartbeats(self, model: str) -> list[dict[str, Any]]:
        return await self.live_workers(model, stale_s=math.inf)

    # -- worker side -----------------------------------------------------------------------------------------

    async def _claims(self, replies: Iterable, consumer: str) -> list[Claim]:
        claims = []
        for stream, entries in replies:
            for entry_id, fields in entries:
                if not fields:  # the entry was deleted (e.g. a cancelled queued job) while pending
                    await self.redis.xack(stream, GROUP, entry_id)
                    continue
                job = await self.get(fields["job"])
                if job is None:  # the job record expired: nothing to do
                    await self._ack_raw(stream, entry_id)
                    continue
                claims.append(Claim(job=job, stream=stream, entry_id=entry_id))
        return claims

    async def read(self, model: str, consumer: str, count: int, block_ms: int = 0) -> list[Claim]:
        """New entries for `consumer`, highest priority first; blocks up to `block_ms` when all are empty. Reads at
        most `count` entries; a `count` below 1 reads nothing (XREADGROUP would take COUNT 0 as no limit)."""
        if count < 1:
            return []
        streams = self.keys.streams(model)
        for stream in streams:
            replies = await self.redis.xreadgroup(GROUP, consumer, {stream: ">"}, count=count)
            if replies:
                return await self._claims(replies, consumer)
        if block_ms <= 0:
            return []
        replies = await self.redis.xreadgroup(GROUP, consumer, dict.fromkeys(streams, ">"), count=count,
                                              block=block_ms)
        return await self._claims(replies or [], consumer)

    async def reclaim(self, model: str, consumer: str, min_idle_s: float, count: int) -> list[Claim]:
        """Entries another consumer left unacknowledged longer than the visibility timeout (XAUTOCLAIM)."""
        found: list[tuple[str, list]] = []
        for stream in self.keys.streams(model):
            reply = await self.redis.xautoclaim(stream, GROUP, consumer, int(min_idle_s * 1000), "0-0", count=count)
            entries = reply[1]
            for entry_id in reply[2] if len(reply) > 2 else []:  # deleted while pending (Redis >= 7)
                await self.redis.xack(stream, GROUP, entry_id)
            if entries:
                found.append((stream, entries))
        claims = await self._claims(found, consumer)
        for claim in claims:
            log.warning("reclaimed job %s (entry %s idle > %.1fs, attempt %d so far)", claim.job.id, claim.entry_id,
                        min_idle_s, claim.job.attempts)
        return claims

    async def touch(self, claims: list[Claim], consumer: str) -> None:
        """Reset the idle time of entries this consumer still owns, so a long batch is not reclaimed."""
        by_stream: dict[str, list[str]] = defaultdict(list)
        for c in claims:
            by_stream[c.stream].append(c.entry_id)
        for stream, ids in by_stream.items():
            pending = await self.redis.xpending_range(stream, GROUP, min="-", max="+", count=len(ids) + 1000,
                                                      consumername=consumer)
            owned = {p["message_id"] for p in pending} & set(ids)
            if owned:
                await self.redis.xclaim(stream, GROUP, consumer, 0, list(sorted(owned)), justid=True)

    async def start(self, claim: Claim, consumer: str, max_attempts: int) -> str:
        """queued|running -> running. Returns ok | exhausted | cancelled | missing | the terminal status."""
        outcome = await self._start(keys=[self.keys.job(claim.job.id)], args=[consumer, max_attempts, time.time()])
        if outcome == "ok":
            claim.job.attempts += 1
            await self.publish(claim.job.id, {"type": "status", "status": "running", "attempt": claim.job.attempts})
        elif outcome == "cancelled":
            await self.publish(claim.job.id, {"type": "status", "status": "cancelled"})
        return outcome

    async def progress(self, claims: list[Claim], step: int, total: int) -> set[str]:
        """Record and publish one denoising step for every job of a batch; returns the ids whose cancellation was
        requested (one round trip per step)."""
        if not claims:
            return set()
        event = json.dumps({"type": "progress", "step": step, "total": total})
        flags = await self._progress(keys=[self.keys.job(c.job.id) for c in claims],
                                     args=[step, total, event, *(self.keys.events(c.job.id) for c in claims)])
        return {c.job.id for c, flag in zip(claims, flags, strict=True) if flag == "1"}

    async def complete(self, claim: Claim, pngs: list[bytes], info: dict[str, Any]) -> str:
        """Store the images and mark succeeded, unless another attempt already did (then store nothing).
        Returns 'succeeded', 'cancelled' or the status found."""
        (outcome,) = await self.complete_many([(claim, pngs, info)])
        return outcome

    async def complete_many(self, results: list[tuple[Claim, list[bytes], dict[str, Any]]]) -> list[str]:
        """`complete` for a whole batch in two round trips, so its clients are told at the same moment (and, in a
        closed loop, come back in time to share the next batch)."""
        now = time.time()
        async with self.redis.pipeline(transaction=False) as pipe:
            for claim, pngs, info in results:
                flat: list[Any] = []
                for name, value in info.items():
                    flat += [name, value]
                keys = [self.keys.job(claim.job.id)] + [self.keys.image(claim.job.id, k) for k in range(len(pngs))]
                await self._complete(keys=keys, args=[self.job_ttl_s, now, len(flat), *flat, *pngs], client=pipe)
            outcomes = await pipe.execute()
        async with self.redis.pipeline(transaction=False) as pipe:
            for (claim, _, _), outcome in zip(results, outcomes, strict=True):
                if outcome in ("succeeded", "cancelled"):
                    pipe.publish(self.keys.events(claim.job.id), json.dumps({"type": "status", "status": outcome}))
            await pipe.execute()
        return list(outcomes)

    async def fail(self, claim: Claim, error_type: str, message: str) -> str:
        """Mark a job failed and copy it to the model's dead-letter stream."""
        job = claim.job
        outcome = await self._fail(keys=[self.keys.job(job.id), self.keys.dead(job.params.model)],
                                   args=[error_type, message, time.time(), DEAD_LETTER_MAXLEN, job.id])
        if outcome == "failed":
            await self.publish(job.id, {"type": "status", "status": "failed", "error": error_type})
        return outcome

    async def mark_cancelled(self, claim: Claim) -> bool:
        done = bool(await self._mark_cancelled(keys=[self.keys.job(claim.job.id)], args=[time.time()]))
        if done:
            await self.publish(claim.job.id, {"type": "status", "status": "cancelled"})
        return done

    async def ack(self, claim: Claim) -> None:
        await self._ack_raw(claim.stream, claim.entry_id)

    async def ack_many(self, claims: list[Claim]) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for claim in claims:
                pipe.xack(claim.stream, GROUP, claim.entry_id)
                pipe.xdel(claim.stream, claim.entry_id)
            await pipe.execute()

    async def _ack_raw(self, stream: str, entry_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(stream, GROUP, entry_id)
            pipe.xdel(stream, entry_id)
            await pipe.execute()

    async def heartbeat(self, model: str, consumer: str, info: dict[str, Any], ttl_s: float) -> None:
        key = self.keys.workers(model)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(key, consumer, json.dumps({"ts": time.time(), **info}))
            pipe.expire(key, max(60, int(ttl_s)))
            await pipe.execute()

    async def forget_worker(self, model: str, consumer: str) -> None:
        await self.redis.hdel(self.keys.workers(model), consumer)

    async def prune(self, model: str, *, stale_s: float, heartbeat_max_age_s: float) -> tuple[list[str], list[str]]:
        """Forget dead workers: delete consumers of the model's group with nothing pending, idle for longer than
        `stale_s` and without a heartbeat younger than that (XGROUP DELCONSUMER would drop pending entries, so
        consumers with any are kept until they are reclaimed), and heartbeats older than `heartbeat_max_age_s`.
        A live consumer that is removed anyway is recreated by its next read. Returns (consumers, heartbeats)
        removed."""
        beats = await self.all_heartbeats(model)
        fresh = {b["consumer"] for b in beats if b["age_s"] <= stale_s}
        old_beats = [b["consumer"] for b in beats if b["age_s"] > heartbeat_max_age_s]
        if old_beats:
            await self.redis.hdel(self.keys.workers(model), *old_beats)
        removed: set[str] = set()
        for stream in self.keys.streams(model):
            try:
                consumers = await self.redis.xinfo_consumers(stream, GROUP)
            except ResponseError:  # no such stream or group yet
                continue
            for c in consumers:
                name = c["name"]
                idle_ms = int(c.get("idle", 0))  # since its last read or claim attempt
                if int(c.get("pending", 0)) == 0 and name not in fresh and idle_ms > stale_s * 1000 and \
                        await self._drop_idle_consumer(keys=[stream], args=[GROUP, name]):
                    removed.add(name)
        return sorted(removed), old_beats

    async def record_speed(self, model: str, seconds_per_image: float) -> None:
        """Exponential moving average of seconds per image, for Retry-After estimates."""
        key = self.keys.stats(model)
        old = await self.redis.hget(key, "seconds_per_image")
        value = seconds_per_image if old is None else 0.8 * float(old) + 0.2 * seconds_per_image
        await self.redis.hset(key, "seconds_per_image", value)
        await self.redis.expire(key, 7 * 24 * 3600)


def _entry_le(a: str, b: str) -> bool:
    """Stream id a <= b."""
    ma, sa = (int(x) for x in a.split("-"))
    mb, sb = (int(x) for x in b.split("-"))
    return (ma, sa) <= (mb, sb)
