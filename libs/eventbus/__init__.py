"""NATS JetStream and the PostgreSQL event store: append, relay, consume, request–reply."""
