"""Per-tenant rate limits: the token-bucket arithmetic, in the process and in a real Redis (the machine's, as
on CI), the 429 a client gets, and what happens when Redis is down."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from alignloop.credentials import Limits
from services.gateway.errors import ApiError
from services.gateway.rate_limits import ERRORS, LocalBuckets, RateLimiter, RedisBuckets, duration, refilled
from tests.conftest import REDIS_URL, free_port


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def redis_buckets() -> RedisBuckets:
    # A prefix of its own: runs and tests never share a bucket.
    return RedisBuckets(REDIS_URL, prefix=f"alignloop-test:{uuid.uuid4().hex}:")


def limiter(backend: str, rpm: int = 0, tpm: int = 0) -> RateLimiter:
    return RateLimiter(LocalBuckets() if backend == "local" else redis_buckets(), Limits(rpm, tpm))


BACKENDS = pytest.mark.parametrize("backend", ["local", "redis"])


@BACKENDS
def test_a_burst_of_a_minutes_requests_then_a_429_that_says_when(backend):
    async def scenario():
        limits = limiter(backend, rpm=6)
        tenant = uuid.uuid4().hex
        try:
            remaining = []
            for _ in range(6):
                admitted = await limits.admit(tenant, Limits(), "app-a")
                remaining.append(admitted.headers["x-ratelimit-remaining-requests"])
            assert remaining == ["5", "4", "3", "2", "1", "0"]
            assert admitted.headers["x-ratelimit-limit-requests"] == "6"
            with pytest.raises(ApiError) as e:
                await limits.admit(tenant, Limits(), "app-a")
            err = e.value
            assert err.status_code == 429 and err.code == "rate_limit_exceeded" and err.type == "requests"
            assert "requests per minute on 'app-a'" in err.message
            # One request comes back every 10 s; the seventh came a moment after the sixth.
            assert 9_000 < int(err.headers["retry-after-ms"]) <= 10_000
            assert err.headers["Retry-After"] == "10"
            assert err.headers["x-ratelimit-remaining-requests"] == "0"
            # Another tenant has a bucket of its own.
            assert await limits.admit(uuid.uuid4().hex, Limits(), "app-b") is not None
        finally:
            await limits.close()

    asyncio.run(scenario())


@BACKENDS
def test_tokens_are_charged_after_the_answer_and_a_tenant_in_debt_waits(backend):
    async def scenario():
        limits = limiter(backend, tpm=600)  # 10 tokens a second
        tenant = uuid.uuid4().hex
        try:
            admitted = await limits.admit(tenant, Limits(), "app-a")
            assert admitted.headers["x-ratelimit-remaining-tokens"] == "600"
            assert "x-ratelimit-limit-requests" not in admitted.headers  # that limit is off
            admitted.spend(650)  # more than the bucket held: it is 50 in debt
            await limits.settled()
            with pytest.raises(ApiError) as e:
                await limits.admit(tenant, Limits(), "app-a")
            assert e.value.type == "tokens"
            assert "tokens per minute" in e.value.message
            # From -50 to 1: 51 tokens at 10 a second.
            assert 5_000 < int(e.value.headers["retry-after-ms"]) <= 5_100
        finally:
            await limits.close()

    asyncio.run(scenario())


@BACKENDS
def test_a_tenants_own_limits_replace_the_default_and_zero_means_none(backend):
    async def scenario():
        limits = limiter(backend, rpm=1)
        try:
            unlimited, strict, default = (uuid.uuid4().hex for _ in range(3))
            for _ in range(5):
                assert await limits.admit(unlimited, Limits(requests_per_minute=0), "unlimited") is None
            await limits.admit(strict, Limits(requests_per_minute=2), "strict")
            await limits.admit(strict, Limits(requests_per_minute=2), "strict")
            with pytest.raises(ApiError):
                await limits.admit(strict, Limits(requests_per_minute=2), "strict")
            await limits.admit(default, Limits(), "default")
            with pytest.raises(ApiError):
                await limits.admit(default, Limits(), "default")
        finally:
            await limits.close()

    asyncio.run(scenario())


def test_no_limit_anywhere_costs_nothing():
    async def scenario():
        buckets = LocalBuckets()
        assert await RateLimiter(buckets, Limits(0, 0)).admit("t", Limits(), "app") is None
        assert buckets._buckets == {}

    asyncio.run(scenario())


def test_buckets_refill_continuously_and_hold_at_most_a_minutes_worth():
    async def scenario():
        clock = Clock()
        limits = RateLimiter(LocalBuckets(clock), Limits(requests_per_minute=60))
        for _ in range(60):
            await limits.admit("t", Limits(), "app")
        with pytest.raises(ApiError):
            await limits.admit("t", Limits(), "app")
        clock.now += 2.5  # one a second: two and a half back
        await limits.admit("t", Limits(), "app")
        await limits.admit("t", Limits(), "app")
        with pytest.raises(ApiError):
            await limits.admit("t", Limits(), "app")
        clock.now += 3600  # idle for an hour: a minute's worth, no more
        for _ in range(60):
            await limits.admit("t", Limits(), "app")
        with pytest.raises(ApiError):
            await limits.admit("t", Limits(), "app")

    asyncio.run(scenario())
    assert refilled(-30, 30, 60) == 0 and refilled(59, 100, 60) == 60


def test_replicas_sharing_redis_share_one_bucket():
    """Two gateways, one Redis: a tenant gets its limit in all, not per replica."""
    async def scenario():
        prefix = f"alignloop-test:{uuid.uuid4().hex}:"
        replicas = [RateLimiter(RedisBuckets(REDIS_URL, prefix=prefix), Limits(requests_per_minute=6))
                    for _ in range(2)]
        try:
            for i in range(6):
                await replicas[i % 2].admit("tenant", Limits(), "app")
            for replica in replicas:
                with pytest.raises(ApiError):
                    await replica.admit("tenant", Limits(), "app")
        finally:
            for replica in replicas:
                await replica.close()

    asyncio.run(scenario())


def test_redis_buckets_expire_once_they_would_be_full_again():
    async def scenario():
        buckets = redis_buckets()
        limits = RateLimiter(buckets, Limits(requests_per_minute=6))
        try:
            await limits.admit("tenant", Limits(), "app")
            requests_key, tokens_key = buckets._keys("tenant")
            # One request back takes 10 s; the key goes a second after that.
            assert 10_000 < await buckets._client.pttl(requests_key) <= 11_000
            assert await buckets._client.exists(tokens_key) == 0  # that limit is off: nothing stored
        finally:
            await limits.close()

    asyncio.run(scenario())


def test_when_redis_is_down_requests_are_admitted_and_counted():
    async def scenario():
        down = RateLimiter(RedisBuckets(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2),
                           Limits(requests_per_minute=1, tokens_per_minute=10))
        before = ERRORS._value.get()
        try:
            for _ in range(3):
                admitted = await down.admit("tenant", Limits(), "app")
                assert admitted is None
            assert ERRORS._value.get() == before + 3
        finally:
            await down.close()

    asyncio.run(scenario())


def test_reset_times_are_written_as_openai_writes_them():
    assert duration(0.02) == "20ms"
    assert duration(1.5) == "1.5s"
    assert duration(360) == "6m0s"
    assert duration(61.4) == "1m1s"


def test_through_the_gateway_answers_carry_the_headers_and_both_paths_spend_their_tokens():
    """Each answer here is 3 prompt tokens and 1 completion token: 4 a request, streamed or not."""
    from tests.unit.test_gateway_admission import APP, CHAT, OTHER, gateway

    async def scenario():
        app, policy, client = gateway(rate_limit_tokens_per_minute=12)
        policy.release.set()
        seen = []
        for stream in (False, True, False):
            answer = await client.post("/v1/chat/completions", json={**CHAT, "stream": stream}, headers=APP)
            assert answer.status_code == 200, answer.text
            seen.append(answer.headers["x-ratelimit-remaining-tokens"])
            assert answer.headers["x-ratelimit-limit-tokens"] == "12"
            await app.state.rate_limits.settled()
        assert seen == ["12", "8", "4"]
        refused = await client.post("/v1/chat/completions", json=CHAT, headers=APP)
        assert refused.status_code == 429
        assert refused.json()["error"]["type"] == "tokens"
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert int(refused.headers["retry-after"]) == 5  # from 0 to 1 token at 0.2 a second
        # The operator key is another tenant, with its own bucket.
        assert (await client.post("/v1/chat/completions", json=CHAT, headers=OTHER)).status_code == 200
        await app.state.rate_limits.close()

    asyncio.run(scenario())
