"""The pipeline runner: executes runs one at a time, step by step, each step a worker process launched through
the launcher, and records everything in the store and in MLflow (one parent run per pipeline run, a child run
per step with the step's log).

Nothing moves a champion before the `promote` step: the RM is registered and judged with `--no-promote`, PPO
scores with that candidate RM in-process, the policy gate judges the PPO result, and only then are both
aliases moved. A step that fails (or a cancel) before `promote` therefore leaves every champion as it was.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import time
from pathlib import Path

from alignloop import progress
from alignloop.config import REPO_ROOT, Settings
from alignloop.store.schema import PipelineRun
from alignloop.supervisor import stop_groups
from services.pipeline import config as run_config
from services.pipeline import metrics
from services.pipeline.launcher import LocalLauncher, last_json_line, tail
from services.pipeline.runs import RunInProgress, RunStore, Step, now, steps_of, timestamp
from services.pipeline.steps import STEPS, Cancelled, Context, StepFailed

log = logging.getLogger("alignloop.pipeline")
EXPERIMENT = "alignloop-pipeline"


class NotCancellable(Exception):
    pass


class Runner:
    def __init__(self, settings: Settings, store: RunStore, launcher=None, *, tracking: bool = True) -> None:
        self.settings = settings
        self.store = store
        self.launcher = launcher or LocalLauncher(settings.job_omp_wait_policy)
        self.tracking = tracking
        self._wake = threading.Event()
        self.promoting: set[str] = set()  # runs past the point of no return (the promote step has begun)
        # Held while aliases move (a run's promote step, an operator's promote, rollback or canary change).
        self.registry_lock = threading.Lock()
        self.stopping = threading.Event()  # set by `stop`: the run in progress is cancelled, `serve` returns

    # ---- API (called from the gRPC server's threads) -------------------------------------------------------
    def start(self, *, trigger: str, reason: str = "", config_json: str = "", requested_by: str = "") -> PipelineRun:
        """Queues a run. ConfigError for bad overrides, RunInProgress when one is active."""
        cfg = run_config.resolve(self.settings.pipeline_defaults, config_json)
        run = self.store.create(trigger=trigger, reason=reason[:2000], requested_by=requested_by,
                                config=cfg.model_dump())
        metrics.RUNS_STARTED.labels(trigger).inc()
        self._wake.set()
        return run

    def cancel(self, run_id: str) -> PipelineRun:
        run = self.store.get(run_id)
        if run is None:
            raise LookupError(run_id)
        if run.status not in ("queued", "running"):
            raise NotCancellable(f"run {run_id} has already {run.status}")
        if run_id in self.promoting:
            raise NotCancellable(f"run {run_id} is promoting; roll back afterwards with `alignloop models "
                                 "rollback`")
        if run.status == "queued":
            self.store.update(run_id, status="cancelled", error="cancelled before it started", finished_at=now())
        else:
            self.store.request_cancel(run_id)
        return self.store.get(run_id)

    # ---- the worker loop -------------------------------------------------------------------------------
    def recover(self) -> None:
        """A run left active by a runner that died: its step processes are killed, the run marked failed."""
        run = self.store.active()
        if run is None:
            return
        for step in steps_of(run):
            if step.status == "running" and step.pid:
                stop_groups([step.pid], timeout_s=5)
        self.store.update(run.run_id, status="failed", finished_at=now(),
                          error="the pipeline runner restarted while this run was in progress")
        log.warning("run %s was left %s by a previous runner: marked failed", run.run_id, run.status)

    def stop(self) -> None:
        """Asks `serve` to return; a run in progress is cancelled (its step's processes are killed)."""
        self.stopping.set()
        self._wake.set()

    def serve(self) -> None:
        """Executes queued runs until `stop`; checks the schedule in between."""
        while not self.stopping.is_set():
            run = self.store.active()
            if run is not None and run.status == "queued":
                self.execute(run)
                continue
            self.check_schedule()
            self._wake.wait(self.settings.pipeline_check_s)
            self._wake.clear()

    def check_schedule(self) -> PipelineRun | None:
        """Starts a run when the interval has passed or enough new feedback has arrived."""
        s = self.settings
        if s.pipeline_interval_s <= 0 and s.pipeline_min_new_feedback <= 0:
            return None
        if self.store.active() is not None:
            return None
        trigger = None
        last = self.store.latest()
        if s.pipeline_interval_s > 0 and (last is None or
                                          time.time() - timestamp(last.created_at) >= s.pipeline_interval_s):
            trigger, reason = "schedule", f"every {s.pipeline_interval_s:g} s"
        if trigger is None and s.pipeline_min_new_feedback > 0:
            fresh = self.store.feedback_since(self.store.last_snapshot_at())
            if fresh >= s.pipeline_min_new_feedback:
                trigger, reason = "feedback", f"{fresh} new feedback events (threshold {s.pipeline_min_new_feedback})"
        if trigger is None:
            return None
        try:
            return self.start(trigger=trigger, reason=reason)
        except (RunInProgress, run_config.ConfigError) as exc:  # an operator's run won the race, or bad defaults
            log.warning("scheduled run not started: %s", exc)
            return None

    def next_scheduled_in(self) -> float:
        if self.settings.pipeline_interval_s <= 0:
            return -1.0
        last = self.store.latest()
        if last is None:
            return 0.0
        return max(0.0, timestamp(last.created_at) + self.settings.pipeline_interval_s - time.time())

    # ---- one run -----------------------------------------------------------------------------------------
    def execute(self, run: PipelineRun) -> None:
        """Runs every step of `run` (a queued run) and records how it ended."""
        cfg = run_config.RunConfig.model_validate(run.config)
        folder = self.settings.home / "pipeline" / run.run_id
        folder.mkdir(parents=True, exist_ok=True)
        steps = {st.name: st for st in steps_of(run)}
        ctx = Context(run.run_id, cfg, folder, steps)
        tracker = Tracker(self.settings.tracking_uri) if self.tracking else None
        self.store.update(run.run_id, status="running", started_at=now())
        started = time.monotonic()
        status, error, outcome = "succeeded", "", ""
        try:
            if tracker:
                parent = tracker.start_parent(run, cfg)
                self.store.update(run.run_id, mlflow_run_id=parent)
            for name, fn in STEPS:
                step = steps[name]
                if ctx.stop_reason is not None:
                    step.status, step.detail = "skipped", ctx.stop_reason
                    continue
                self._check_cancel(ctx)
                self._run_step(ctx, step, fn, tracker)
            outcome = ctx.outputs.get("outcome") or (f"not promoted: {ctx.stop_reason}" if ctx.stop_reason else "")
        except Cancelled as exc:
            status, error = "cancelled", str(exc) or "cancelled by an operator"
        except StepFailed as exc:
            status, error = "failed", str(exc)
        except Exception as exc:  # a bug or an unreachable dependency: the run fails, the runner lives on
            log.exception("run %s failed", run.run_id)
            status, error = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            self.promoting.discard(run.run_id)
            for step in steps.values():
                if step.status in ("pending", "running"):
                    step.status = "cancelled" if status == "cancelled" else "skipped"
                    step.finished_at = step.finished_at or (time.time() if step.started_at else 0.0)
            self.store.update(run.run_id, steps=[st.as_json() for st in steps.values()], status=status,
                              error=error[:4000], outcome=outcome, finished_at=now(),
                              promoted_policy_version=ctx.outputs.get("promoted_policy", ""),
                              promoted_reward_version=ctx.outputs.get("promoted_reward", ""))
            metrics.RUNS_FINISHED.labels(status).inc()
            metrics.RUN_SECONDS.observe(time.monotonic() - started)
            if tracker:
                tracker.end_parent(status, outcome or error)
        log.info("run %s %s %s", run.run_id, status, outcome or error)

    def _check_cancel(self, ctx: Context) -> None:
        if self.stopping.is_set():
            raise Cancelled("the pipeline runner is shutting down")
        if self.store.cancel_requested(ctx.run_id):
            raise Cancelled("cancelled by an operator")

    def _run_step(self, ctx: Context, step: Step, fn, tracker: Tracker | None) -> None:
        step.status, step.started_at = "running", time.time()
        step.log_path = str(ctx.folder / f"{step.name}.log")
        self.store.save_steps(ctx.run_id, list(ctx.steps.values()))
        log.info("run %s: %s started (its log: %s)", ctx.run_id, step.name, step.log_path)
        child = tracker.start_step(step.name) if tracker else None
        step.mlflow_run_id = child or ""
        ok = False
        try:
            fn(self, ctx, step)
            if step.status == "running":
                step.status = "succeeded"
            ok = True
        except StepFailed as exc:
            step.status, step.detail = "failed", str(exc)[:2000]
            raise StepFailed(f"{step.name}: {exc}") from None
        except Cancelled:
            step.status = "cancelled"
            raise
        finally:
            step.finished_at = time.time()
            step.pid = 0
            if step.status == "succeeded":
                step.progress = 1.0
            metrics.STEP_SECONDS.labels(step.name).observe(step.finished_at - step.started_at)
            log.info("run %s: %s %s after %.1f s%s", ctx.run_id, step.name, step.status,
                     step.finished_at - step.started_at, f": {step.detail}" if step.detail else "")
            self.store.save_steps(ctx.run_id, list(ctx.steps.values()))
            if tracker and child:
                tracker.end_step(child, step, ok)

    # ---- launching a step's command ------------------------------------------------------------------------
    def run_command(self, ctx: Context, step: Step, args: list[str], *, ok_codes: tuple[int, ...] = (0,),
                    launcher_argv: list[str] | None = None) -> tuple[int, dict]:
        """Runs `alignloop ARGS` (under `launcher_argv`, e.g. torchrun, when given) as the step's process,
        following its progress; returns (exit status, its JSON summary). A status outside `ok_codes` fails
        the step with the tail of its log; a cancel kills the process group."""
        progress_file = ctx.folder / f"{step.name}.progress.json"
        env = {**os.environ, **self.settings.to_env(), progress.ENV: str(progress_file),
               "PYTHONUNBUFFERED": "1"}
        argv = (launcher_argv or [sys.executable, "-m", "alignloop.cli"]) + args
        handle = self.launcher.launch(argv, env=env, log_path=Path(step.log_path), cwd=REPO_ROOT)
        step.pid = handle.pid
        self.store.save_steps(ctx.run_id, list(ctx.steps.values()))
        deadline = time.monotonic() + ctx.config.step_timeout_s
        last_save = 0.0
        while (code := handle.poll()) is None:
            try:
                self._check_cancel(ctx)
            except Cancelled:
                handle.kill()
                raise
            if time.monotonic() > deadline:
                handle.kill()
                raise StepFailed(f"still running after step_timeout_s={ctx.config.step_timeout_s:g}; killed")
            report = progress.read(progress_file)
            if report and report.get("total") and time.monotonic() - last_save > 2.0:
                step.progress = min(1.0, report["done"] / report["total"])
                step.detail = report.get("detail") or f"{report['done']}/{report['total']}"
                self.store.save_steps(ctx.run_id, list(ctx.steps.values()))
                last_save = time.monotonic()
            time.sleep(0.5)
        summary = last_json_line(Path(step.log_path)) or {}
        if code not in ok_codes:
            raise StepFailed(f"exit status {code}: {tail(Path(step.log_path))} (log: {step.log_path})")
        step.summary = summary
        return code, summary


# ---- MLflow ----------------------------------------------------------------------------------------------
class Tracker:
    """The pipeline run as a parent MLflow run, each step a child with its log attached."""

    def __init__(self, uri: str) -> None:
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.parent: str | None = None
        self.experiment_id: str | None = None

    def start_parent(self, run: PipelineRun, cfg: run_config.RunConfig) -> str:
        from pipelines.models_init import ensure_experiment

        self.experiment_id = ensure_experiment(self.client, EXPERIMENT)
        created = self.client.create_run(self.experiment_id, run_name=run.run_id,
                                         tags={"alignloop.kind": "pipeline", "alignloop.trigger": run.trigger,
                                               "alignloop.reason": run.reason[:5000],
                                               "alignloop.pipeline_run_id": run.run_id})
        self.parent = created.info.run_id
        self.client.log_param(self.parent, "config", json.dumps(cfg.model_dump())[:6000])
        return self.parent

    def start_step(self, name: str) -> str:
        child = self.client.create_run(self.experiment_id, run_name=name,
                                       tags={"mlflow.parentRunId": self.parent, "alignloop.step": name})
        return child.info.run_id

    def end_step(self, child: str, step: Step, ok: bool) -> None:
        """The step's figures (numbers of its summary) and verdict in one batch, then its log."""
        from mlflow.entities import Metric, RunTag

        summary = step.summary or {}
        stamp = int(time.time() * 1000)
        metrics = [Metric(k, float(v), stamp, 0) for k, v in summary.items()
                   if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)]
        tags = {"alignloop.step_status": step.status, "alignloop.detail": step.detail[:5000]}
        tags |= {f"alignloop.step_{k}": str(summary[k]) for k in ("run_id", "model_version", "candidate_version") if summary.get(k)}
        self.client.log_batch(child, metrics=metrics[:100], tags=[RunTag(k, v) for k, v in tags.items()])
        if step.log_path and Path(step.log_path).exists():
            self.client.log_artifact(child, step.log_path)
        self.client.set_terminated(child, "FINISHED" if ok else
                                   ("KILLED" if step.status == "cancelled" else "FAILED"))

    def end_parent(self, status: str, outcome: str) -> None:
        if self.parent is None:
            return
        self.client.set_tag(self.parent, "alignloop.outcome", outcome[:5000])
        self.client.set_terminated(self.parent, {"succeeded": "FINISHED", "cancelled": "KILLED"}.get(status,
                                                                                                    "FAILED"))
