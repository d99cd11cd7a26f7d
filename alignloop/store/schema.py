"""The feedback store's tables: the contract between the feedback service (writer) and the pipelines (readers).

Changes go through a migration in `alignloop/store/migrations/versions/`; never edit a released migration.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Integer, LargeBinary, String, Text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# JSONB on PostgreSQL (indexable, compact), plain JSON text elsewhere.
Json = JSON().with_variant(JSONB(), "postgresql")


class Base(DeclarativeBase):
    pass


class Completion(Base):
    """One served choice, materialised from `alignloop.completions.v1`."""

    __tablename__ = "completions"

    completion_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    response_id: Mapped[str] = mapped_column(String(64), index=True)
    request_id: Mapped[str | None] = mapped_column(String(128), index=True)  # X-Request-Id; NULL before 0004
    choice_index: Mapped[int] = mapped_column(Integer)
    api_key_hash: Mapped[str] = mapped_column(String(64), index=True)
    prompt_hash: Mapped[str] = mapped_column(String(64), index=True)
    messages: Mapped[list] = mapped_column(Json)
    response_text: Mapped[str] = mapped_column(Text)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    cached_tokens: Mapped[int | None] = mapped_column(Integer)  # prefix-cache hits; NULL before 0007
    completion_tokens: Mapped[int] = mapped_column(Integer)
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(32))
    sampling: Mapped[dict] = mapped_column(Json)
    stream: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    finished_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    ingested_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Feedback(Base):
    """One accepted piece of feedback, materialised from `alignloop.feedback.v1`.

    No foreign key to `completions`: feedback may be consumed before its completion record, and must be kept.
    """

    __tablename__ = "feedback"

    feedback_id: Mapped[str] = mapped_column(String(64), primary_key=True)  # the unique key redelivery hits
    client_feedback_id: Mapped[str | None] = mapped_column(String(255))
    request_id: Mapped[str | None] = mapped_column(String(128), index=True)  # X-Request-Id; NULL before 0005
    request_hash: Mapped[str] = mapped_column(String(64))
    api_key_hash: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(16), index=True)
    # The completion the feedback is about (the best one, for rankings); all of them in `completion_ids`.
    completion_id: Mapped[str] = mapped_column(String(64), index=True)
    completion_ids: Mapped[list] = mapped_column(Json)
    thumbs_up: Mapped[bool | None] = mapped_column(Boolean)
    rating: Mapped[int | None] = mapped_column(Integer)
    preferred_completion_id: Mapped[str | None] = mapped_column(String(64))
    comment: Mapped[str | None] = mapped_column(Text)
    correction: Mapped[str | None] = mapped_column(Text)
    fails_instruction: Mapped[bool] = mapped_column(Boolean, default=False)
    hallucination: Mapped[bool] = mapped_column(Boolean, default=False)
    inappropriate: Mapped[bool] = mapped_column(Boolean, default=False)
    prompt_hash: Mapped[str] = mapped_column(String(64), index=True)
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(32), index=True)  # of `completion_id`
    model_versions: Mapped[list] = mapped_column(Json)
    day: Mapped[str] = mapped_column(String(10), index=True)  # UTC date of created_at, for analytics
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)  # retention; since 0006
    accepted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    ingested_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # Where it came from: with the unique key, enough to audit exactly-once.
    kafka_partition: Mapped[int] = mapped_column(Integer)
    kafka_offset: Mapped[int] = mapped_column(BigInteger)


class DeadLetter(Base):
    """A record that could not be parsed. Kept, not dropped, so nothing acknowledged disappears silently."""

    __tablename__ = "dead_letters"

    topic: Mapped[str] = mapped_column(String(255), primary_key=True)
    kafka_partition: Mapped[int] = mapped_column(Integer, primary_key=True)
    kafka_offset: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    key: Mapped[bytes | None] = mapped_column(LargeBinary)
    value: Mapped[bytes | None] = mapped_column(LargeBinary)
    error: Mapped[str] = mapped_column(Text)
    ingested_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class PipelineRun(Base):
    """One retraining run of the pipeline runner (services/pipeline), its steps as a JSON list."""

    __tablename__ = "pipeline_runs"

    run_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), index=True)  # queued | running | succeeded | failed | cancelled
    # True while queued or running, NULL after: the unique constraint lets at most one run be active, whichever
    # process tries to start a second (NULLs never collide).
    active: Mapped[bool | None] = mapped_column(Boolean, unique=True)
    trigger: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(Text, default="")
    requested_by: Mapped[str] = mapped_column(String(64), default="")
    config: Mapped[dict] = mapped_column(Json)
    steps: Mapped[list] = mapped_column(Json)
    mlflow_run_id: Mapped[str] = mapped_column(String(64), default="")
    error: Mapped[str] = mapped_column(Text, default="")
    outcome: Mapped[str] = mapped_column(Text, default="")
    promoted_policy_version: Mapped[str] = mapped_column(String(32), default="")
    promoted_reward_version: Mapped[str] = mapped_column(String(32), default="")
    # When its snapshot read the store: feedback ingested later counts as new for the next run's trigger.
    snapshot_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


__all__ = ["Base", "Completion", "Feedback", "DeadLetter", "PipelineRun"]
