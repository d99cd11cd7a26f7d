"""Produces one `alignloop.completions.v1` record per served choice, off the response path.

Requests only enqueue (microseconds); one thread owns the Kafka producer (acks=all, idempotent). If Kafka is
slow or down the bounded queue fills and further records are dropped and counted, rather than making users wait.
"""

from __future__ import annotations

import logging
import queue
import threading

from kafka import KafkaProducer
from prometheus_client import Counter

from alignloop.kafka_admin import acked_producer
from alignloop.topics import COMPLETIONS_V1, CompletionRecordV1

log = logging.getLogger("alignloop.gateway.completion_log")

RECORDS = Counter(
    "alignloop_completion_records_total",
    "Completion records by outcome (produced: acked by all replicas; failed; dropped: queue full).",
    ["outcome"],
)

_STOP = object()


class CompletionLog:
    def __init__(self, producer: KafkaProducer, *, max_queue: int = 10_000, topic: str = COMPLETIONS_V1) -> None:
        self.topic = topic
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._producer = producer
        self._healthy = True
        self._thread = threading.Thread(target=self._run, name="completion-log", daemon=True)
        self._thread.start()

    @classmethod
    def connect(cls, bootstrap_servers: str, *, max_queue: int = 10_000) -> CompletionLog:
        """A log with its own idempotent, acks=all producer, ready to send (topic metadata fetched)."""
        producer = acked_producer(bootstrap_servers, COMPLETIONS_V1, client_id="alignloop-completions",
                                  linger_ms=5)
        return cls(producer, max_queue=max_queue)

    def submit(self, record: CompletionRecordV1) -> None:
        """Never blocks."""
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            RECORDS.labels("dropped").inc()
            log.warning("completion log queue full: dropped the record of %s", record.completion_id)

    def healthy(self) -> bool:
        """False while the latest produce attempt failed (broker unreachable, not enough replicas...)."""
        return self._healthy

    def _run(self) -> None:
        while (record := self._queue.get()) is not _STOP:
            try:
                future = self._producer.send(self.topic, key=record.completion_id.encode(),
                                             value=record.model_dump_json().encode())
                future.add_callback(self._produced)
                future.add_errback(self._failed, record.completion_id)
            except Exception:  # a send that cannot even be queued (e.g. metadata timeout)
                self._failed(None, record.completion_id)

    def _produced(self, _metadata) -> None:
        self._healthy = True
        RECORDS.labels("produced").inc()

    def _failed(self, exc: BaseException | None, completion_id: str) -> None:
        self._healthy = False
        RECORDS.labels("failed").inc()
        log.error("could not produce the completion record of %s: %r", completion_id, exc)

    def close(self, timeout: float = 10.0) -> None:
        """Sends what is queued, waits for the acks, stops."""
        self._queue.put(_STOP)
        self._thread.join(timeout)
        self._producer.flush(timeout)
        self._producer.close(timeout)
