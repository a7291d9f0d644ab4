-- workflow-engine's own schema. The run aggregate itself lives in the event store
-- (streams <tenant>/run/<run_id>); this schema only remembers which events the
-- violation consumer has applied, so a redelivery never stops a run twice.

CREATE SCHEMA IF NOT EXISTS workflow;

CREATE TABLE IF NOT EXISTS workflow.applied_events (
    consumer   text        NOT NULL,
    event_id   uuid        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);

GRANT USAGE ON SCHEMA workflow TO mc_service;
GRANT SELECT, INSERT ON workflow.applied_events TO mc_service;
