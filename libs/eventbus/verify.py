"""Verification of every stream's hash chain.

Each stored event carries ``prev_hash`` (the previous event's hash in its stream, zeros for the
first) and ``hash = sha256(prev_hash || canonical JSON of the event)``. Changing a byte of any
stored event, dropping one or reordering versions breaks the chain at that event.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg.rows import dict_row

from libs.eventbus.store import GENESIS, chain_hash, row_to_envelope


@dataclass(frozen=True)
class VerifyReport:
    """Outcome of a verification: ``first_broken`` is (stream_id, version, reason) or None."""

    ok: bool
    streams: int
    events: int
    first_broken: tuple[str, int, str] | None


def verify_chains(database_url: str, *, stream_id: str | None = None) -> VerifyReport:
    """Walk every stream (or one) in version order and recompute its chain."""
    streams = events = 0
    current: str | None = None
    prev = GENESIS
    expected_version = 1
    where = "WHERE stream_id = %s " if stream_id else ""
    args: tuple[str, ...] = (stream_id,) if stream_id else ()
    with (
        psycopg.connect(database_url, row_factory=dict_row) as conn,
        conn.cursor(name="verify") as cur,
    ):
        cur.itersize = 5000
        cur.execute(
            "SELECT position, event_id, event_type, schema_version, tenant_id, stream_id, "
            "stream_version, occurred_at, recorded_at, correlation_id, causation_id, actor, "
            "trace_context, payload, prev_hash, hash FROM eventstore.events "
            f"{where}ORDER BY stream_id, stream_version",
            args,
        )
        for row in cur:
            sid = row["stream_id"]
            if sid != current:
                current, prev, expected_version = sid, GENESIS, 1
                streams += 1
            events += 1
            version = int(row["stream_version"])
            if version != expected_version:
                return VerifyReport(
                    False, streams, events, (sid, version, f"expected version {expected_version}")
                )
            if bytes(row["prev_hash"]) != prev:
                return VerifyReport(
                    False, streams, events, (sid, version, "prev_hash does not link")
                )
            try:
                computed = chain_hash(prev, row_to_envelope(row))
            except ValueError as exc:  # a tampered row may no longer even parse
                return VerifyReport(False, streams, events, (sid, version, f"unreadable: {exc}"))
            if computed != bytes(row["hash"]):
                return VerifyReport(
                    False, streams, events, (sid, version, "content does not match its hash")
                )
            prev = computed
            expected_version += 1
    return VerifyReport(True, streams, events, None)
