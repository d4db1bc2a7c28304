"""API keys and per-key rate limits.

With keys configured (SPO_API_KEYS and/or SPO_API_KEYS_FILE) every /v1 route needs `Authorization: Bearer <key>`.
Keys are compared in constant time against every configured key (no early exit), and are never stored or logged:
a key is known by a short SHA-256 digest (its *scope*), which also names its rate-limit counter and its jobs.
The rate limit is a fixed one-minute window counted in Redis, so it holds across API replicas.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time

import redis.asyncio as aioredis

from service.api.errors import ApiError
from service.contracts.queue import Keys

ANONYMOUS = "anonymous"


def key_scope(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class Authenticator:
    def __init__(self, keys: list[str], *, rate_limit_per_minute: int = 0) -> None:
        self._keys = [k.encode() for k in keys]
        self.rate_limit_per_minute = rate_limit_per_minute

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def authenticate(self, authorization: str | None) -> str:
        """The caller's scope; raises 401 when keys are configured and the header is missing or wrong."""
        if not self.enabled:
            return ANONYMOUS
        challenge = {"WWW-Authenticate": "Bearer"}
        if not authorization:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", type="authentication_error",
                           code="missing_api_key", headers=challenge)
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "malformed Authorization header: expected 'Bearer <key>'",
                           type="authentication_error", code="invalid_api_key", headers=challenge)
        provided = token.encode()
        matched = False
        for key in self._keys:  # check every key, so timing does not tell which (or how many) matched
            matched |= hmac.compare_digest(provided, key)
        if not matched:
            raise ApiError(401, "invalid API key", type="authentication_error", code="invalid_api_key",
                           headers=challenge)
        return key_scope(token)

    async def check_rate(self, redis: aioredis.Redis, keys: Keys, scope: str) -> None:
        """Count one submission for `scope`; 429 with Retry-After past the per-minute limit."""
        limit = self.rate_limit_per_minute
        if limit <= 0:
            return
        now = time.time()
        window = int(now // 60)
        counter = keys.rate(scope, window)
        async with redis.pipeline(transaction=True) as pipe:
            pipe.incr(counter)
            pipe.expire(counter, 120)
            count, _ = await pipe.execute()
        if count > limit:
            retry_after = max(1, math.ceil((window + 1) * 60 - now))
            raise ApiError(429, f"rate limit reached: {limit} submissions per minute for this key",
                           type="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": str(retry_after)})
