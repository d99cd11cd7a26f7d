"""Creating the Kafka topics alignloop uses, idempotently."""

from __future__ import annotations

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
