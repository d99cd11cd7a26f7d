"""An idempotent, acks=all Kafka producer whose sends can be awaited from asyncio."""

from __future__ import annotations

import asyncio

from alignloop.kafka_admin import acked_producer
from alignloop.topics import FEEDBACK_V1, FeedbackRecordV1


class FeedbackProducer:
    def __init__(self, bootstrap_servers: str, *, topic: str = FEEDBACK_V1, linger_ms: int = 2,
                 delivery_timeout_ms: int = 20_000) -> None:
        self.topic = topic
        self._producer = acked_producer(bootstrap_servers, topic, client_id="alignloop-feedback",
                                        linger_ms=linger_ms, delivery_timeout_ms=delivery_timeout_ms)
        self._last_error: BaseException | None = None

    def healthy(self) -> bool:
        """False while the latest send failed, or before any broker is known."""
        return self._last_error is None and bool(self._producer._metadata.brokers())

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
