"""alignloop: the shared package (settings, credentials, Kafka topic schemas, gRPC stubs, the CLI)."""

__version__ = "0.1.0"
