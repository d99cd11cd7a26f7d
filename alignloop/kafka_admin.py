"""Creating the Kafka topics alignloop uses, idempotently, and the one way its services produce to them."""

from __future__ import annotations

from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError

from alignloop.topics import COMPLETIONS_V1, FEEDBACK_V1

# topic -> partitions. Keys (entity ids) spread records; 3 partitions let a consumer group scale to 3 members.
TOPICS: dict[str, int] = {COMPLETIONS_V1: 3, FEEDBACK_V1: 3}


def ensure_topics(bootstrap_servers: str, topics: dict[str, int] = TOPICS, replication_factor: int = 1) -> None:
    """Creates the topics that do not exist yet."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id="alignloop-admin")
    try:
        existing = set(admin.list_topics())
        missing = [
            NewTopic(name, num_partitions=parts, replication_factor=replication_factor)
            for name, parts in topics.items()
            if name not in existing
        ]
        if missing:
            try:
                admin.create_topics(missing)
            except TopicAlreadyExistsError:  # created concurrently by another process
                pass
    finally:
        admin.close()


def acked_producer(bootstrap_servers: str, topic: str, *, client_id: str, linger_ms: int = 2,
                   delivery_timeout_ms: int = 20_000, client_metrics: bool = False) -> KafkaProducer:
    """A producer whose acknowledged sends are durable: acks=all, and idempotent, so its own retries never
    duplicate or reorder a partition. Keys and values are sent as bytes. Returns once `topic`'s metadata is
    known, so that the first send does not wait for it. `client_metrics` keeps kafka-python's own metrics
    (its `metrics()`), which alignloop does not read: its own counters are on /metrics."""
    producer = KafkaProducer(
        bootstrap_servers=bootstrap_servers,
        client_id=client_id,
        acks="all",
        enable_idempotence=True,
        # A few ms of linger lets concurrent sends share one produce request (and one broker round trip).
        linger_ms=linger_ms,
        # Large batches: kafka-python wakes its sender thread whenever a batch fills up or starts, and with
        # the default 16 KiB (about 20 records) those wake-ups cost more than the sends.
        batch_size=256 * 1024,
        request_timeout_ms=delivery_timeout_ms // 2,
        delivery_timeout_ms=delivery_timeout_ms,
        # kafka-python backs off up to 30 s between reconnections to a broker that went away; Java's client
        # caps it at 1 s. A broker that is back should be written to within about a second, not half a minute.
        reconnect_backoff_max_ms=1000,
        # kafka-python records a dozen sensors per record and per request, in Python, on the sending threads.
        metrics_enabled=client_metrics,
    )
    producer.partitions_for(topic)
    return producer


def topic_has_leaders(bootstrap_servers: str, topic: str, timeout_ms: int = 3000) -> bool:
    """Whether the brokers answer, now, that every partition of `topic` has a leader: what a producer whose
    sends failed needs before it can be written to again. Asks with a client of its own, so the answer does
    not come from a producer's cached metadata. False on any error."""
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id="alignloop-health",
                                 request_timeout_ms=timeout_ms, bootstrap_timeout_ms=timeout_ms)
    except Exception:  # NoBrokersAvailable and the like
        return False
    try:
        [described] = admin.describe_topics([topic])
        partitions = described.get("partitions") or []
        return described.get("error_code", 0) == 0 and bool(partitions) and all(
            p.get("error_code", 0) == 0 and p.get("leader_id", -1) >= 0 for p in partitions)
    except Exception:
        return False
    finally:
        admin.close()
