"""The policy service's Prometheus metrics, served on ALIGNLOOP_POLICY_METRICS_PORT at /metrics.

Beside these, the same endpoint carries vLLM's own engine metrics (`vllm:*`: requests running and waiting,
KV-cache usage, time to first token, inter-token latency, tokens, preemptions) while `engine_stats` is on.
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc
from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter(
    "alignloop_policy_requests_total",
    "Generate and GenerateStream calls by outcome: ok, invalid (refused input), unavailable (no model yet), "
    "cancelled (the caller went away; the engine request was aborted), error.",
    ["method", "outcome"],
)
SERVED_VERSION = Gauge("alignloop_policy_served_version", "The registry version new requests are served by.",
                       ["model", "alias"])
SWAPS = Counter("alignloop_policy_swaps_total", "Versions loaded in place since the start (promotions followed).")
SWAP_PAUSE_SECONDS = Histogram("alignloop_policy_swap_pause_seconds",
                               "How long new requests waited while a version was loaded in place.",
                               buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))

_OUTCOMES = {grpc.StatusCode.INVALID_ARGUMENT: "invalid", grpc.StatusCode.UNAVAILABLE: "unavailable"}


@contextlib.contextmanager
def counted(method: str, context: grpc.aio.ServicerContext):
    """Counts one call under REQUESTS by how it ends."""
    outcome = "error"
    try:
        yield
        outcome = "ok"
    except (asyncio.CancelledError, GeneratorExit):  # a stream's caller goes away as either
        outcome = "cancelled"
        raise
    except BaseException:
        code = context.code()
        outcome = _OUTCOMES.get(code, "error") if code is not None else "error"
        raise
    finally:
        REQUESTS.labels(method, outcome).inc()


def serving(model: str, alias: str, version: str) -> None:
    """SERVED_VERSION names `version` alone for this model and alias."""
    SERVED_VERSION.clear()
    SERVED_VERSION.labels(model, alias).set(float(version) if version.isdigit() else 0.0)
