"""How long the feedback store keeps what it holds: two retention periods, applied in batches.

- `retention_days`: completions, feedback and dead letters older than this are deleted, labelled or not.
- `unlabeled_retention_days`: completions no feedback is about are deleted sooner. "About" is judged by
  prompt: a completion is kept while any feedback of the same tenant has the same prompt hash, so every answer
  of a ranked or compared group, and best-of-n's unshown answers, stay as long as their feedback does. The
  rule keeps more than it must (an unrated answer to a prompt someone rated elsewhere), never less.

0 keeps forever. Deletes go in batches of `batch_size` rows, each its own transaction, so that a first prune
of a large store never holds long locks against the materializer's inserts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta

from sqlalchemy import Engine, and_, delete, exists, func, select

from alignloop.store.schema import Completion, DeadLetter, Feedback

DEFAULT_BATCH = 5000


@dataclass(frozen=True)
class Policy:
    retention_days: int = 0
    unlabeled_retention_days: int = 0

    @property
    def enabled(self) -> bool:
        return self.retention_days > 0 or self.unlabeled_retention_days > 0

    def __str__(self) -> str:
        def days(n: int) -> str:
            return f"{n} days" if n > 0 else "forever"
        return f"everything {days(self.retention_days)}, unlabeled {days(self.unlabeled_retention_days)}"

    @classmethod
    def from_settings(cls, settings) -> Policy:
        return cls(settings.store_retention_days, settings.store_unlabeled_retention_days)

    def cutoff(self, now: datetime) -> datetime | None:
        """Anything created before this is past retention (None: kept forever)."""
        return now - timedelta(days=self.retention_days) if self.retention_days > 0 else None

    def unlabeled_cutoff(self, now: datetime) -> datetime | None:
        days = self.unlabeled_retention_days
        if days <= 0 or (self.retention_days > 0 and days >= self.retention_days):
            return None  # the overall period deletes them first anyway
        return now - timedelta(days=days)


@dataclass
class Pruned:
    """Rows deleted (or, in a dry run, that would be), by kind."""

    completions: int = 0
    unlabeled_completions: int = 0
    feedback: int = 0
    dead_letters: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _unlabeled(cutoff: datetime, kept_from: datetime | None):
    """Completions created before `cutoff` that no feedback kept by the overall period is about (so a dry run,
    which deletes nothing first, counts what the real run deletes)."""
    old = [Completion.created_at < cutoff]
    about = [Feedback.prompt_hash == Completion.prompt_hash, Feedback.api_key_hash == Completion.api_key_hash]
    if kept_from is not None:
        old.append(Completion.created_at >= kept_from)
        about.append(Feedback.created_at >= kept_from)
    return and_(*old, ~exists().where(*about))


def _targets(policy: Policy, now: datetime) -> list[tuple[str, type, object, object]]:
    """(kind, table, the primary key to delete by in batches or None for one statement, condition) for each
    delete the policy asks for, in order."""
    targets = []
    cutoff = policy.cutoff(now)
    if cutoff is not None:
        targets += [("feedback", Feedback, Feedback.feedback_id, Feedback.created_at < cutoff),
                    ("completions", Completion, Completion.completion_id, Completion.created_at < cutoff),
                    # Unparsable records: few, and keyed by three columns.
                    ("dead_letters", DeadLetter, None, DeadLetter.ingested_at < cutoff)]
    if (unlabeled := policy.unlabeled_cutoff(now)) is not None:
        targets.append(("unlabeled_completions", Completion, Completion.completion_id,
                        _unlabeled(unlabeled, cutoff)))
    return targets


def prune(engine: Engine, policy: Policy, now: datetime, *, batch_size: int = DEFAULT_BATCH,
          dry_run: bool = False, on_batch: Callable[[str, int], None] | None = None) -> Pruned:
    """Deletes what `policy` says is past retention at `now`; with `dry_run`, only counts it. Feedback goes
    before completions, so that an interrupted prune never leaves feedback whose answers it already removed
    while they were still rated. `on_batch(kind, rows)` reports progress."""
    pruned = Pruned()
    for kind, table, key, condition in _targets(policy, now):
        if dry_run:
            with engine.connect() as conn:
                setattr(pruned, kind, conn.execute(select(func.count()).select_from(table).where(condition))
                        .scalar_one())
            continue
        while True:
            with engine.begin() as conn:
                if key is not None:
                    condition_now = key.in_(select(key).where(condition).limit(batch_size).scalar_subquery())
                else:
                    condition_now = condition
                rows = conn.execute(delete(table).where(condition_now)).rowcount
            setattr(pruned, kind, getattr(pruned, kind) + rows)
            if on_batch is not None and rows:
                on_batch(kind, rows)
            if key is None or rows < batch_size:
                break
    return pruned
