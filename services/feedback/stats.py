"""Feedback analytics from the store: counts and thumbs per model version and day, and answers served per
version."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, case, func, select

from alignloop.store.schema import Completion, Feedback
from alignloop.v1 import feedback_pb2 as pb


def _count(condition) -> object:
    return func.sum(case((condition, 1), else_=0))


def period_start(days: int) -> datetime | None:
    """Midnight UTC `days - 1` days ago (today counts as one); None for all time."""
    if days <= 0:
        return None
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return today - timedelta(days=days - 1)


def query(engine: Engine, days: int) -> list[pb.StatsRow]:
    """One row per (model name, model version, UTC day), oldest day first; `days` <= 0 means all."""
    f = Feedback
    stmt = (
        select(
            f.model_name, f.model_version, f.day,
            func.count(),
            _count((f.kind == "thumbs") & (f.thumbs_up.is_(True))),
            _count((f.kind == "thumbs") & (f.thumbs_up.is_(False))),
            _count(f.kind == "rating"),
            func.coalesce(func.sum(f.rating), 0),
            _count(f.kind == "ranking"),
            _count(f.kind == "comparison"),
            _count(f.correction.is_not(None)),
            _count(f.fails_instruction | f.hallucination | f.inappropriate),
        )
        .group_by(f.model_name, f.model_version, f.day)
        .order_by(f.day, f.model_name, f.model_version)
    )
    if (since := period_start(days)) is not None:
        stmt = stmt.where(f.day >= since.strftime("%Y-%m-%d"))
    with engine.connect() as conn:
        rows = conn.execute(stmt).all()
    return [
        pb.StatsRow(model_name=r[0], model_version=r[1], day=r[2], total=r[3], thumbs_up=r[4] or 0,
                    thumbs_down=r[5] or 0, ratings=r[6] or 0, rating_sum=float(r[7] or 0), rankings=r[8] or 0,
                    comparisons=r[9] or 0, corrections=r[10] or 0, flagged=r[11] or 0)
        for r in rows
    ]


def served(engine: Engine, days: int) -> list[pb.ServedRow]:
    """Responses and completions per (model name, model version) since the same day as `query`."""
    c = Completion
    stmt = (select(c.model_name, c.model_version, func.count(func.distinct(c.response_id)), func.count())
            .group_by(c.model_name, c.model_version).order_by(c.model_name, c.model_version))
    if (since := period_start(days)) is not None:
        stmt = stmt.where(c.created_at >= since)
    with engine.connect() as conn:
        rows = conn.execute(stmt).all()
    return [pb.ServedRow(model_name=r[0], model_version=r[1], responses=r[2], completions=r[3]) for r in rows]
