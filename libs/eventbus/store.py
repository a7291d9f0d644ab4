"""The append-only event store on PostgreSQL.

Appends take one transaction-scoped advisory lock, so appending transactions commit one at a time
and the global ``position`` is handed out in commit order. That is what lets the relay follow the
table with a plain ``position > checkpoint`` cursor and never skip an event whose transaction
committed after a later-numbered one (sequence values are not commit order).
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from libs.contracts.canonical import canonical_json
from libs.contracts.envelope import EventEnvelope
from libs.errors import ConcurrencyError, InvalidInput
from libs.eventbus.db import AsyncConn, transaction

APPEND_LOCK = 7_231_000
# The largest event the store accepts, as JSON. NATS servers refuse messages over their
# max_payload (1 MB by default); an event the relay can never publish would block every event
# behind it, so it is refused here, where the caller still gets the error.
MAX_EVENT_BYTES = 900 * 1024
NOTIFY_CHANNEL = "mc_events"
GENESIS = b"\x00" * 32

_COLUMNS = (
    "position, event_id, event_type, schema_version, tenant_id, stream_id, stream_version, "
    "occurred_at, recorded_at, correlation_id, causation_id, actor, trace_context, payload, "
    "prev_hash, hash"
)


def chain_hash(prev_hash: bytes, envelope: EventEnvelope, body: bytes | None = None) -> bytes:
    """sha256(prev_hash || RFC 8785 canonical JSON of the envelope's hashed fields).

    ``body`` is that canonical JSON when the caller already has it.
    """
    if body is None:
        body = canonical_json(envelope.hashed_fields())
    return hashlib.sha256(prev_hash + body).digest()


def row_to_envelope(row: dict[str, Any]) -> EventEnvelope:
    """An ``eventstore.events`` row as an envelope."""
    return EventEnvelope(
        event_id=row["event_id"],
        event_type=row["event_type"],
        schema_version=row["schema_version"],
        tenant_id=row["tenant_id"],
        stream_id=row["stream_id"],
        stream_version=row["stream_version"],
        position=row["position"],
        occurred_at=row["occurred_at"],
        recorded_at=row["recorded_at"],
        correlation_id=row["correlation_id"],
        causation_id=row["causation_id"],
        actor=row["actor"],
        trace_context=row["trace_context"],
        payload=row["payload"],
    )


@dataclass(frozen=True)
class Append:
    """Events for one stream, with the version the caller believes the stream is at.

    ``expected_version``: ``None`` appends whatever the version; ``0`` requires a new stream;
    ``n`` requires the stream to be exactly at version ``n``.
    """

    stream_id: str
    events: Sequence[EventEnvelope]
    expected_version: int | None = None


class EventStore:
    """Append to and read from ``eventstore.events``."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    async def append(
        self,
        stream_id: str,
        events: Sequence[EventEnvelope],
        expected_version: int | None = None,
        *,
        conn: AsyncConn | None = None,
    ) -> list[EventEnvelope]:
        """Append ``events`` to one stream; return them with versions and positions set."""
        return await self.append_many([Append(stream_id, events, expected_version)], conn=conn)

    async def append_many(
        self, appends: Sequence[Append], *, conn: AsyncConn | None = None
    ) -> list[EventEnvelope]:
        """Append to several streams atomically (in the caller's transaction when ``conn``)."""
        if conn is not None:
            return await _append(conn, appends)
        async with transaction(self.pool) as c:
            return await _append(c, appends)

    async def read_stream(
        self, stream_id: str, from_version: int = 1, *, conn: AsyncConn | None = None
    ) -> list[EventEnvelope]:
        """Events of one stream with ``stream_version >= from_version``, in order."""
        q = (
            f"SELECT {_COLUMNS} FROM eventstore.events WHERE stream_id = %s "
            "AND stream_version >= %s ORDER BY stream_version"
        )
        if conn is not None:
            cur = await conn.execute(q, (stream_id, from_version))
            return [row_to_envelope(r) for r in await cur.fetchall()]
        async with transaction(self.pool) as c:
            cur = await c.execute(q, (stream_id, from_version))
            return [row_to_envelope(r) for r in await cur.fetchall()]

    async def read_streams(
        self, ranges: Sequence[tuple[str, int]], *, conn: AsyncConn
    ) -> dict[str, list[EventEnvelope]]:
        """Several streams in one round trip: ``{stream_id: events with version >= from}``."""
        if not ranges:
            return {}
        where = " OR ".join(["(stream_id = %s AND stream_version >= %s)"] * len(ranges))
        args = [v for r in ranges for v in r]
        cur = await conn.execute(
            f"SELECT {_COLUMNS} FROM eventstore.events WHERE {where} "
            "ORDER BY stream_id, stream_version",
            args,
        )
        out: dict[str, list[EventEnvelope]] = {sid: [] for sid, _ in ranges}
        for row in await cur.fetchall():
            out[row["stream_id"]].append(row_to_envelope(row))
        return out

    async def read_all(
        self, after_position: int = 0, limit: int = 1000, *, tenant_id: str | None = None
    ) -> list[EventEnvelope]:
        """Up to ``limit`` events with ``position > after_position``, in store order."""
        if tenant_id is None:
            q = (
                f"SELECT {_COLUMNS} FROM eventstore.events WHERE position > %s "
                "ORDER BY position LIMIT %s"
            )
            args: tuple[Any, ...] = (after_position, limit)
        else:
            q = (
                f"SELECT {_COLUMNS} FROM eventstore.events WHERE tenant_id = %s AND position > %s "
                "ORDER BY position LIMIT %s"
            )
            args = (tenant_id, after_position, limit)
        async with transaction(self.pool) as c:
            cur = await c.execute(q, args)
            return [row_to_envelope(r) for r in await cur.fetchall()]

    async def iter_all(
        self, after_position: int = 0, batch: int = 5000
    ) -> AsyncIterator[list[EventEnvelope]]:
        """The whole log in batches, for rebuilds and verification."""
        pos = after_position
        while True:
            rows = await self.read_all(pos, batch)
            if not rows:
                return
            yield rows
            pos = rows[-1].position or pos

    async def head_position(self) -> int:
        """The highest position in the store (0 when empty)."""
        async with transaction(self.pool) as c:
            cur = await c.execute("SELECT coalesce(max(position), 0) AS p FROM eventstore.events")
            row = await cur.fetchone()
            return int(row["p"]) if row else 0

    async def position_of(self, stream_id: str, version: int) -> int | None:
        """The store position of one stream's event at ``version`` (``None`` if there is none)."""
        async with transaction(self.pool) as c:
            cur = await c.execute(
                "SELECT position FROM eventstore.events WHERE stream_id = %s "
                "AND stream_version = %s",
                (stream_id, version),
            )
            row = await cur.fetchone()
            return int(row["position"]) if row else None

    async def read_history(
        self,
        tenant_id: str,
        stream_ids: Sequence[str],
        *,
        linked_by: tuple[str, str, str] | None = None,
        up_to_position: int | None = None,
    ) -> list[EventEnvelope]:
        """One tenant's events of ``stream_ids`` and of the streams linked to them, in store order.

        ``linked_by = (event_type, payload_key, value)`` adds every stream of the tenant holding
        an event of that type whose payload has ``payload_key`` equal to ``value`` (the incidents
        of a run, say, found by the run id their ``incident.opened`` carries). Only events at or
        below ``up_to_position`` when given.
        """
        limit = up_to_position if up_to_position is not None else 2**62
        if linked_by is None:
            q = (
                f"SELECT {_COLUMNS} FROM eventstore.events WHERE tenant_id = %s "
                "AND position <= %s AND stream_id = ANY(%s) ORDER BY position"
            )
            args: tuple[Any, ...] = (tenant_id, limit, list(stream_ids))
        else:
            event_type, key, value = linked_by
            q = (
                f"SELECT {_COLUMNS} FROM eventstore.events WHERE tenant_id = %s "
                "AND position <= %s AND (stream_id = ANY(%s) OR stream_id IN ("
                "  SELECT stream_id FROM eventstore.events WHERE tenant_id = %s"
                "  AND event_type = %s AND payload->>%s = %s)) ORDER BY position"
            )
            args = (tenant_id, limit, list(stream_ids), tenant_id, event_type, key, value)
        async with transaction(self.pool) as c:
            cur = await c.execute(q, args)
            return [row_to_envelope(r) for r in await cur.fetchall()]

    async def first_position_after(
        self, after_position: int, event_types: Sequence[str]
    ) -> int | None:
        """The lowest position above ``after_position`` holding one of ``event_types``, if any.

        Lets a reader that follows the log in several lanes (one per group of event types) tell
        how far the whole log is read: up to just before the first event a lane has yet to see.
        """
        async with transaction(self.pool) as c:
            cur = await c.execute(
                "SELECT min(position) AS p FROM eventstore.events WHERE position > %s "
                "AND event_type = ANY(%s)",
                (after_position, list(event_types)),
            )
            row = await cur.fetchone()
            return int(row["p"]) if row and row["p"] is not None else None


async def _append(conn: AsyncConn, appends: Sequence[Append]) -> list[EventEnvelope]:
    if not any(a.events for a in appends):
        return []
    # Held until this transaction ends: appends commit one at a time, in position order.
    await conn.execute("SELECT pg_advisory_xact_lock(%s)", (APPEND_LOCK,))
    out: list[EventEnvelope] = []
    rows: list[tuple[Any, ...]] = []
    stamped: list[EventEnvelope] = []
    for a in appends:
        if not a.events:
            continue
        cur = await conn.execute(
            "SELECT stream_version, hash FROM eventstore.events WHERE stream_id = %s "
            "ORDER BY stream_version DESC LIMIT 1",
            (a.stream_id,),
        )
        last = await cur.fetchone()
        version = int(last["stream_version"]) if last else 0
        prev = bytes(last["hash"]) if last else GENESIS
        if a.expected_version is not None and a.expected_version != version:
            raise ConcurrencyError(a.stream_id, a.expected_version, version)
        for e in a.events:
            if e.stream_id != a.stream_id:
                raise InvalidInput(f"event {e.event_id} is for {e.stream_id}, not {a.stream_id}")
            version += 1
            env = e.model_copy(update={"stream_version": version})
            # The canonical JSON is serialised once: it sizes the event and feeds the chain.
            body = canonical_json(env.hashed_fields())
            if len(body) > MAX_EVENT_BYTES:
                raise InvalidInput(
                    f"{e.event_type} event is {len(body):,} bytes of JSON, over the limit of "
                    f"{MAX_EVENT_BYTES:,}: store large inputs and outputs elsewhere and record a "
                    "reference"
                )
            h = chain_hash(prev, env, body)
            rows.append(
                (
                    env.event_id,
                    env.event_type,
                    env.schema_version,
                    env.tenant_id,
                    env.stream_id,
                    version,
                    env.occurred_at,
                    env.correlation_id,
                    env.causation_id,
                    env.actor,
                    env.trace_context.model_dump(),
                    env.payload,
                    prev,
                    h,
                )
            )
            stamped.append(env)
            prev = h
    # One multi-row INSERT per chunk: PostgreSQL caps a statement at 65,535 parameters.
    for start in range(0, len(rows), 2000):
        chunk = rows[start : start + 2000]
        placeholders = ",".join(["(%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)"] * len(chunk))
        params: list[Any] = []
        for r in chunk:
            params.extend([*r[:10], Jsonb(r[10]), Jsonb(r[11]), r[12], r[13]])
        cur = await conn.execute(
            "INSERT INTO eventstore.events (event_id, event_type, schema_version, tenant_id, "
            "stream_id, stream_version, occurred_at, correlation_id, causation_id, actor, "
            f"trace_context, payload, prev_hash, hash) VALUES {placeholders} "
            "RETURNING position, recorded_at",
            params,
        )
        returned = await cur.fetchall()
        for env, ret in zip(stamped[start : start + 2000], returned, strict=True):
            out.append(
                env.model_copy(
                    update={"position": ret["position"], "recorded_at": ret["recorded_at"]}
                )
            )
    # Delivered at commit only; wakes the relay without polling.
    await conn.execute("SELECT pg_notify(%s, '')", (NOTIFY_CHANNEL,))
    return out
