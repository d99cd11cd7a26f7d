"""What a tenant's rate limits cost the gateway per chat request: the check before it and the token charge
after it (services/gateway/rate_limits.py), with no limit set, with buckets in the gateway, and with buckets
shared in Redis, in the same process.

  sequential   one request at a time: the latency a request pays (with Redis, one round trip each way)
  concurrent   --concurrency requests at once, as a busy gateway has them: the event loop's cost per request

Each case runs interleaved with the others, --repeats times, and the best of each is kept (the least disturbed
by a shared machine). Redis is the one at --redis-url (the machine's, by default). The last stdout line is a
JSON object.

    .venv/bin/python benchmarks/rate_limits.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignloop.credentials import Limits  # noqa: E402
from services.gateway.rate_limits import LocalBuckets, RateLimiter, RedisBuckets  # noqa: E402

# High enough never to refuse: the benchmark measures the bookkeeping, not the refusals.
LIMITS = Limits(requests_per_minute=10**9, tokens_per_minute=10**12)
TENANTS = 100


def limiter(kind: str, redis_url: str) -> RateLimiter:
    if kind == "off":
        return RateLimiter(LocalBuckets(), Limits(0, 0))
    if kind == "local":
        return RateLimiter(LocalBuckets(), LIMITS)
    return RateLimiter(RedisBuckets(redis_url, prefix=f"alignloop-bench:{uuid.uuid4().hex}:"), LIMITS)


async def one_request(limits: RateLimiter, tenant: str) -> None:
    admitted = await limits.admit(tenant, Limits(), "bench")
    if admitted is not None:
        admitted.spend(300)  # a typical chat's prompt and completion


async def per_request_us(limits: RateLimiter, requests: int, concurrency: int) -> float:
    tenants = [f"tenant-{i}" for i in range(TENANTS)]

    async def worker(offset: int) -> None:
        for i in range(offset, requests, concurrency):
            await one_request(limits, tenants[i % TENANTS])

    started = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    await limits.settled()
    return (time.perf_counter() - started) / requests * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/15")
    args = parser.parse_args()

    kinds = ("off", "local", "redis")
    limiters = {kind: limiter(kind, args.redis_url) for kind in kinds}
    for limits in limiters.values():  # connect, load the scripts, warm the buckets
        await per_request_us(limits, 200, 8)
    best: dict[tuple[str, str], float] = {}
    for _ in range(args.repeats):
        for mode, concurrency in (("sequential", 1), ("concurrent", args.concurrency)):
            for kind in kinds:
                us = await per_request_us(limiters[kind], args.requests, concurrency)
                best[mode, kind] = min(us, best.get((mode, kind), float("inf")))
    for limits in limiters.values():
        await limits.close()

    print(f"µs per chat request for its rate-limit check and token charge (best of {args.repeats}; "
          f"{args.requests} requests over {TENANTS} tenants)")
    print(f"{'':12} {'off':>8} {'local':>8} {'redis':>8}")
    for mode in ("sequential", "concurrent"):
        print(f"{mode:12} " + " ".join(f"{best[mode, kind]:8.1f}" for kind in kinds))
    print(json.dumps({f"{mode}_{kind}_us": round(best[mode, kind], 2) for mode in ("sequential", "concurrent")
                      for kind in kinds}))


if __name__ == "__main__":
    asyncio.run(main())
