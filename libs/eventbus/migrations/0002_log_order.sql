-- Appends no longer serialise on one global lock, so position order is no longer commit order.
-- The log's total order becomes (log_xid, position):
--   * log_xid is the appending transaction's id, raised to the stream's previous log_xid when that
--     is higher (see libs/eventbus/store.py), so it never decreases along a stream;
--   * every event of a transaction still open, or of one not begun yet, has a log_xid at or above
--     pg_snapshot_xmin(pg_current_snapshot()), so a reader that stays below that horizon never
--     passes an event that could still appear.
-- Existing events all committed under the old global lock: they get log_xid 0 and keep their
-- position order. A constant default is stored in the catalogue only (no rewrite, no UPDATE, so
-- the append-only triggers do not fire); new rows then default to their own transaction id.
ALTER TABLE eventstore.events ADD COLUMN log_xid xid8 NOT NULL DEFAULT '0';
ALTER TABLE eventstore.events ALTER COLUMN log_xid SET DEFAULT pg_current_xact_id();
CREATE INDEX events_log_order ON eventstore.events (log_xid, position);

-- The relay's checkpoint is a point in that order: (log_xid, position). A checkpoint written
-- before this migration is a position among log_xid-0 events, which is where it still points.
ALTER TABLE eventstore.relay_checkpoints ADD COLUMN log_xid xid8 NOT NULL DEFAULT '0';

-- One append in one statement (so, outside a caller's transaction, in one round trip): lock the
-- streams in ascending key order, read their heads with a snapshot taken after the locks, check
-- the expected versions, chain the hashes and insert. The client sends each event's canonical
-- JSON split around its stream_version (which is only known here): the hash is
-- sha256(prev_hash || head || version || tail), the same bytes libs/eventbus/store.py chains.
-- An expected version that does not match raises SQLSTATE MC409 with the stream id as message,
-- the actual version as detail and the expected one as hint.
CREATE FUNCTION eventstore.append_events(p_events jsonb)
RETURNS TABLE (o_event_id uuid, o_version bigint, o_position bigint, o_recorded_at timestamptz)
LANGUAGE plpgsql AS $$
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
BEGIN
    -- The events arrive as one JSON array (one parameter, encoded once by the client).
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
        SELECT e.stream_version, e.hash, e.log_xid INTO v, h, x FROM eventstore.events e
            WHERE e.stream_id = s_ids[j] ORDER BY e.stream_version DESC LIMIT 1;
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
        s_hash[j] := sha256(
            s_hash[j] || p_body_head[i] || convert_to(s_ver[j]::text, 'UTF8') || p_body_tail[i]
        );
        hashes[i] := s_hash[j];
    END LOOP;
    RETURN QUERY
        INSERT INTO eventstore.events AS ev (event_id, event_type, schema_version, tenant_id,
            stream_id, stream_version, occurred_at, correlation_id, causation_id, actor,
            trace_context, payload, prev_hash, hash, log_xid)
        SELECT t.a, t.b, t.c, t.d, t.e, t.f, t.g, t.h, t.i, t.j, t.k, t.l, t.m, t.n, xid
        FROM unnest(p_event_id, p_event_type, p_schema_version, p_tenant_id, p_stream_id,
            versions, p_occurred_at, p_correlation_id, p_causation_id, p_actor,
            p_trace_context, p_payload, prevs, hashes) WITH ORDINALITY
            AS t(a, b, c, d, e, f, g, h, i, j, k, l, m, n, ord)
        ORDER BY t.ord
        RETURNING ev.event_id, ev.stream_version, ev.position, ev.recorded_at;
END $$;
