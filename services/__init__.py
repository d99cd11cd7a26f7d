"""alignloop's services; each is its own process and meets the others only through proto/, Kafka and MLflow."""
