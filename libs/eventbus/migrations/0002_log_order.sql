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
