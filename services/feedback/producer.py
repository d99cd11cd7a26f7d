"""An idempotent, acks=all Kafka producer whose sends can be awaited from asyncio."""

from __future__ import annotations

import asyncio
import threading
import time

from alignloop.kafka_admin import acked_producer, topic_has_leaders
from alignloop.topics import FEEDBACK_V1, FeedbackRecordV1

RECHECK_INTERVAL_S = 2.0


class FeedbackProducer:
    def __init__(self, bootstrap_servers: str, *, topic: str = FEEDBACK_V1, linger_ms: int = 2,
                 delivery_timeout_ms: int = 20_000) -> None:
        self.topic = topic
        self.bootstrap_servers = bootstrap_servers
        self._producer = acked_producer(bootstrap_servers, topic, client_id="alignloop-feedback",
                                        linger_ms=linger_ms, delivery_timeout_ms=delivery_timeout_ms)
        self._last_error: BaseException | None = None
        self._recheck_lock = threading.Lock()
        self._rechecked_at = float("-inf")

    def healthy(self) -> bool:
        """False while the latest send failed, or before any broker is known."""
        return self._last_error is None and bool(self._producer._metadata.brokers())

    def recheck(self) -> bool:
        """After a failed send: asks the brokers (blocking, up to a few seconds) whether the topic can be
        written again, and if so forgets the failure; the next send confirms it. Without this, a collector
        taken out of service by its readiness probe would get no sends to prove Kafka is back, and stay out."""
        if self.healthy():
            return True
        # One question at a time, and not more often than every RECHECK_INTERVAL_S, however many probes ask:
        # while Kafka is down each one takes seconds.
        if not self._recheck_lock.acquire(blocking=False):
            return False
        try:
            if time.monotonic() - self._rechecked_at < RECHECK_INTERVAL_S:
                return False
            if topic_has_leaders(self.bootstrap_servers, self.topic):
                self._last_error = None
            self._rechecked_at = time.monotonic()
        finally:
            self._recheck_lock.release()
        return self.healthy()

    def send(self, records: list[FeedbackRecordV1]) -> list[asyncio.Future]:
        """Queues the records; each future resolves when Kafka acknowledged it (or fails)."""
        loop = asyncio.get_running_loop()
        futures = []
        for rec in records:
            fut = loop.create_future()
            try:
                kafka_future = self._producer.send(self.topic, key=rec.feedback_id.encode(),
                                                   value=rec.model_dump_json().encode())
            except Exception as exc:  # e.g. the buffer is full or metadata cannot be fetched
                fut.set_exception(exc)
            else:
                kafka_future.add_callback(self._acked, loop, fut)
                kafka_future.add_errback(self._failed, loop, fut)
            futures.append(fut)
        return futures

    def _acked(self, loop: asyncio.AbstractEventLoop, fut: asyncio.Future, metadata) -> None:
        self._last_error = None
        loop.call_soon_threadsafe(_resolve, fut, metadata, None)

    def _failed(self, loop: asyncio.AbstractEventLoop, fut: asyncio.Future, exc: BaseException) -> None:
        self._last_error = exc
        loop.call_soon_threadsafe(_resolve, fut, None, exc)

    def close(self, timeout: float = 10.0) -> None:
        self._producer.flush(timeout)
        self._producer.close(timeout)


def _resolve(fut: asyncio.Future, metadata, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(metadata)
