-- audit-replay logs in as mc_audit_replay. Its projections live in ClickHouse; in PostgreSQL it
-- only reads events (rebuilds read every tenant's, replays one tenant's under its tenant scope)
-- and appends nothing.
-- (Numbered 0002 like the other services' role migrations; there is no 0001.)
GRANT mc_eventstore_reader TO mc_audit_replay;
