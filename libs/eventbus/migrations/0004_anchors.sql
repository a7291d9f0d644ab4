-- Anchored chains: stream heads, a hash that covers position and recorded_at, and the link
-- scheme each row was chained with (libs/eventbus/anchor.py, libs/eventbus/verify.py).
--
-- Hash schemes (never rewritten: the append-only triggers forbid UPDATE):
--   1  hash = sha256(prev_hash || canonical JSON)                 rows appended before this file
--   2  hash = sha256(prev_hash || sha256(canonical JSON) || int8(position) || int8(recorded_at
--      in microseconds since the Unix epoch))                     every row appended after it
-- A constant default is kept in the catalogue only (no rewrite, no UPDATE): existing rows read
-- as scheme 1; eventstore.append_events writes 2.
ALTER TABLE eventstore.events ADD COLUMN hash_scheme smallint NOT NULL DEFAULT 1;

-- Where scheme 2 starts: every row at or above this position was appended after this migration,
-- so a scheme-1 row there is a downgrade (`mctl verify` names it). The ALTER above waited for
-- every append in flight, so no scheme-1 row can take a position above the highest one now.
CREATE TABLE eventstore.hash_schemes (
    scheme         smallint PRIMARY KEY,
    first_position bigint NOT NULL
);
INSERT INTO eventstore.hash_schemes
SELECT 2, coalesce(max(position), 0) + 1 FROM eventstore.events;

-- The head of every stream. A statement trigger on eventstore.events moves it in the inserting
-- transaction (so eventstore.append_events, and any other INSERT, cannot skip it), as the owner:
-- the appending roles may only read the heads, never forge one. `mctl verify` compares the heads
-- with the last stored events (a deleted tail or stream shows), and the checkpoints sign a Merkle
-- root over them.
CREATE TABLE eventstore.stream_heads (
    stream_id        text PRIMARY KEY,
    tenant_id        text        NOT NULL,
    last_version     bigint      NOT NULL CHECK (last_version >= 1),
    last_hash        bytea       NOT NULL,
    updated_position bigint      NOT NULL,
    -- The last append's log_xid (see 0002): appends chain on it as they did on the events', and
    -- the checkpoint tells heads below its horizon from those it must look up in the events.
    log_xid          xid8        NOT NULL,
    updated_at       timestamptz NOT NULL
) WITH (fillfactor = 70);  -- room for HOT updates: one row is updated per stream per append

INSERT INTO eventstore.stream_heads (stream_id, tenant_id, last_version, last_hash,
    updated_position, log_xid, updated_at)
SELECT DISTINCT ON (stream_id) stream_id, tenant_id, stream_version, hash, position, log_xid,
    recorded_at
FROM eventstore.events ORDER BY stream_id, stream_version DESC;

CREATE FUNCTION eventstore.move_stream_heads() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO eventstore.stream_heads AS sh (stream_id, tenant_id, last_version, last_hash,
        updated_position, log_xid, updated_at)
    SELECT DISTINCT ON (n.stream_id) n.stream_id, n.tenant_id, n.stream_version, n.hash,
        n.position, n.log_xid, n.recorded_at
    FROM appended n ORDER BY n.stream_id, n.stream_version DESC
    ON CONFLICT (stream_id) DO UPDATE SET tenant_id = EXCLUDED.tenant_id,
        last_version = EXCLUDED.last_version, last_hash = EXCLUDED.last_hash,
        updated_position = EXCLUDED.updated_position, log_xid = EXCLUDED.log_xid,
        updated_at = EXCLUDED.updated_at
    WHERE EXCLUDED.last_version > sh.last_version;
    RETURN NULL;
END $$;
REVOKE ALL ON FUNCTION eventstore.move_stream_heads() FROM PUBLIC;

CREATE TRIGGER events_move_heads AFTER INSERT ON eventstore.events
    REFERENCING NEW TABLE AS appended
    FOR EACH STATEMENT EXECUTE FUNCTION eventstore.move_stream_heads();

-- Grants go to every role that may append (mc_service, and the per-service roles where a
-- migration created them): an append reads its streams' heads and takes positions from the
-- identity sequence itself (it hashes them before the row is inserted).
DO $$
DECLARE
    r text;
BEGIN
    FOR r IN
        SELECT DISTINCT grantee FROM information_schema.role_table_grants
        WHERE table_schema = 'eventstore' AND table_name = 'events'
            AND privilege_type = 'INSERT' AND grantee <> current_user
        UNION SELECT 'mc_service'
    LOOP
        EXECUTE format('GRANT SELECT ON eventstore.stream_heads TO %I', r);
        EXECUTE format('GRANT USAGE ON SEQUENCE eventstore.events_position_seq TO %I', r);
    END LOOP;
END $$;

-- Readers (the relay's checkpoints, verification) read the heads; the relay appends its
-- checkpoints through append_events like any service.
GRANT SELECT ON eventstore.stream_heads TO mc_eventstore_reader;
GRANT mc_eventstore_appender TO mc_relay;

-- Same contract as in 0002 (one statement: lock, check, chain, insert), plus: the previous heads
-- are read from eventstore.stream_heads (the INSERT's trigger moves them), and every event's
-- position (from the identity sequence) and recorded_at (clock_timestamp()) are assigned before
-- it is hashed, with scheme 2.
-- SECURITY DEFINER as 0003 made it: the function runs as mc_eventstore_writer, the only role
-- that inserts events (CREATE OR REPLACE would otherwise turn it back into SECURITY INVOKER).
CREATE OR REPLACE FUNCTION eventstore.append_events(p_events jsonb)
RETURNS TABLE (o_event_id uuid, o_version bigint, o_position bigint, o_recorded_at timestamptz)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    p_event_id uuid[];
    p_event_type text[];
    p_schema_version integer[];
    p_tenant_id text[];
    p_stream_id text[];
    p_occurred_at timestamptz[];
    p_correlation_id text[];
    p_causation_id text[];
    p_actor text[];
    p_trace_context jsonb[];
    p_payload jsonb[];
    p_body_head bytea[];
    p_body_tail bytea[];
    p_expected bigint[];
    lock_key bigint;
    s_ids text[];
    s_ver bigint[];
    s_hash bytea[];
    v bigint;
    h bytea;
    x xid8;
    xid xid8;
    j integer;
    versions bigint[];
    prevs bytea[];
    hashes bytea[];
    positions bigint[];
    stamps timestamptz[];
BEGIN
    SELECT array_agg(t.event_id ORDER BY x.ord), array_agg(t.event_type ORDER BY x.ord),
        array_agg(t.schema_version ORDER BY x.ord), array_agg(t.tenant_id ORDER BY x.ord),
        array_agg(t.stream_id ORDER BY x.ord), array_agg(t.occurred_at ORDER BY x.ord),
        array_agg(t.correlation_id ORDER BY x.ord), array_agg(t.causation_id ORDER BY x.ord),
        array_agg(t.actor ORDER BY x.ord), array_agg(t.trace_context ORDER BY x.ord),
        array_agg(t.payload ORDER BY x.ord), array_agg(convert_to(t.head, 'UTF8') ORDER BY x.ord),
        array_agg(convert_to(t.tail, 'UTF8') ORDER BY x.ord), array_agg(t.expected ORDER BY x.ord)
    INTO p_event_id, p_event_type, p_schema_version, p_tenant_id, p_stream_id, p_occurred_at,
        p_correlation_id, p_causation_id, p_actor, p_trace_context, p_payload, p_body_head,
        p_body_tail, p_expected
    FROM jsonb_array_elements(p_events) WITH ORDINALITY AS x(doc, ord),
        LATERAL jsonb_to_record(x.doc) AS t(event_id uuid, event_type text,
            schema_version integer, tenant_id text, stream_id text, occurred_at timestamptz,
            correlation_id text, causation_id text, actor text, trace_context jsonb,
            payload jsonb, head text, tail text, expected bigint);
    FOR lock_key IN
        SELECT DISTINCT hashtextextended(s, 0) FROM unnest(p_stream_id) AS s ORDER BY 1
    LOOP
        PERFORM pg_advisory_xact_lock(lock_key);
    END LOOP;
    -- Each statement of a volatile function takes a new snapshot: these reads see every append
    -- that committed before the locks were granted.
    xid := pg_current_xact_id();
    s_ids := ARRAY(SELECT DISTINCT s FROM unnest(p_stream_id) AS s);
    FOR j IN 1 .. cardinality(s_ids) LOOP
        SELECT sh.last_version, sh.last_hash, sh.log_xid INTO v, h, x
            FROM eventstore.stream_heads sh WHERE sh.stream_id = s_ids[j];
        IF NOT FOUND THEN
            v := 0;
            h := '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea;
            x := '0';
        END IF;
        s_ver[j] := v;
        s_hash[j] := h;
        IF x > xid THEN
            xid := x;
        END IF;
    END LOOP;
    FOR i IN 1 .. cardinality(p_event_id) LOOP
        j := array_position(s_ids, p_stream_id[i]);
        IF p_expected[i] IS NOT NULL AND p_expected[i] <> s_ver[j] THEN
            RAISE EXCEPTION USING ERRCODE = 'MC409', MESSAGE = p_stream_id[i],
                DETAIL = s_ver[j]::text, HINT = p_expected[i]::text;
        END IF;
        s_ver[j] := s_ver[j] + 1;
        versions[i] := s_ver[j];
        prevs[i] := s_hash[j];
        positions[i] := nextval('eventstore.events_position_seq');
        stamps[i] := clock_timestamp();
        s_hash[j] := sha256(
            s_hash[j]
            || sha256(p_body_head[i] || convert_to(s_ver[j]::text, 'UTF8') || p_body_tail[i])
            || int8send(positions[i])
            || int8send((extract(epoch FROM stamps[i]) * 1000000)::bigint)
        );
        hashes[i] := s_hash[j];
    END LOOP;
    RETURN QUERY
        INSERT INTO eventstore.events AS ev (position, event_id, event_type, schema_version,
            tenant_id, stream_id, stream_version, occurred_at, recorded_at, correlation_id,
            causation_id, actor, trace_context, payload, prev_hash, hash, log_xid, hash_scheme)
        OVERRIDING SYSTEM VALUE
        SELECT t.p, t.a, t.b, t.c, t.d, t.e, t.f, t.g, t.r, t.h, t.i, t.j, t.k, t.l, t.m, t.n,
            xid, 2
        FROM unnest(positions, p_event_id, p_event_type, p_schema_version, p_tenant_id,
            p_stream_id, versions, p_occurred_at, stamps, p_correlation_id, p_causation_id,
            p_actor, p_trace_context, p_payload, prevs, hashes) WITH ORDINALITY
            AS t(p, a, b, c, d, e, f, g, r, h, i, j, k, l, m, n, ord)
        ORDER BY t.ord
        RETURNING ev.event_id, ev.stream_version, ev.position, ev.recorded_at;
END $$;
