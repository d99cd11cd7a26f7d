"""gRPC client channels that spread calls over every replica and retry what a stopping one refuses.

**Balancing.** gRPC keeps long-lived HTTP/2 connections, and a Kubernetes Service balances connections, not
calls: a client on a plain channel sends everything to the one replica it first reached. These channels use
gRPC's `round_robin` policy instead: the target's name resolves to every replica (a headless Service in
`deploy/` gives one address per ready pod), the channel connects to each, and calls go to them in turn. A
new replica is found when the channel next resolves the name: when a connection ends, which the servers make
happen every `ALIGNLOOP_GRPC_MAX_CONNECTION_AGE_S` (`alignloop/grpc_serving.py`).

**Retries.** A server that is stopping (SIGTERM, a rolling update, a restart) refuses new calls with
UNAVAILABLE, and a connection to a pod that is gone fails the same way; gRPC's own retry policy sends such a
call again, on another replica or a new connection. A call that reached the stopping server's transport just
before the drain, but no handler yet, is answered CANCELLED instead (gRPC core zombifies it: grpc/grpc#41785),
so that status is retried too. The client's own cancellations never are: gRPC retries only on a status the
server sent. Only calls that are safe to repeat are retried: those
that change nothing, and feedback submissions, which carry their feedback id so the store keeps one copy.
A stream is retried only before its first message, as gRPC does for every streaming call.

**Conversation affinity.** With `affinity`, calls are placed by consistent hashing instead (gRPC's
`ring_hash` policy) on the value of their `alignloop-affinity` header: calls with the same value go to the
same replica for as long as it is healthy, and when replicas come or go only the values that were on them
move. The gateway sets the header from a chat's opening messages, so every turn of a conversation reaches the
replica whose prefix cache holds its history. A call without the header goes to a random replica.

**Health checking.** With `health_checked`, the channel also watches each replica's grpc.health.v1 status
(alignloop/grpc_health.py) and sends calls only to those that report SERVING. A replica that starts to stop
says so at once, so its share moves to the others before it drains, without waiting for DNS or for a refused
call. A server without the health service counts as healthy (gRPC's rule).
"""

from __future__ import annotations

import json
import os

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
    # CANCELLED: what a stopping server answers a call no handler took yet (see the module's docstring).
    "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
}

# Every resolved address gets a connection and the calls take them in turn (gRPC's default, pick_first,
# sends every call down the first address that connects).
LOAD_BALANCING = [{"round_robin": {}}]

# The request header whose value places a call on the hash ring (`affinity`).
AFFINITY_HEADER = "alignloop-affinity"
# 1,024 points per ring (gRPC's default minimum) keep the replicas' shares within a few percent of equal.
AFFINITY_LOAD_BALANCING = [{"ring_hash_experimental": {"requestHashHeader": AFFINITY_HEADER}}]
# grpcio implements ring_hash's request header (gRFC A76) behind this flag; without it, every call on a ring
# hash channel fails ("hash attribute not present"). C-core reads it when it parses a service config.
RING_HASH_HEADER_FLAG = "GRPC_EXPERIMENTAL_RING_HASH_SET_REQUEST_HASH_KEY"


def service_config(retries: bool = True, health_checked: bool = False, affinity: bool = False) -> str:
    """The channel's service config (JSON): round-robin over the resolved addresses (with `affinity`,
    consistent hashing on the `alignloop-affinity` header); with `retries`, the retry policy on every
    idempotent method plus retry throttling, so that a backend that is down does not get every call several
    times over; with `health_checked`, only replicas whose server reports SERVING. `affinity` also sets, for
    this process, the flag grpcio needs to honour the header (RING_HASH_HEADER_FLAG)."""
    if affinity:
        os.environ[RING_HASH_HEADER_FLAG] = "true"
    config: dict = {"loadBalancingConfig": AFFINITY_LOAD_BALANCING if affinity else LOAD_BALANCING}
    if health_checked:
        # "": the server as a whole. Each alignloop server hosts one service, whose readiness this is.
        config["healthCheckConfig"] = {"serviceName": ""}
    if retries:
        names = []
        for service, methods in IDEMPOTENT_METHODS.items():
            names += [{"service": service}] if methods is None else [{"service": service, "method": m}
                                                                     for m in methods]
        config["methodConfig"] = [{"name": names, "retryPolicy": RETRY_POLICY}]
        # Retries stop while more than half of the recent calls failed (gRPC's token bucket: 10 tokens, each
        # failure costs 1, each success gives 0.1 back).
        config["retryThrottling"] = {"maxTokens": 10, "tokenRatio": 0.1}
    return json.dumps(config)


def channel_options(*extra: tuple[str, object], retries: bool = True, health_checked: bool = False,
                    affinity: bool = False) -> list[tuple[str, object]]:
    """Options for `grpc.insecure_channel` / `grpc.aio.insecure_channel`: balanced, retrying unless told, and
    health-checked and placed by affinity if told (see `service_config`)."""
    return [("grpc.service_config", service_config(retries, health_checked, affinity)),
            ("grpc.enable_retries", int(retries)), *extra]


def retrying_channel(target: str, *extra: tuple[str, object], health_checked: bool = False,
                     affinity: bool = False, interceptors=None) -> grpc.aio.Channel:
    """An asyncio channel to every replica behind `target` that retries the idempotent methods when a stopping
    or unreachable replica refuses them."""
    return grpc.aio.insecure_channel(
        target, options=channel_options(*extra, health_checked=health_checked, affinity=affinity),
        interceptors=interceptors)


def balanced_channel(target: str, *extra: tuple[str, object], health_checked: bool = False,
                     affinity: bool = False, interceptors=None) -> grpc.aio.Channel:
    """An asyncio channel to every replica behind `target`, without retries (the caller has its own fallback)."""
    return grpc.aio.insecure_channel(
        target, options=channel_options(*extra, retries=False, health_checked=health_checked, affinity=affinity),
        interceptors=interceptors)
