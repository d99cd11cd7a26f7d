"""A Kafka outage on the real broker (Tansu), made by cutting the network between the clients and the broker:
the gateway's completion records sent meanwhile are kept and reach the topic once it is back, and the feedback
producer's health comes back by itself, with no send needed to prove it."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
from kafka import KafkaConsumer

from alignloop.components import tansu_binary, tcp_open
from alignloop.kafka_admin import ensure_topics, topic_has_leaders
from alignloop.topics import COMPLETIONS_V1, FEEDBACK_V1, FeedbackRecordV1
from services.feedback.producer import FeedbackProducer
from services.gateway.completion_log import CompletionLog
from tests.conftest import free_ports, wait_for
from tests.unit.test_gateway import _record

pytestmark = pytest.mark.integration

DELIVERY_TIMEOUT_MS = 3000


class CuttableProxy:
    """Forwards TCP connections from `port` to `target_port`. `cut()` closes every connection and refuses new
    ones, as a network partition or a broker that is down does; `restore()` listens again."""

    def __init__(self, port: int, target_port: int) -> None:
        self.port, self.target_port = port, target_port
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            doomed, self._sockets = self._sockets, []
            listener, self._listener = self._listener, None
        for s in [s for s in (listener, *doomed) if s is not None]:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                return
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    client.close()
                    upstream.close()
                    return
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def kafka_behind_proxy(tmp_path) -> Iterator[tuple[str, CuttableProxy]]:
    """Tansu listening on one port and telling clients to use the proxy's, so every client byte crosses it."""
    broker_port, proxy_port = free_ports(2)
    proxy = CuttableProxy(proxy_port, broker_port)
    with open(tmp_path / "tansu.log", "wb") as log:
        broker = subprocess.Popen([str(tansu_binary()), "broker",
                                   "--listener-url", f"tcp://127.0.0.1:{broker_port}",
                                   "--advertised-listener-url", f"tcp://127.0.0.1:{proxy_port}",
                                   "--storage-engine", "memory://tansu/"], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: tcp_open("127.0.0.1", broker_port), 30, "the broker")
        bootstrap = f"127.0.0.1:{proxy_port}"
        ensure_topics(bootstrap)
        yield bootstrap, proxy
    finally:
        proxy.cut()
        broker.terminate()
        broker.wait(10)


def keys_on_topic(bootstrap: str, topic: str, expected: int) -> list[str]:
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             enable_auto_commit=False, consumer_timeout_ms=5000)
    keys: list[str] = []
    try:
        deadline = time.monotonic() + 30
        while len(set(keys)) < expected and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                keys += [m.key.decode() for m in batch]
    finally:
        consumer.close()
    return keys


def test_completion_records_sent_during_an_outage_reach_the_topic_once_kafka_is_back(kafka_behind_proxy):
    bootstrap, proxy = kafka_behind_proxy
    log = CompletionLog.connect(bootstrap, delivery_timeout_ms=DELIVERY_TIMEOUT_MS)
    log.first_backoff_s, log.max_backoff_s = 0.2, 1.0
    try:
        log.submit(_record(0))
        wait_for(lambda: keys_on_topic(bootstrap, COMPLETIONS_V1, 1) == ["cmpl-0"], 30, "the first record")

        proxy.cut()
        for i in range(1, 4):
            log.submit(_record(i))
        wait_for(lambda: not log.healthy(), 30, "the sends to fail")
        time.sleep(2 * DELIVERY_TIMEOUT_MS / 1000)  # several probes fail while it is down
        assert not log.healthy() and log.backlog() in (2, 3)  # one of them may be out as a probe

        proxy.restore()
        wait_for(lambda: log.backlog() == 0 and log.healthy(), 60, "the kept records to be acknowledged")
        keys = keys_on_topic(bootstrap, COMPLETIONS_V1, 4)
        # Every record is there. A send whose acknowledgement was lost may have landed twice: the store keeps
        # one row per completion id.
        assert set(keys) == {f"cmpl-{i}" for i in range(4)}, keys
    finally:
        log.close()


def feedback(i: int) -> FeedbackRecordV1:
    return FeedbackRecordV1(feedback_id=f"fb-{i}", request_hash="h", api_key_hash="k", kind="thumbs",
                            completion_ids=["cmpl-0"], thumbs_up=True, prompt_hash="p", model_name="m",
                            model_versions=["1"], created_at=0.0, accepted_at=0.0)


def test_the_feedback_producer_becomes_healthy_again_without_a_send(kafka_behind_proxy):
    bootstrap, proxy = kafka_behind_proxy
    producer = FeedbackProducer(bootstrap, delivery_timeout_ms=DELIVERY_TIMEOUT_MS)

    async def send(i: int) -> None:
        [future] = producer.send([feedback(i)])
        await future

    try:
        asyncio.run(send(0))
        assert producer.healthy()
        proxy.cut()
        with pytest.raises(Exception):
            asyncio.run(send(1))
        assert not producer.healthy() and not producer.recheck()
        assert not topic_has_leaders(bootstrap, FEEDBACK_V1)

        proxy.restore()
        # A collector out of service sends nothing: its health check alone must notice that Kafka is back.
        wait_for(producer.recheck, 30, "the producer to recover")
        asyncio.run(send(2))
        assert producer.healthy()
        assert set(keys_on_topic(bootstrap, FEEDBACK_V1, 2)) == {"fb-0", "fb-2"}
    finally:
        producer.close()
