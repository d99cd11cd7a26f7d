"""Per-tenant rate limits on chat: requests a minute and tokens a minute, as OpenAI's API has them.

Each tenant has two token buckets, each holding at most one minute's worth and refilled continuously (a
sixtieth of the limit a second), so a tenant that was idle may burst a full minute's worth at once, and no
more. A request takes one from the requests bucket. Its tokens (prompt and completion, every sampled answer)
are only known once it is answered, so they are taken from the tokens bucket then, which may leave it in
debt; a request is refused while either bucket holds less than one. A tenant can so overshoot its token limit
by what its requests in flight use, which the per-key cap on chats in flight bounds (admission.py).

Where the buckets live:
- in the gateway process (the default): nothing to run, but N gateway replicas admit N times the limit;
- in Redis (`ALIGNLOOP_RATE_LIMIT_REDIS_URL`): shared by every replica. One round trip per request; the refill
  and the take run as one Lua script, on Redis's clock, so replicas neither race nor disagree on the time.
  If Redis cannot be reached the request is admitted (fail open, as Envoy's rate limiter does by default) and
  `alignloop_gateway_rate_limit_errors_total` counts it: a quota store that is down must not take chat down.

Every answer to a limited tenant carries OpenAI's `x-ratelimit-*` headers; a refusal is a 429 with
`Retry-After` and `retry-after-ms`, which the `openai` SDK waits out by itself.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import Counter

from alignloop.credentials import Limits
from services.gateway.errors import ApiError

log = logging.getLogger("alignloop.gateway.rate_limits")

RATE_LIMITED = Counter("alignloop_gateway_rate_limited_total",
                       "Chat requests refused by a tenant's rate limit, by the limit that refused them.", ["limit"])
ERRORS = Counter("alignloop_gateway_rate_limit_errors_total",
                 "Rate-limit checks and charges that failed (the bucket store could not be reached); their "
                 "requests were admitted.")

MINUTE_S = 60.0


def refilled(level: float, elapsed_s: float, limit: int) -> float:
    """What a bucket of `limit` a minute holds `elapsed_s` after it held `level`: never more than `limit`."""
    return min(float(limit), level + elapsed_s * limit / MINUTE_S)


@dataclass(frozen=True)
class Levels:
    """What a tenant's buckets hold after a check: `requests` and `tokens` (None: that limit is off), and
    whether the check took a request (both held at least one)."""

    requests: float | None
    tokens: float | None
    taken: bool = False


def _admits(requests: float | None, tokens: float | None) -> bool:
    return all(level is None or level >= 1 for level in (requests, tokens))


class LocalBuckets:
    """Buckets in this process (one gateway's share of the traffic)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (level, when)

    def _level(self, name: str, limit: int, now: float) -> float:
        level, at = self._buckets.get(name, (float(limit), now))
        return refilled(level, now - at, limit)

    async def take(self, tenant: str, limits: Limits) -> Levels:
        now = self._clock()
        rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
        requests = self._level(f"{tenant}:requests", rpm, now) if rpm else None
        tokens = self._level(f"{tenant}:tokens", tpm, now) if tpm else None
        if not _admits(requests, tokens):
            return Levels(requests, tokens)
        if requests is not None:
            requests -= 1
            self._buckets[f"{tenant}:requests"] = (requests, now)
        return Levels(requests, tokens, taken=True)

    def charge(self, tenant: str, tokens_per_minute: int, tokens: int) -> None:
        now = self._clock()
        name = f"{tenant}:tokens"
        self._buckets[name] = (self._level(name, tokens_per_minute, now) - tokens, now)

    async def close(self) -> None:
        pass


# The same arithmetic as LocalBuckets, atomically in Redis. A bucket is a hash {level, at}; an absent one is
# full, so each write sets the key to expire once the bucket would be full again: idle tenants cost nothing.
_LEVEL = """
local now
do local t = redis.call('TIME'); now = tonumber(t[1]) + tonumber(t[2]) / 1000000 end
local function level(key, limit)
  local held = redis.call('HMGET', key, 'level', 'at')
  if not held[1] then return limit end
  return math.min(limit, tonumber(held[1]) + (now - tonumber(held[2])) * limit / 60)
end
local function store(key, value, limit)
  redis.call('HSET', key, 'level', tostring(value), 'at', tostring(now))
  redis.call('PEXPIRE', key, math.ceil((limit - value) * 60000 / limit) + 1000)
end
"""
# KEYS: the requests and tokens buckets; ARGV: their limits (0: off). Returns the levels after the check,
# and 1 if it took a request.
_TAKE = _LEVEL + """
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local requests, tokens = -1, -1
if rpm > 0 then requests = level(KEYS[1], rpm) end
if tpm > 0 then tokens = level(KEYS[2], tpm) end
if (rpm > 0 and requests < 1) or (tpm > 0 and tokens < 1) then
  return {tostring(requests), tostring(tokens), 0}
end
if rpm > 0 then
  requests = requests - 1
  store(KEYS[1], requests, rpm)
end
return {tostring(requests), tostring(tokens), 1}
"""
# KEYS: the tokens bucket; ARGV: its limit and the tokens spent.
_SPEND = _LEVEL + """
local tpm = tonumber(ARGV[1])
store(KEYS[1], level(KEYS[1], tpm) - tonumber(ARGV[2]), tpm)
return 0
"""


class RedisBuckets:
    """Buckets in Redis, shared by every gateway replica."""

    def __init__(self, url: str, timeout_s: float = 0.25, prefix: str = "alignloop:ratelimit:") -> None:
        import redis.asyncio as redis  # only gateways configured for it need the client

        self._client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._take = self._client.register_script(_TAKE)
        self._spend = self._client.register_script(_SPEND)
        self._prefix = prefix

    def _keys(self, tenant: str) -> tuple[str, str]:
        # {tenant}: a Redis Cluster hash tag, so that both of a tenant's buckets sit on the script's one shard.
        return f"{self._prefix}{{{tenant}}}:requests", f"{self._prefix}{{{tenant}}}:tokens"

    async def take(self, tenant: str, limits: Limits) -> Levels:
        requests, tokens, taken = await self._take(
            keys=self._keys(tenant), args=[limits.requests_per_minute or 0, limits.tokens_per_minute or 0])
        return Levels(float(requests) if limits.requests_per_minute else None,
                      float(tokens) if limits.tokens_per_minute else None, taken == 1)

    async def spend(self, tenant: str, tokens_per_minute: int, tokens: int) -> None:
        await self._spend(keys=self._keys(tenant)[1:], args=[tokens_per_minute, tokens])

    async def close(self) -> None:
        await self._client.aclose()


def duration(seconds: float) -> str:
    """A reset time as OpenAI writes it: '20ms', '1.5s', '6m0s'."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest}s"


def _headers(kind: str, limit: int, level: float) -> dict[str, str]:
    return {f"x-ratelimit-limit-{kind}": str(limit),
            f"x-ratelimit-remaining-{kind}": str(max(0, math.floor(level))),
            f"x-ratelimit-reset-{kind}": duration(max(0.0, (limit - level) * MINUTE_S / limit))}


@dataclass
class Admitted:
    """A request within its tenant's limits: the headers its answer carries, and where its tokens go."""

    headers: dict[str, str]
    spend: Callable[[int], None]


class RateLimiter:
    """Checks each chat request against its tenant's limits (its own, or `default`)."""

    def __init__(self, buckets: LocalBuckets | RedisBuckets, default: Limits) -> None:
        self.buckets = buckets
        self.default = default
        self._charges: set[asyncio.Task] = set()  # spends under way (a task needs a reference to finish)
        self._last_error_log = 0.0

    def _failed(self, what: str) -> None:
        ERRORS.inc()
        now = time.monotonic()
        if now - self._last_error_log > 10:  # one line per 10 s, not one per request, while Redis is down
            self._last_error_log = now
            log.warning("rate limits: %s failed; admitting requests unchecked", what, exc_info=True)

    async def admit(self, tenant: str, own: Limits, name: str) -> Admitted | None:
        """Takes one request from `tenant`'s bucket, or raises the 429 that refuses it; None if the tenant
        has no limit (or the bucket store is down). `name` is for the message."""
        limits = own.over(self.default)
        rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
        if not rpm and not tpm:
            return None
        try:
            levels = await self.buckets.take(tenant, limits)
        except Exception:  # noqa: BLE001 -- whatever the store's client raises, the request goes on
            self._failed("a check")
            return None
        headers = {}
        if rpm:
            headers |= _headers("requests", rpm, levels.requests)
        if tpm:
            headers |= _headers("tokens", tpm, levels.tokens)
        if not levels.taken:
            short = [(kind, limit, level) for kind, limit, level in
                     (("requests", rpm, levels.requests), ("tokens", tpm, levels.tokens))
                     if level is not None and level < 1]
            wait_s = max((1 - level) * MINUTE_S / limit for _, limit, level in short)
            kind, limit, _ = short[0]
            RATE_LIMITED.labels(kind).inc()
            raise ApiError(429, f"Rate limit reached for {kind} per minute on '{name}': limit {limit:,}. "
                                f"Please try again in {duration(wait_s)}.", kind, code="rate_limit_exceeded",
                           headers={**headers, "Retry-After": str(math.ceil(wait_s)),
                                    "retry-after-ms": str(math.ceil(wait_s * 1000))})

        def spend(tokens: int) -> None:
            if not tpm or tokens <= 0:
                return
            if isinstance(self.buckets, LocalBuckets):
                self.buckets.charge(tenant, tpm, tokens)  # at once: no task for what needs no wait
            else:
                task = asyncio.get_running_loop().create_task(self._spend(tenant, tpm, tokens))
                self._charges.add(task)
                task.add_done_callback(self._charges.discard)

        return Admitted(headers, spend)

    async def _spend(self, tenant: str, tokens_per_minute: int, tokens: int) -> None:
        try:
            await self.buckets.spend(tenant, tokens_per_minute, tokens)
        except Exception:  # noqa: BLE001
            self._failed("charging tokens")

    async def settled(self) -> None:
        """Returns once the token charges under way have reached the store."""
        await asyncio.gather(*self._charges, return_exceptions=True)

    async def close(self) -> None:
        await self.settled()
        await self.buckets.close()
