"""The collector's consumer side: materialises `alignloop.completions.v1` and `alignloop.feedback.v1` into the store.

Exactly once in the store, at-least-once from Kafka: a polled batch is written in one database transaction,
and only after that commit are its offsets committed to Kafka. A crash in between redelivers records whose
primary keys already exist, and `ON CONFLICT DO NOTHING` drops them. Feedback needs no completion row to be
stored (no foreign key), so feedback consumed before its completion record is kept.

With a retention policy (alignloop/store/retention.py), a thread of its own deletes what is past it every
`prune_interval_s`, and records already past it when they arrive (a replay of old offsets) are not stored
again: they count as `expired`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime

from kafka import KafkaConsumer
from kafka.errors import CommitFailedError, KafkaError
from prometheus_client import Counter, Gauge, Histogram
from pydantic import ValidationError
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from alignloop.store import insert_ignoring_duplicates
from alignloop.store.retention import Policy, prune
from alignloop.store.schema import Completion, DeadLetter, Feedback
from alignloop.topics import COMPLETIONS_V1, FEEDBACK_V1, CompletionRecordV1, FeedbackRecordV1, prompt_hash

log = logging.getLogger("alignloop.feedback.materializer")

RECORDS = Counter("alignloop_store_records_total", "Records consumed, by topic and outcome "
                  "(inserted; duplicate: already stored, a redelivery or retry; dead_letter: unparsable; "
                  "expired: already past the retention period).", ["topic", "outcome"])
PRUNED = Counter("alignloop_store_pruned_rows_total",
                 "Rows deleted for being past the retention period, by kind.", ["kind"])
LAST_PRUNE = Gauge("alignloop_store_last_prune_timestamp_seconds", "When the last retention pass finished.")
# A poll returns as soon as records arrive, so its timeout only bounds how long a stop waits; every timeout
# costs the idle loop CPU (9.0 ms a second at 250 ms, 5.6 at 1 s, against the embedded broker). The fetch's
# max wait stays at Kafka's 500 ms: the embedded broker does not answer a waiting fetch the moment a record
# lands, so a longer wait delays records (median time to the store 126-137 ms at 500 ms, 258-446 at 2 s).
POLL_TIMEOUT_MS = 1000
BATCH_SECONDS = Histogram("alignloop_store_batch_seconds", "Database transaction time per polled batch.")
LAST_COMMIT = Gauge("alignloop_store_last_commit_timestamp_seconds", "When offsets were last committed.")


def _ts(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC)


def completion_row(rec: CompletionRecordV1, now: datetime) -> dict:
    return {
        "completion_id": rec.completion_id,
        "response_id": rec.response_id,
        "request_id": rec.request_id,
        "choice_index": rec.choice_index,
        "api_key_hash": rec.api_key_hash,
        "prompt_hash": prompt_hash(rec.messages),
        "messages": [m.model_dump() for m in rec.messages],
        "response_text": rec.response_text,
        "finish_reason": rec.finish_reason,
        "prompt_tokens": rec.prompt_tokens,
        "cached_tokens": rec.cached_tokens,
        "completion_tokens": rec.completion_tokens,
        "model_name": rec.model_name,
        "model_version": rec.model_version,
        "sampling": rec.sampling.model_dump(),
        "stream": rec.stream,
        "created_at": _ts(rec.created_at),
        "finished_at": _ts(rec.finished_at),
        "ingested_at": now,
    }


def feedback_row(rec: FeedbackRecordV1, partition: int, offset: int, now: datetime) -> dict:
    created = _ts(rec.created_at)
    return {
        "feedback_id": rec.feedback_id,
        "client_feedback_id": rec.client_feedback_id,
        "request_id": rec.request_id,
        "request_hash": rec.request_hash,
        "api_key_hash": rec.api_key_hash,
        "kind": rec.kind,
        "completion_id": rec.completion_ids[0],
        "completion_ids": rec.completion_ids,
        "thumbs_up": rec.thumbs_up,
        "rating": rec.rating,
        "preferred_completion_id": rec.preferred_completion_id,
        "comment": rec.comment,
        "correction": rec.correction,
        "fails_instruction": rec.fails_instruction,
        "hallucination": rec.hallucination,
        "inappropriate": rec.inappropriate,
        "prompt_hash": rec.prompt_hash,
        "model_name": rec.model_name,
        "model_version": rec.model_versions[0] if rec.model_versions else "",
        "model_versions": rec.model_versions,
        "day": created.strftime("%Y-%m-%d"),
        "created_at": created,
        "accepted_at": _ts(rec.accepted_at),
        "ingested_at": now,
        "kafka_partition": partition,
        "kafka_offset": offset,
    }


def _first_by_key(rows: Iterable[dict], key: str) -> list[dict]:
    # Within one batch, keep the first copy (lowest offset: same key, same partition) so that "first wins"
    # holds inside a batch exactly as it does across batches.
    seen: dict[str, dict] = {}
    for row in rows:
        seen.setdefault(row[key], row)
    return list(seen.values())


class Materializer:
    """Poll → one transaction → commit offsets, until `stop` is set."""

    def __init__(self, consumer: KafkaConsumer, engine: Engine, *, max_records: int = 2000,
                 retention: Policy = Policy(), prune_interval_s: float = 3600.0) -> None:
        self.consumer = consumer
        self.engine = engine
        self.max_records = max_records
        self.retention = retention
        self.prune_interval_s = prune_interval_s

    def run(self, stop: threading.Event, drain_s: float = 10.0) -> None:
        """Until `stop`; then keeps going until a poll comes back empty (at most `drain_s`), because the
        embedded broker keeps records in memory only: what is not stored before it stops would be gone."""
        if self.retention.enabled:
            # Not in this loop: a first prune of a large store can take minutes, and a consumer that does not
            # poll for max.poll.interval.ms is put out of its group.
            threading.Thread(target=self.prune_every, args=(stop,), name="store-retention",
                             daemon=True).start()
        while not stop.is_set():
            self._step(stop)
        deadline = time.monotonic() + drain_s
        while time.monotonic() < deadline and self._step(stop):  # a store failure now ends it at once
            pass

    def _step(self, stop: threading.Event) -> bool:
        batch = self.consumer.poll(timeout_ms=POLL_TIMEOUT_MS, max_records=self.max_records)
        if not batch:
            return False
        self._write_until_stored(batch, stop)
        try:
            self.consumer.commit()
            LAST_COMMIT.set_to_current_time()
        except (CommitFailedError, KafkaError) as exc:
            # The group rebalanced while we wrote: the records will be redelivered and found stored.
            log.warning("offset commit failed (%r); the batch will be redelivered and deduplicated", exc)
        return True

    def _write_until_stored(self, batch: dict, stop: threading.Event) -> None:
        delay = 0.5
        while True:
            try:
                self.write(batch)
                return
            except SQLAlchemyError as exc:
                # Never skip a batch: its offsets stay uncommitted until the store takes it.
                log.error("store write failed (%r); retrying in %.1f s", exc, delay)
                if stop.wait(delay):
                    raise SystemExit(1) from exc  # stop asked while the store is down: leave offsets as they are
                delay = min(delay * 2, 10.0)

    def prune_every(self, stop: threading.Event) -> None:
        """Applies the retention policy now and then every `prune_interval_s`, until `stop`."""
        while not stop.is_set():
            try:
                pruned = prune(self.engine, self.retention, datetime.now(UTC),
                               on_batch=lambda kind, rows: PRUNED.labels(kind).inc(rows))
                LAST_PRUNE.set_to_current_time()
                if any(pruned.as_dict().values()):
                    log.info("retention: deleted %s", pruned.as_dict())
            except SQLAlchemyError as exc:
                log.error("retention pass failed (%r); next try in %.0f s", exc, self.prune_interval_s)
            stop.wait(self.prune_interval_s)

    def write(self, batch: dict) -> None:
        """Writes one polled batch ({TopicPartition: [ConsumerRecord]}) in a single transaction."""
        now = datetime.now(UTC)
        cutoff = self.retention.cutoff(now)
        completions, feedback, dead = [], [], []
        expired = {COMPLETIONS_V1: 0, FEEDBACK_V1: 0}
        for tp, records in batch.items():
            for r in records:
                try:
                    if tp.topic == COMPLETIONS_V1:
                        rec = CompletionRecordV1.model_validate_json(r.value)
                        rows, row = completions, completion_row(rec, now)
                    elif tp.topic == FEEDBACK_V1:
                        rec = FeedbackRecordV1.model_validate_json(r.value)
                        rows, row = feedback, feedback_row(rec, r.partition, r.offset, now)
                    else:
                        raise ValueError(f"unexpected topic {tp.topic}")
                    if cutoff is not None and row["created_at"] < cutoff:
                        expired[tp.topic] += 1
                    else:
                        rows.append(row)
                except (ValidationError, ValueError) as exc:
                    log.error("dead letter %s[%d]@%d: %s", tp.topic, r.partition, r.offset, exc)
                    dead.append({"topic": tp.topic, "kafka_partition": r.partition, "kafka_offset": r.offset,
                                 "key": r.key, "value": r.value, "error": str(exc)[:4000], "ingested_at": now})
        parsed = {COMPLETIONS_V1: len(completions), FEEDBACK_V1: len(feedback)}  # before in-batch dedup
        completions = _first_by_key(completions, "completion_id")
        feedback = _first_by_key(feedback, "feedback_id")
        started = time.perf_counter()
        with self.engine.begin() as conn:
            new = {
                COMPLETIONS_V1: insert_ignoring_duplicates(conn, Completion.__table__, completions,
                                                           ["completion_id"]),
                FEEDBACK_V1: insert_ignoring_duplicates(conn, Feedback.__table__, feedback, ["feedback_id"]),
            }
            insert_ignoring_duplicates(conn, DeadLetter.__table__, dead, ["topic", "kafka_partition", "kafka_offset"])
        BATCH_SECONDS.observe(time.perf_counter() - started)
        for topic in (COMPLETIONS_V1, FEEDBACK_V1):
            RECORDS.labels(topic, "inserted").inc(new[topic])
            RECORDS.labels(topic, "duplicate").inc(parsed[topic] - new[topic])
            RECORDS.labels(topic, "dead_letter").inc(sum(1 for d in dead if d["topic"] == topic))
            RECORDS.labels(topic, "expired").inc(expired[topic])


def build_consumer(bootstrap_servers: str, group_id: str, session_timeout_ms: int) -> KafkaConsumer:
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap_servers,
        group_id=group_id,
        client_id="alignloop-store",
        enable_auto_commit=False,  # offsets follow the database commit, never precede it
        auto_offset_reset="earliest",  # a new group must read everything: nothing acknowledged is skipped
        session_timeout_ms=session_timeout_ms,
        heartbeat_interval_ms=max(session_timeout_ms // 3, 100),
        max_poll_records=2000,
    )
    consumer.subscribe([COMPLETIONS_V1, FEEDBACK_V1])
    return consumer
