"""The reward service's Prometheus metrics, served on ALIGNLOOP_REWARD_METRICS_PORT at /metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("alignloop_reward_requests_total", "Score calls, by outcome (ok, invalid, error).",
                   ["outcome"])
ITEMS = Counter("alignloop_reward_items_total", "Items scored.")
BATCH_SIZE = Histogram("alignloop_reward_batch_size", "Items per forward pass, across concurrent calls.",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
FORWARD_SECONDS = Histogram("alignloop_reward_forward_seconds",
                            "One forward pass (tokenize, model, scores back), in the worker thread.",
                            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
REQUEST_SECONDS = Histogram("alignloop_reward_request_seconds", "Score calls, from arrival to answer.",
                            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                                     30))
QUEUED_ITEMS = Gauge("alignloop_reward_queued_items", "Items waiting for a forward pass.")
SERVED_VERSION = Gauge("alignloop_reward_served_version", "The registry version new calls are scored by.",
                       ["model", "alias"])
SWAPS = Counter("alignloop_reward_swaps_total", "New versions swapped in since the start.")
SWAP_FAILURES = Counter("alignloop_reward_swap_failures_total", "New versions that could not be loaded.")
