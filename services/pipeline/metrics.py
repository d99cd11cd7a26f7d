"""The pipeline runner's Prometheus metrics, served on ALIGNLOOP_PIPELINE_METRICS_PORT at /metrics."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

RUNS_STARTED = Counter("alignloop_pipeline_runs_started_total", "Runs queued, by trigger.", ["trigger"])
RUNS_FINISHED = Counter("alignloop_pipeline_runs_finished_total", "Runs ended, by status.", ["status"])
RUN_SECONDS = Histogram("alignloop_pipeline_run_seconds", "Whole runs, start to end.",
                        buckets=(10, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 43200))
STEP_SECONDS = Histogram("alignloop_pipeline_step_seconds", "Steps, by name.", ["step"],
                         buckets=(0.1, 1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200))
