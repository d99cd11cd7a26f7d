"""Produces one `alignloop.completions.v1` record per served choice, off the response path.

Requests only enqueue (microseconds); one thread owns the Kafka producer (acks=all, idempotent). A record whose
send fails (Kafka unreachable for longer than the producer's delivery timeout, too few in-sync replicas...) is
kept and sent again, so a Kafka outage delays records instead of losing them: feedback on those answers needs
them in the store. While Kafka is failing, the kept records wait in a backlog and one of them at a time is
sent as a probe, with exponential backoff, rather than all of them into a broker that is down; the first
probe that is acknowledged sends the rest. Sending a record twice is harmless: the store keeps one row per
completion id. Only when the submit queue or the backlog is full are records dropped, and counted, rather
than making users wait.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time

from kafka import KafkaProducer
from prometheus_client import Counter, Gauge

from alignloop.kafka_admin import acked_producer
from alignloop.topics import COMPLETIONS_V1, CompletionRecordV1

log = logging.getLogger("alignloop.gateway.completion_log")

RECORDS = Counter(
    "alignloop_completion_records_total",
    "Completion records by outcome (produced: acked by all replicas; failed: a send that failed, the record is "
    "kept to be sent again; dropped: the queue or the backlog was full, or the gateway stopped with Kafka down).",
    ["outcome"],
)
BACKLOG = Gauge("alignloop_completion_records_backlog",
                "Completion records kept after a failed send, waiting for Kafka to come back.")

# Kept records sent per pass of the sender thread (every 50 ms while there are any) once Kafka is back.
RESEND_CHUNK = 500

# How long a record waits for others to share its produce request. No one waits on it (the answer is sent
# already; feedback waits up to ALIGNLOOP_FEEDBACK_COMPLETION_WAIT_S for its completion to be stored), and each
# produce request costs kafka-python's I/O thread CPU the engine could use: at 150 records/s, 5 ms cost 1.06 ms
# of CPU per record and 50 ms 0.45 ms; at 1,000/s, 0.28 and 0.14 ms (benchmarks/completion_log.py).
LINGER_MS = 50

_STOP = object()
_WAKE = object()  # a failed send kept a record: the sender thread must look at the backlog


class CompletionLog:
    def __init__(self, producer: KafkaProducer, *, max_queue: int = 10_000, topic: str = COMPLETIONS_V1,
                 first_backoff_s: float = 0.5, max_backoff_s: float = 30.0) -> None:
        self.topic = topic
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._producer = producer
        self.first_backoff_s = first_backoff_s
        self.max_backoff_s = max_backoff_s
        # Shared with the producer's I/O thread, which runs the send callbacks.
        self._lock = threading.Lock()
        self._backlog: collections.deque[CompletionRecordV1] = collections.deque()
        self._max_backlog = max_queue
        self._healthy = True
        self._failures_in_a_row = 0
        self._probe_in_flight = False
        self._next_probe_at = 0.0
        self._thread = threading.Thread(target=self._run, name="completion-log", daemon=True)
        self._thread.start()

    @classmethod
    def connect(cls, bootstrap_servers: str, *, max_queue: int = 10_000,
                delivery_timeout_ms: int = 20_000) -> CompletionLog:
        """A log with its own idempotent, acks=all producer, ready to send (topic metadata fetched)."""
        producer = acked_producer(bootstrap_servers, COMPLETIONS_V1, client_id="alignloop-completions",
                                  linger_ms=LINGER_MS, delivery_timeout_ms=delivery_timeout_ms)
        return cls(producer, max_queue=max_queue)

    def submit(self, record: CompletionRecordV1) -> None:
        """Never blocks."""
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            RECORDS.labels("dropped").inc()
            log.warning("completion log queue full: dropped the record of %s", record.completion_id)

    def healthy(self) -> bool:
        """False from a failed send until a send is acknowledged again (broker unreachable, too few replicas...)."""
        return self._healthy

    def backlog(self) -> int:
        """Records kept after a failed send, not yet acknowledged."""
        return len(self._backlog)

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=0.05 if self._backlog else None)
            except queue.Empty:
                item = None
            if item is _STOP:
                return
            if item is not None and item is not _WAKE:
                with self._lock:
                    held = not self._healthy
                    if held:
                        self._keep(item)
                if not held:
                    self._send(item)
            for record in self._due():
                self._send(record)

    def _due(self) -> list[CompletionRecordV1]:
        """The kept records to send now: once Kafka acknowledges again, the next RESEND_CHUNK of them (a chunk
        per pass of the sender thread, so that a long backlog does not fill the producer's buffer and block
        the thread on it), else one probe when the backoff allows."""
        with self._lock:
            if not self._backlog:
                return []
            if self._healthy:
                records = [self._backlog.popleft() for _ in range(min(RESEND_CHUNK, len(self._backlog)))]
            elif not self._probe_in_flight and time.monotonic() >= self._next_probe_at:
                self._probe_in_flight = True
                records = [self._backlog.popleft()]
            else:
                return []
            BACKLOG.set(len(self._backlog))
            return records

    def _send(self, record: CompletionRecordV1) -> None:
        try:
            future = self._producer.send(self.topic, key=record.completion_id.encode(),
                                         value=record.model_dump_json().encode())
            future.add_callback(self._produced)
            future.add_errback(self._failed, record)  # kafka-python appends the exception to the arguments
        except Exception as exc:  # a send that cannot even be queued (e.g. metadata timeout)
            self._failed(record, exc)

    def _keep(self, record: CompletionRecordV1, first: bool = False) -> None:
        """Adds to the backlog (lock held): at the front a record that was sent before those waiting (`first`),
        else at the back. When the backlog is full, the oldest record is the one dropped."""
        if len(self._backlog) >= self._max_backlog:
            lost = record if first else self._backlog.popleft()
            RECORDS.labels("dropped").inc()
            log.warning("completion backlog full: dropped the record of %s", lost.completion_id)
            if first:
                return
        if first:
            self._backlog.appendleft(record)
        else:
            self._backlog.append(record)
        BACKLOG.set(len(self._backlog))

    def _produced(self, _metadata) -> None:
        with self._lock:
            if not self._healthy:
                log.info("Kafka acknowledges again: sending the %d kept completion records", len(self._backlog))
            self._healthy = True
            self._failures_in_a_row = 0
            self._probe_in_flight = False
        RECORDS.labels("produced").inc()

    def _failed(self, record: CompletionRecordV1, exc: BaseException | None) -> None:
        with self._lock:
            self._healthy = False
            self._failures_in_a_row += 1
            self._probe_in_flight = False
            backoff = min(self.max_backoff_s, self.first_backoff_s * 2 ** (self._failures_in_a_row - 1))
            self._next_probe_at = time.monotonic() + backoff
            self._keep(record, first=True)
        RECORDS.labels("failed").inc()
        try:
            self._queue.put_nowait(_WAKE)
        except queue.Full:  # the sender thread has records to take anyway
            pass
        log.error("could not produce the completion record of %s (kept; next try in %.1f s): %r",
                  record.completion_id, backoff, exc)

    def close(self, timeout: float = 10.0) -> None:
        """Sends what is queued (and what is kept, if Kafka acknowledges), waits for the acks, stops."""
        self._queue.put(_STOP)
        self._thread.join(timeout)
        while self._healthy and (records := self._due()):
            for record in records:
                self._send(record)
        self._producer.flush(timeout)
        self._producer.close(timeout)
        if self._backlog:
            RECORDS.labels("dropped").inc(len(self._backlog))
            log.error("stopped with %d completion records Kafka never acknowledged", len(self._backlog))
