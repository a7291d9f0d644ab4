-- The cost service's own schema. Costs and prices themselves are events in the event store;
-- this schema only records which events the cost consumer has applied (its idempotency key).

CREATE SCHEMA IF NOT EXISTS cost;

CREATE TABLE IF NOT EXISTS cost.applied_events (
    consumer   text        NOT NULL,
    event_id   uuid        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);

GRANT USAGE ON SCHEMA cost TO mc_service;
GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA cost TO mc_service;
