-- Least privilege on the event store.
--
-- Every service logs in as its own role (created by the migrator, libs/eventbus/migrate.py,
-- before any migration runs) and is given what it needs through three group roles:
--   * mc_eventstore_appender may call eventstore.append_events, and nothing else that writes;
--   * mc_eventstore_reader may SELECT events (under the tenant scope policy below);
--   * mc_eventstore_writer owns append_events and is the only role with INSERT on events. Nobody
--     logs in as it or is a member of it.
-- append_events is SECURITY DEFINER: it runs as mc_eventstore_writer, so the hash chain, the
-- version check and the stream locks are always computed by the database and no service can
-- INSERT a row of its own making. Row-level security on the writer's INSERTs then lets each
-- event through only when the role that logged in (session_user, which a definer function does
-- not change) owns the stream's category (eventstore.stream_categories, filled by the migrator
-- from the services' registrations) and the stream id starts with the event's tenant.
-- A definer function rather than an invoker one because the append reads each stream's head
-- whatever the caller may read, and admission appends for several tenants in one call.

DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['mc_eventstore_writer', 'mc_eventstore_reader',
        'mc_eventstore_appender']
    LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            EXECUTE format('CREATE ROLE %I NOLOGIN NOINHERIT', r);
        END IF;
    END LOOP;
END $$;

-- Which role may append to the streams of each category (<tenant>/<category>/<entity>).
CREATE TABLE eventstore.stream_categories (
    category  text PRIMARY KEY,
    role_name name NOT NULL
);

-- The tenant a transaction is scoped to (SET LOCAL mc.tenant_id), or NULL when it is not.
CREATE FUNCTION eventstore.tenant_scope() RETURNS text
LANGUAGE sql STABLE AS $$ SELECT nullif(current_setting('mc.tenant_id', true), '') $$;

ALTER TABLE eventstore.events ENABLE ROW LEVEL SECURITY;
-- The table's owner (the migrating role) is exempt: migrations and `mctl verify` read it all.
-- An event goes in when its stream id starts with its tenant and the stream's category is one
-- the logged-in role may append to: its own, or those of roles it is a member of (an
-- administrator). The categories are gathered once per statement (an uncorrelated sub-select),
-- not once per row.
CREATE POLICY events_append ON eventstore.events FOR INSERT TO mc_eventstore_writer
    WITH CHECK (
        split_part(stream_id, '/', 1) = tenant_id
        AND split_part(stream_id, '/', 2) = ANY (ARRAY(
            SELECT c.category FROM eventstore.stream_categories c
            WHERE pg_has_role(session_user, c.role_name, 'MEMBER')))
    );
CREATE POLICY events_append_read ON eventstore.events FOR SELECT TO mc_eventstore_writer
    USING (true);
-- A reader sees every tenant's events, unless its transaction is scoped to one tenant: then
-- only that tenant's, so a per-tenant query that forgot its tenant filter cannot leak.
CREATE POLICY events_read ON eventstore.events FOR SELECT TO mc_eventstore_reader
    USING (eventstore.tenant_scope() IS NULL OR tenant_id = eventstore.tenant_scope());

GRANT USAGE ON SCHEMA eventstore
    TO mc_eventstore_writer, mc_eventstore_reader, mc_eventstore_appender;
GRANT SELECT, INSERT ON eventstore.events TO mc_eventstore_writer;
GRANT SELECT ON eventstore.stream_categories TO mc_eventstore_writer;
GRANT SELECT ON eventstore.events TO mc_eventstore_reader;

ALTER FUNCTION eventstore.append_events(jsonb) OWNER TO mc_eventstore_writer;
ALTER FUNCTION eventstore.append_events(jsonb)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
REVOKE ALL ON FUNCTION eventstore.append_events(jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION eventstore.append_events(jsonb) TO mc_eventstore_appender;

-- For the services' migrations: make p_role the owner of schema p_schema and of every table, view
-- and free-standing sequence in it, and give p_role full use of what the migrating role creates
-- there later. Idempotent: a migration that adds tables to a service's schema calls it again at
-- its end (SELECT eventstore.hand_over_schema('gateway', 'mc_gateway')). Also takes back what
-- the first migrations granted the shared role.
CREATE FUNCTION eventstore.hand_over_schema(p_schema name, p_role name) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    rel regclass;
BEGIN
    EXECUTE format('ALTER SCHEMA %I OWNER TO %I', p_schema, p_role);
    FOR rel IN
        SELECT c.oid::regclass FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = p_schema AND (c.relkind IN ('r', 'p', 'v', 'm', 'f')
            -- a sequence that belongs to a column follows its table
            OR (c.relkind = 'S' AND NOT EXISTS (SELECT 1 FROM pg_depend d
                WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                    AND d.deptype IN ('a', 'i'))))
    LOOP
        EXECUTE format('ALTER TABLE %s OWNER TO %I', rel, p_role);
    END LOOP;
    EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA %I '
        'GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO %I', p_schema, p_role);
    EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA %I '
        'GRANT USAGE, SELECT ON SEQUENCES TO %I', p_schema, p_role);
    EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA %I FROM mc_service', p_schema);
    EXECUTE format('REVOKE ALL ON SCHEMA %I FROM mc_service', p_schema);
END $$;
REVOKE ALL ON FUNCTION eventstore.hand_over_schema(name, name) FROM PUBLIC;

-- The relay reads every event and keeps its checkpoint; it appends nothing.
GRANT mc_eventstore_reader TO mc_relay;
GRANT SELECT, INSERT, UPDATE ON eventstore.relay_checkpoints TO mc_relay;

-- The one role every service used to share keeps nothing and may no longer log in.
REVOKE ALL ON eventstore.events, eventstore.relay_checkpoints FROM mc_service;
REVOKE ALL ON SCHEMA eventstore FROM mc_service;
ALTER ROLE mc_service NOLOGIN;
