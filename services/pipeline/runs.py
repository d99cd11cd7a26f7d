"""The run history in the store's `pipeline_runs` table: at most one active run (a unique column enforces it
in the database, so two runners, or a schedule and an operator racing, cannot both start one)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Engine, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from alignloop.store import as_utc
from alignloop.store.schema import Feedback, PipelineRun

STEP_NAMES = ("snapshot", "reward_train", "reward_gate", "ppo", "policy_gate", "promote", "serving")
ACTIVE = ("queued", "running")


class RunInProgress(Exception):
    def __init__(self, run_id: str) -> None:
        super().__init__(f"pipeline run {run_id} is already queued or running")
        self.run_id = run_id


@dataclass
class Step:
    """One step's record, kept as JSON in the run's row."""

    name: str
    status: str = "pending"
    started_at: float = 0.0
    finished_at: float = 0.0
    detail: str = ""
    log_path: str = ""
    mlflow_run_id: str = ""
    summary: dict | None = None
    progress: float = 0.0
    pid: int = 0  # the step's process group while it runs (a restarted runner kills what is left)

    def as_json(self) -> dict:
        return dict(self.__dict__)


def now() -> datetime:
    return datetime.now(UTC)


class RunStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create(self, *, trigger: str, reason: str, requested_by: str, config: dict) -> PipelineRun:
        """A queued run; RunInProgress naming the active one if there is one."""
        run = PipelineRun(run_id=f"run-{now():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}", status="queued",
                          active=True, trigger=trigger, reason=reason, requested_by=requested_by, config=config,
                          steps=[Step(n).as_json() for n in STEP_NAMES], mlflow_run_id="", error="", outcome="",
                          promoted_policy_version="", promoted_reward_version="", cancel_requested=False,
                          created_at=now())
        try:
            with Session(self.engine, expire_on_commit=False) as s, s.begin():
                s.add(run)
        except IntegrityError:
            active = self.active()
            raise RunInProgress(active.run_id if active else "?") from None
        return run

    def get(self, run_id: str) -> PipelineRun | None:
        with Session(self.engine, expire_on_commit=False) as s:
            return s.get(PipelineRun, run_id)

    def active(self) -> PipelineRun | None:
        with Session(self.engine, expire_on_commit=False) as s:
            return s.scalars(select(PipelineRun).where(PipelineRun.active.is_(True))).first()

    def latest(self) -> PipelineRun | None:
        runs = self.list(1)
        return runs[0] if runs else None

    def list(self, limit: int) -> list[PipelineRun]:
        with Session(self.engine, expire_on_commit=False) as s:
            return list(s.scalars(select(PipelineRun).order_by(PipelineRun.created_at.desc()).limit(limit)))

    def update(self, run_id: str, **values) -> None:
        if "status" in values and values["status"] not in ACTIVE:
            values["active"] = None
        with Session(self.engine) as s, s.begin():
            s.execute(update(PipelineRun).where(PipelineRun.run_id == run_id).values(**values))

    def save_steps(self, run_id: str, steps: list[Step]) -> None:
        self.update(run_id, steps=[st.as_json() for st in steps])

    def request_cancel(self, run_id: str) -> None:
        self.update(run_id, cancel_requested=True)

    def cancel_requested(self, run_id: str) -> bool:
        with Session(self.engine) as s:
            return bool(s.scalar(select(PipelineRun.cancel_requested).where(PipelineRun.run_id == run_id)))

    def last_snapshot_at(self) -> datetime | None:
        with Session(self.engine) as s:
            latest = s.scalar(select(func.max(PipelineRun.snapshot_at)))
        return as_utc(latest) if latest is not None else None

    def feedback_since(self, since: datetime | None) -> int:
        """Feedback events stored after `since` (all of them when None)."""
        query = select(func.count()).select_from(Feedback)
        if since is not None:
            query = query.where(Feedback.ingested_at > since)
        with Session(self.engine) as s:
            return int(s.scalar(query) or 0)


def steps_of(run: PipelineRun) -> list[Step]:
    return [Step(**st) for st in run.steps]


def timestamp(ts: datetime | None) -> float:
    return as_utc(ts).timestamp() if ts is not None else 0.0
