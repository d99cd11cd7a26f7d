"""gRPC client channels that retry what a restarting or rolling server refuses.

A server that is stopping (SIGTERM, a rolling update, a restart) refuses new calls with UNAVAILABLE, and a
connection to a pod that is gone fails the same way; gRPC's own retry policy sends such a call again on a new
connection, which the Service gives to a live replica. Only calls that are safe to repeat are retried: those
that change nothing, and feedback submissions, which carry their feedback id so the store keeps one copy.
A stream is retried only before its first message, as gRPC does for every streaming call.
"""

from __future__ import annotations

import json

import grpc

# Service -> the methods safe to repeat; None: every method of the service.
IDEMPOTENT_METHODS: dict[str, tuple[str, ...] | None] = {
    "alignloop.v1.PolicyService": None,
    "alignloop.v1.RewardService": None,
    "alignloop.v1.FeedbackService": None,
    "alignloop.v1.PipelineService": ("GetRun", "ListRuns", "Health", "ListModelVersions"),
}

RETRY_POLICY = {
    # 4 retries at jittered backoffs of up to 0.1, 0.2, 0.4 and 0.8 s: a rolling update's hand-over fits in
    # that, a service that stays down is reported within about 1.5 s.
    "maxAttempts": 5,
    "initialBackoff": "0.1s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}


def service_config() -> str:
    """The channel's service config (JSON): the retry policy on every idempotent method, and retry
    throttling, so that a backend that is down does not get every call several times over."""
    names = []
    for service, methods in IDEMPOTENT_METHODS.items():
        names += [{"service": service}] if methods is None else [{"service": service, "method": m} for m in methods]
    return json.dumps({
        "methodConfig": [{"name": names, "retryPolicy": RETRY_POLICY}],
        # Retries stop while more than half of the recent calls failed (gRPC's token bucket: 10 tokens, each
        # failure costs 1, each success gives 0.1 back).
        "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
    })


def channel_options(*extra: tuple[str, object]) -> list[tuple[str, object]]:
    return [("grpc.service_config", service_config()), ("grpc.enable_retries", 1), *extra]


def retrying_channel(target: str, *extra: tuple[str, object]) -> grpc.aio.Channel:
    """An asyncio channel to `target` that retries the idempotent methods on UNAVAILABLE."""
    return grpc.aio.insecure_channel(target, options=channel_options(*extra))
