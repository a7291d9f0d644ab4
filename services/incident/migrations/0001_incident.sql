-- incident's own schema: the incidents it opened (a queryable copy of the incident streams,
-- <tenant>/incident/<incident_id>, written in the same transaction as each append) and the
-- events its violation consumer has applied.

CREATE SCHEMA IF NOT EXISTS incident;

CREATE TABLE IF NOT EXISTS incident.incidents (
    incident_id      uuid        PRIMARY KEY,
    tenant_id        text        NOT NULL,
    -- Belt and braces next to the deterministic incident id: one incident per violation, ever.
    violation_id     text        NOT NULL UNIQUE,
    run_id           text        NOT NULL,
    agent_id         text        NOT NULL,
    policy_id        text        NOT NULL,
    step_index       integer     NOT NULL,
    severity         text        NOT NULL CHECK (severity IN ('low', 'medium', 'high', 'critical')),
    status           text        NOT NULL CHECK (status IN ('open', 'acknowledged', 'resolved')),
    title            text        NOT NULL,
    trace_id         text,
    opened_at        timestamptz NOT NULL,
    acknowledged_by  text,
    acknowledged_at  timestamptz,
    resolved_by      text,
    resolved_at      timestamptz,
    resolution       text,
    version          bigint      NOT NULL,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS incidents_tenant_status
    ON incident.incidents (tenant_id, status, opened_at DESC);

CREATE TABLE IF NOT EXISTS incident.applied_events (
    consumer   text        NOT NULL,
    event_id   uuid        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);

GRANT USAGE ON SCHEMA incident TO mc_service;
GRANT SELECT, INSERT, UPDATE ON incident.incidents TO mc_service;
GRANT SELECT, INSERT ON incident.applied_events TO mc_service;
