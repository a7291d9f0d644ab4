-- The append-only event store: the system of record of Mission Control.
-- Applied by an administrative role; the services connect as mc_service, which owns nothing.

CREATE SCHEMA IF NOT EXISTS eventstore;

CREATE TABLE eventstore.events (
    -- Global position. Appends are serialised (see store.py), so position order is commit order
    -- and the relay's "position > checkpoint" cursor can never pass over a late commit.
    position        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id        uuid        NOT NULL UNIQUE,
    event_type      text        NOT NULL,
    schema_version  integer     NOT NULL CHECK (schema_version >= 1),
    tenant_id       text        NOT NULL,
    stream_id       text        NOT NULL,
    stream_version  bigint      NOT NULL CHECK (stream_version >= 1),
    occurred_at     timestamptz NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    correlation_id  text        NOT NULL,
    causation_id    text,
    actor           text        NOT NULL,
    trace_context   jsonb       NOT NULL DEFAULT '{}'::jsonb,
    payload         jsonb       NOT NULL,
    prev_hash       bytea       NOT NULL,
    hash            bytea       NOT NULL,
    UNIQUE (stream_id, stream_version)
);

CREATE INDEX events_tenant_position ON eventstore.events (tenant_id, position);

-- Belt and braces on top of the REVOKEs below: even a role that was granted too much by
-- mistake cannot rewrite history. TRUNCATE skips row triggers, so it gets a statement trigger.
CREATE FUNCTION eventstore.reject_mutation() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'eventstore.events is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$;

CREATE TRIGGER events_no_update BEFORE UPDATE OR DELETE ON eventstore.events
    FOR EACH ROW EXECUTE FUNCTION eventstore.reject_mutation();
CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON eventstore.events
    FOR EACH STATEMENT EXECUTE FUNCTION eventstore.reject_mutation();

-- Where the outbox relay has got to. One row per relay name.
CREATE TABLE eventstore.relay_checkpoints (
    name       text PRIMARY KEY,
    position   bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

GRANT USAGE ON SCHEMA eventstore TO mc_service;
GRANT SELECT, INSERT ON eventstore.events TO mc_service;
REVOKE UPDATE, DELETE, TRUNCATE ON eventstore.events FROM mc_service;
GRANT SELECT, INSERT, UPDATE ON eventstore.relay_checkpoints TO mc_service;
