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
                   delivery_timeout_ms: int = 20_000) -> KafkaProducer:
    """A producer whose acknowledged sends are durable: acks=all, and idempotent, so its own retries never
    duplicate or reorder a partition. Keys and values are sent as bytes. Returns once `topic`'s metadata is
    known, so that the first send does not wait for it."""
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
    )
    producer.partitions_for(topic)
    return producer
