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

**Health checking.** With `health_checked`, the channel also watches each replica's grpc.health.v1 status
(alignloop/grpc_health.py) and sends calls only to those that report SERVING. A replica that starts to stop
says so at once, so its share moves to the others before it drains, without waiting for DNS or for a refused
call. A server without the health service counts as healthy (gRPC's rule).
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
    # CANCELLED: what a stopping server answers a call no handler took yet (see the module's docstring).
    "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
}

# Every resolved address gets a connection and the calls take them in turn (gRPC's default, pick_first,
# sends every call down the first address that connects).
LOAD_BALANCING = [{"round_robin": {}}]


def service_config(retries: bool = True, health_checked: bool = False) -> str:
    """The channel's service config (JSON): round-robin over the resolved addresses; with `retries`, the
    retry policy on every idempotent method plus retry throttling, so that a backend that is down does not
    get every call several times over; with `health_checked`, only replicas whose server reports SERVING."""
    config: dict = {"loadBalancingConfig": LOAD_BALANCING}
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


def channel_options(*extra: tuple[str, object], retries: bool = True,
                    health_checked: bool = False) -> list[tuple[str, object]]:
    """Options for `grpc.insecure_channel` / `grpc.aio.insecure_channel`: balanced, retrying unless told, and
    health-checked if told (see `service_config`)."""
    return [("grpc.service_config", service_config(retries, health_checked)), ("grpc.enable_retries", int(retries)),
            *extra]


def retrying_channel(target: str, *extra: tuple[str, object], health_checked: bool = False,
                     interceptors=None) -> grpc.aio.Channel:
    """An asyncio channel to every replica behind `target` that retries the idempotent methods when a stopping
    or unreachable replica refuses them."""
    return grpc.aio.insecure_channel(target, options=channel_options(*extra, health_checked=health_checked),
                                     interceptors=interceptors)


def balanced_channel(target: str, *extra: tuple[str, object], health_checked: bool = False,
                     interceptors=None) -> grpc.aio.Channel:
    """An asyncio channel to every replica behind `target`, without retries (the caller has its own fallback)."""
    return grpc.aio.insecure_channel(target, options=channel_options(*extra, retries=False,
                                                                     health_checked=health_checked),
                                     interceptors=interceptors)
