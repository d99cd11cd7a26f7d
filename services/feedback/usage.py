"""What each tenant used, per UTC day, from the completion records in the store: requests, choices, and prompt
(with their cached part) and completion tokens counted as OpenAI bills them (a request's prompt once, however
many choices it had)."""

from __future__ import annotations

from sqlalchemy import Engine, String, func, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import FunctionElement

from alignloop.store.schema import Completion
from alignloop.v1 import feedback_pb2 as pb
from services.feedback.stats import period_start


class utc_day(FunctionElement):
    """The UTC day (YYYY-MM-DD) of a timestamp column, in each store's own SQL."""

    type = String()
    inherit_cache = True


@compiles(utc_day)
def _utc_day_sqlite(element, compiler, **kw) -> str:
    # SQLite keeps the stored UTC time as text, 'YYYY-MM-DD HH:MM:SS.ffffff'.
    return f"substr({compiler.process(element.clauses, **kw)}, 1, 10)"


@compiles(utc_day, "postgresql")
def _utc_day_postgresql(element, compiler, **kw) -> str:
    return f"to_char({compiler.process(element.clauses, **kw)} AT TIME ZONE 'UTC', 'YYYY-MM-DD')"


def query(engine: Engine, days: int) -> list[pb.UsageRow]:
    """One row per (UTC day, tenant), oldest day first; `days` <= 0 means all time."""
    c = Completion
    # Per request first: each choice's record repeats the request's prompt tokens.
    per_request = (
        select(c.api_key_hash.label("tenant"), utc_day(func.min(c.created_at)).label("day"),
               func.count().label("completions"), func.max(c.prompt_tokens).label("prompt_tokens"),
               func.sum(c.completion_tokens).label("completion_tokens"),
               # NULL in records from before cached tokens were counted: none known to be cached.
               func.coalesce(func.max(c.cached_tokens), 0).label("cached_tokens"))
        .group_by(c.api_key_hash, c.response_id)
    )
    if (since := period_start(days)) is not None:
        per_request = per_request.where(c.created_at >= since)
    r = per_request.subquery()
    stmt = (select(r.c.day, r.c.tenant, func.count(), func.sum(r.c.completions), func.sum(r.c.prompt_tokens),
                   func.sum(r.c.completion_tokens), func.sum(r.c.cached_tokens))
            .group_by(r.c.day, r.c.tenant).order_by(r.c.day, r.c.tenant))
    with engine.connect() as conn:
        rows = conn.execute(stmt).all()
    return [pb.UsageRow(day=row[0], tenant=row[1], requests=row[2], completions=int(row[3] or 0),
                        prompt_tokens=int(row[4] or 0), completion_tokens=int(row[5] or 0),
                        cached_prompt_tokens=int(row[6] or 0)) for row in rows]
