"""Feedback collector: gRPC Submit → Kafka, and the consumer that materialises Kafka into the store."""
