"""Admission control for chat requests: a cap on what one gateway holds in flight, in all and per key.

Past the engine's batch (max_num_seqs), more requests only wait in vLLM's queue, and every one of them waits
longer; a client that gets an early 429/503 with Retry-After can back off or try another replica instead (the
`openai` SDK retries both by itself). The per-key cap keeps one application from filling the engine's queue
in front of every other tenant. Both are per gateway process: N replicas admit N times as much.
"""

from __future__ import annotations

from collections import Counter as Tally

from prometheus_client import Counter, Gauge

from services.gateway.errors import ApiError

IN_FLIGHT = Gauge("alignloop_gateway_chat_in_flight", "Chat requests this gateway holds, streams until their end.")
REFUSED = Counter("alignloop_gateway_chat_refused_total", "Chat requests refused by admission control, by cap.",
                  ["cap"])
RETRY_AFTER_S = 1
_ADMITTED = "admitted_key_hash"


class Admission:
    """Counts chat requests in flight. `enter` admits one or refuses it past a cap (0: no cap); the request is
    released by ReleaseAdmitted when its ASGI call ends, which covers a finished stream, a client gone mid-way
    and an error alike (a stream's own generator may never start, so it cannot be what releases)."""

    def __init__(self, max_in_flight: int = 0, max_in_flight_per_key: int = 0) -> None:
        self.max_in_flight = max_in_flight
        self.max_in_flight_per_key = max_in_flight_per_key
        self.total = 0
        self.by_key: Tally[str] = Tally()

    def enter(self, scope: dict, key_hash: str) -> None:
        """Admits the request of `scope`, made with `key_hash`, or raises the ApiError (with Retry-After) that
        refuses it."""
        if self.max_in_flight and self.total >= self.max_in_flight:
            REFUSED.labels("gateway").inc()
            raise ApiError(503, f"This gateway is at its limit of {self.max_in_flight} chat requests in flight; "
                                "retry shortly.", "server_overloaded", code="server_overloaded",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        if self.max_in_flight_per_key and self.by_key[key_hash] >= self.max_in_flight_per_key:
            REFUSED.labels("key").inc()
            raise ApiError(429, f"This API key has {self.max_in_flight_per_key} chat requests in flight, its limit "
                                "on this gateway; retry once one has finished.", "rate_limit_error",
                           code="too_many_concurrent_requests", headers={"Retry-After": str(RETRY_AFTER_S)})
        self.total += 1
        self.by_key[key_hash] += 1
        IN_FLIGHT.inc()
        scope.setdefault("state", {})[_ADMITTED] = key_hash

    def leave(self, key_hash: str) -> None:
        self.total -= 1
        self.by_key[key_hash] -= 1
        if not self.by_key[key_hash]:
            del self.by_key[key_hash]  # keys come and go: keep only those with something in flight
        IN_FLIGHT.dec()


class ReleaseAdmitted:
    """Pure ASGI middleware: releases the request Admission admitted once its whole response has been sent, or
    has failed to be."""

    def __init__(self, app, admission: Admission) -> None:
        self.app = app
        self.admission = admission

    async def __call__(self, scope, receive, send) -> None:
        try:
            await self.app(scope, receive, send)
        finally:
            key_hash = scope.get("state", {}).pop(_ADMITTED, None)
            if key_hash is not None:
                self.admission.leave(key_hash)
