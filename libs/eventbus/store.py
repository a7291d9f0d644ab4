"""The append-only event store on PostgreSQL.

Appends to different streams commit in parallel, so PostgreSQL can flush many of them with one
WAL write (group commit). What keeps the log exact without a global lock:

* **Per stream**, an append takes a transaction-scoped advisory lock on each of its streams (in
  one global order, so two multi-stream appends cannot deadlock) and holds it until commit.
  Appends to one stream therefore still run one after the other: ``expected_version`` and the
  hash chain stay exact.
* **Across streams**, the log's one total order is ``(log_xid, position)``. ``position`` comes
  from a sequence and is handed out at insert time, not at commit, so a reader following
  ``position`` alone could pass an event whose transaction commits later. ``log_xid`` is the
  appending transaction's id, raised to the previous ``log_xid`` of any stream it appends to when
  that is higher, so it never decreases along a stream. Every transaction with an id below
  ``pg_snapshot_xmin(pg_current_snapshot())`` has ended and no new one can get such an id, so
  every event with ``log_xid`` below that horizon is already visible and none can appear there
  later. Readers of the whole log (the relay, :meth:`EventStore.read_log`) stay below it, which
  makes them gap-free.
* ``position`` is still unique, and increasing along each stream and along causality (an event
  appended after another committed has a higher position), so it stays a fine sort key inside a
  run's history; it is only not a cursor for the whole log.

The locking, version checks, hash chaining, the stream heads and the INSERT run in one statement,
the SQL function ``eventstore.append_events`` (migrations 0002 and 0004), so an append outside a
caller's transaction is one round trip. Since 0004 it takes each event's position and recorded_at
before hashing it, so the hash covers both (:func:`chain_hash_v2`), and the INSERT's trigger moves
the stream's row in ``eventstore.stream_heads`` in the same transaction (what ``mctl verify`` and
the signed checkpoints of :mod:`libs.eventbus.anchor` compare the log with).
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import psycopg.errors
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from libs.contracts.canonical import canonical_json
from libs.contracts.envelope import EventEnvelope
from libs.errors import ConcurrencyError, InvalidInput, MissionControlError
from libs.eventbus.db import (
    NOTIFY_CHANNEL,
    AsyncConn,
    appended_on,
    commit_signal,
    scope_to_tenant,
    transaction,
    translate,
)

# The largest event the store accepts, as JSON. NATS servers refuse messages over their
# max_payload (1 MB by default); an event the relay can never publish would block every event
# behind it, so it is refused here, where the caller still gets the error.
MAX_EVENT_BYTES = 900 * 1024
GENESIS = b"\x00" * 32
HASH_SCHEME_V1 = 1
HASH_SCHEME = 2  # what appends write since migration 0004 (see chain_hash_v2)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_LINK_TAIL = struct.Struct(">qq")

# A stream's advisory-lock key is hashtextextended(stream_id, 0). policy-admission takes the same
# key on a run's stream, so admissions of a run serialise with each other and with appends to the
# run (advisory locks are re-entrant within a session: an append to a stream whose lock the
# caller's transaction already holds does not wait on itself).

# Only events below this are read from the whole log: see the module docstring.
HORIZON = "pg_snapshot_xmin(pg_current_snapshot())"

_COLUMNS = (
    "position, event_id, event_type, schema_version, tenant_id, stream_id, stream_version, "
    "occurred_at, recorded_at, correlation_id, causation_id, actor, trace_context, payload, "
    "prev_hash, hash"
)
_VERSION_SLOT = b'"stream_version":0,"tenant_id":'
_VERSION_AT = len(b'"stream_version":')
_WRONG_VERSION = "MC409"  # raised by eventstore.append_events
_VERSION_KEY = "events_stream_id_stream_version_key"
_UNIQUE_VERSION = re.compile(r"\(stream_id, stream_version\)=\((.*), (\d+)\)")


@dataclass(frozen=True, order=True)
class LogCursor:
    """A point in the log's total order: just after the event at ``(log_xid, position)``.

    ``LogCursor()`` is the start of the log.
    """

    log_xid: int = 0
    position: int = 0


START = LogCursor()


@dataclass(frozen=True)
class LogPage:
    """Events read from the log in its order, and the cursor to read on from."""

    events: list[EventEnvelope]
    cursor: LogCursor


def chain_hash(prev_hash: bytes, envelope: EventEnvelope, body: bytes | None = None) -> bytes:
    """Hash scheme 1: sha256(prev_hash || RFC 8785 canonical JSON of the envelope's hashed
    fields). Rows appended before migration 0004 carry it; it does not cover ``position`` or
    ``recorded_at``.

    ``body`` is that canonical JSON when the caller already has it.
    """
    if body is None:
        body = canonical_json(envelope.hashed_fields())
    return hashlib.sha256(prev_hash + body).digest()


def micros_since_epoch(at: datetime) -> int:
    """``at`` as whole microseconds since the Unix epoch (PostgreSQL keeps microseconds)."""
    return (at - _EPOCH) // _MICROSECOND


def link_hash(prev_hash: bytes, content_hash: bytes, position: int, recorded_at: datetime) -> bytes:
    """Hash scheme 2's link: sha256(prev_hash || content_hash || int8(position) ||
    int8(recorded_at in microseconds)), big-endian as PostgreSQL's ``int8send``."""
    return hashlib.sha256(
        prev_hash + content_hash + _LINK_TAIL.pack(position, micros_since_epoch(recorded_at))
    ).digest()


def chain_hash_v2(prev_hash: bytes, envelope: EventEnvelope, body: bytes | None = None) -> bytes:
    """Hash scheme 2, the one every append uses since migration 0004: the link over
    sha256(canonical JSON), the store ``position`` and ``recorded_at`` (both must be set)."""
    if envelope.position is None or envelope.recorded_at is None:
        raise ValueError("scheme 2 hashes a stored event: position and recorded_at must be set")
    if body is None:
        body = canonical_json(envelope.hashed_fields())
    content = hashlib.sha256(body).digest()
    return link_hash(prev_hash, content, envelope.position, envelope.recorded_at)


def event_hash(scheme: int, prev_hash: bytes, envelope: EventEnvelope) -> bytes:
    """The hash of a stored event under its ``hash_scheme``."""
    if scheme == HASH_SCHEME_V1:
        return chain_hash(prev_hash, envelope)
    if scheme == HASH_SCHEME:
        return chain_hash_v2(prev_hash, envelope)
    raise ValueError(f"unknown hash scheme {scheme}")


@dataclass(frozen=True)
class ChainedEvent:
    """A stored event with its link in its stream's hash chain (what an export carries)."""

    envelope: EventEnvelope
    prev_hash: bytes
    hash: bytes
    hash_scheme: int


@dataclass(frozen=True)
class StreamHead:
    """The last event of a stream as its head records it (``eventstore.stream_heads``)."""

    stream_id: str
    tenant_id: str
    version: int
    hash: bytes
    position: int


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
        """Append to several streams atomically (in the caller's transaction when ``conn``).

        Raises :class:`~libs.errors.ConcurrencyError` when a stream is not at its
        ``expected_version``.
        """
        if conn is not None:
            return await _append(conn, appends)
        try:
            async with self.pool.connection() as c:
                # The append is one statement, so outside a caller's transaction it runs as its
                # own transaction: one round trip, no BEGIN or COMMIT of its own.
                await c.set_autocommit(True)
                try:
                    out = await _append(cast(AsyncConn, c), appends)
                    # Committed with the statement: wake the relay the shared, coalesced way.
                    commit_signal(self.pool).poke()
                    return out
                finally:
                    if not c.closed:
                        await c.set_autocommit(False)
        except MissionControlError:
            raise
        except (psycopg.Error, OSError) as exc:
            raise translate(exc) from exc

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

    async def read_log(
        self, after: LogCursor = START, limit: int = 1000, *, tenant_id: str | None = None
    ) -> LogPage:
        """Up to ``limit`` events after ``after`` in log order, below the visibility horizon.

        Gap-free: an event not returned because it is not visible yet always comes after the
        returned cursor (see the module docstring). With ``tenant_id`` the read is scoped to
        that tenant (:func:`~libs.eventbus.db.scope_to_tenant`).
        """
        tenant = "tenant_id = %s AND " if tenant_id is not None else ""
        args: list[Any] = [tenant_id] if tenant_id is not None else []
        args += [str(after.log_xid), after.position, limit]
        async with transaction(self.pool) as c:
            if tenant_id is not None:
                await scope_to_tenant(c, tenant_id)
            cur = await c.execute(
                f"SELECT {_COLUMNS}, log_xid::text AS log_xid_text FROM eventstore.events "
                f"WHERE {tenant}(log_xid, position) > (%s::text::xid8, %s) "
                f"AND log_xid < {HORIZON} ORDER BY log_xid, position LIMIT %s",
                args,
            )
            rows = await cur.fetchall()
        if not rows:
            return LogPage([], after)
        last = rows[-1]
        return LogPage(
            [row_to_envelope(r) for r in rows],
            LogCursor(int(last["log_xid_text"]), last["position"]),
        )

    async def read_all(
        self,
        after_position: int | LogCursor = 0,
        limit: int = 1000,
        *,
        tenant_id: str | None = None,
    ) -> list[EventEnvelope]:
        """Up to ``limit`` events in log order after a point, below the visibility horizon.

        ``after_position`` is a :class:`LogCursor`, ``0`` for the start of the log, or the
        position of a stored event to read on from (its place in the log is looked up).
        """
        after = await self._cursor_at(after_position)
        return (await self.read_log(after, limit, tenant_id=tenant_id)).events

    async def iter_all(
        self, after_position: int | LogCursor = 0, batch: int = 5000
    ) -> AsyncIterator[list[EventEnvelope]]:
        """The whole log in batches, in log order, for rebuilds and verification."""
        cursor = await self._cursor_at(after_position)
        while True:
            page = await self.read_log(cursor, batch)
            if not page.events:
                return
            yield page.events
            cursor = page.cursor

    async def stream_head(self, stream_id: str) -> StreamHead | None:
        """The head of ``stream_id`` as the append that last moved it recorded it."""
        async with transaction(self.pool) as c:
            cur = await c.execute(
                "SELECT stream_id, tenant_id, last_version, last_hash, updated_position "
                "FROM eventstore.stream_heads WHERE stream_id = %s",
                (stream_id,),
            )
            row = await cur.fetchone()
        if row is None:
            return None
        return StreamHead(
            row["stream_id"],
            row["tenant_id"],
            int(row["last_version"]),
            bytes(row["last_hash"]),
            int(row["updated_position"]),
        )

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
        below ``up_to_position`` when given. The read is scoped to the tenant
        (:func:`~libs.eventbus.db.scope_to_tenant`), so row-level security holds it to the
        tenant's rows even if the filter above were wrong.
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
            await scope_to_tenant(c, tenant_id)
            cur = await c.execute(q, args)
            return [row_to_envelope(r) for r in await cur.fetchall()]

    async def read_occurred(
        self,
        tenant_id: str,
        start: datetime,
        end: datetime,
        *,
        up_to_position: int,
        after_position: int = 0,
        limit: int = 5000,
    ) -> list[EventEnvelope]:
        """Up to ``limit`` of the tenant's events that occurred in ``[start, end)``, after
        ``after_position`` and at or below ``up_to_position``, in store order (page on with the
        last one's position). Only those rows leave the database: a period's documents need not
        decode the tenant's whole log. Scoped to the tenant like :meth:`read_history`."""
        async with transaction(self.pool) as c:
            await scope_to_tenant(c, tenant_id)
            cur = await c.execute(
                f"SELECT {_COLUMNS} FROM eventstore.events WHERE tenant_id = %s "
                "AND position > %s AND position <= %s AND occurred_at >= %s AND occurred_at < %s "
                "ORDER BY position LIMIT %s",
                (tenant_id, after_position, up_to_position, start, end, limit),
            )
            return [row_to_envelope(r) for r in await cur.fetchall()]

    async def count_occurred(
        self, tenant_id: str, start: datetime, end: datetime, *, up_to_position: int
    ) -> int:
        """How many events :meth:`read_occurred` pages through for the same arguments."""
        async with transaction(self.pool) as c:
            await scope_to_tenant(c, tenant_id)
            cur = await c.execute(
                "SELECT count(*) AS n FROM eventstore.events WHERE tenant_id = %s "
                "AND position <= %s AND occurred_at >= %s AND occurred_at < %s",
                (tenant_id, up_to_position, start, end),
            )
            row = await cur.fetchone()
        return int(row["n"]) if row else 0

    async def linked_streams(
        self, tenant_id: str, event_type: str, key: str, values: Sequence[str]
    ) -> list[str]:
        """The tenant's streams holding an event of ``event_type`` whose payload's ``key`` is one
        of ``values`` (the incidents of some runs, by the run id their ``incident.opened``
        carries), sorted."""
        if not values:
            return []
        async with transaction(self.pool) as c:
            await scope_to_tenant(c, tenant_id)
            cur = await c.execute(
                "SELECT DISTINCT stream_id FROM eventstore.events WHERE tenant_id = %s "
                "AND event_type = %s AND payload->>%s = ANY(%s) ORDER BY stream_id",
                (tenant_id, event_type, key, list(values)),
            )
            return [r["stream_id"] for r in await cur.fetchall()]

    async def payload_values(
        self, tenant_id: str, stream_id: str, event_type: str, key: str
    ) -> list[str]:
        """The distinct values of payload ``key`` in one stream's events of ``event_type``."""
        async with transaction(self.pool) as c:
            await scope_to_tenant(c, tenant_id)
            cur = await c.execute(
                "SELECT DISTINCT payload->>%s AS v FROM eventstore.events WHERE tenant_id = %s "
                "AND stream_id = %s AND event_type = %s ORDER BY 1",
                (key, tenant_id, stream_id, event_type),
            )
            return [r["v"] for r in await cur.fetchall() if r["v"] is not None]

    async def iter_chain(
        self, tenant_id: str, stream_ids: Sequence[str], batch: int = 2000
    ) -> AsyncIterator[list[ChainedEvent]]:
        """One tenant's events of ``stream_ids`` with their hash links, in store order, in
        batches, all from one snapshot (REPEATABLE READ) so the streams end where they ended
        when the read began."""
        async with self.pool.connection() as raw:
            conn: AsyncConn = raw  # type: ignore[assignment]
            async with conn.transaction():
                await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                await scope_to_tenant(conn, tenant_id)
                async with conn.cursor(name="export_chain") as cur:
                    await cur.execute(
                        f"SELECT {_COLUMNS}, hash_scheme FROM eventstore.events "
                        "WHERE tenant_id = %s AND stream_id = ANY(%s) ORDER BY position",
                        (tenant_id, list(stream_ids)),
                    )
                    while rows := await cur.fetchmany(batch):
                        yield [
                            ChainedEvent(
                                row_to_envelope(r),
                                bytes(r["prev_hash"]),
                                bytes(r["hash"]),
                                int(r["hash_scheme"]),
                            )
                            for r in rows
                        ]

    async def stream_counts(self, tenant_id: str, stream_ids: Sequence[str]) -> dict[str, int]:
        """How many events each of ``stream_ids`` holds (streams without events left out)."""
        async with transaction(self.pool) as c:
            await scope_to_tenant(c, tenant_id)
            cur = await c.execute(
                "SELECT stream_id, count(*) AS n FROM eventstore.events WHERE tenant_id = %s "
                "AND stream_id = ANY(%s) GROUP BY stream_id",
                (tenant_id, list(stream_ids)),
            )
            return {r["stream_id"]: int(r["n"]) for r in await cur.fetchall()}

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

    async def _cursor_at(self, after: int | LogCursor) -> LogCursor:
        if isinstance(after, LogCursor):
            return after
        if after <= 0:
            return START
        async with transaction(self.pool) as c:
            cur = await c.execute(
                "SELECT log_xid::text AS x FROM eventstore.events WHERE position = %s", (after,)
            )
            row = await cur.fetchone()
        if row is None:
            raise InvalidInput(f"no event at position {after} to read on from")
        return LogCursor(int(row["x"]), after)


async def _append(conn: AsyncConn, appends: Sequence[Append]) -> list[EventEnvelope]:
    """Send the append to ``eventstore.append_events`` (migration 0004), which locks, checks,
    chains, moves the heads and inserts in one statement; return the events as stored."""
    docs: list[dict[str, Any]] = []
    stamped: list[EventEnvelope] = []
    for a in appends:
        expected = a.expected_version
        for e in a.events:
            if e.stream_id != a.stream_id:
                raise InvalidInput(f"event {e.event_id} is for {e.stream_id}, not {a.stream_id}")
            # The canonical JSON is serialised once, with version 0: it sizes the event and,
            # split around the version, lets the database chain it at its real version.
            fields = e.model_copy(update={"stream_version": 0}).hashed_fields()
            body = canonical_json(fields)
            if len(body) > MAX_EVENT_BYTES:
                raise InvalidInput(
                    f"{e.event_type} event is {len(body):,} bytes of JSON, over the limit of "
                    f"{MAX_EVENT_BYTES:,}: store large inputs and outputs elsewhere and record a "
                    "reference"
                )
            # Keys are sorted, so the envelope's own stream_version is the last one followed by
            # tenant_id (a payload key of that name sorts before "schema_version").
            cut = body.rfind(_VERSION_SLOT)
            fields["occurred_at"] = e.occurred_at
            fields["head"] = body[: cut + _VERSION_AT].decode()
            fields["tail"] = body[cut + _VERSION_AT + 1 :].decode()
            fields["expected"] = expected
            docs.append(fields)
            stamped.append(e)
            expected = None  # checked at the first event of each Append
    if not stamped:
        return []
    try:
        cur = await conn.execute(
            "SELECT o_event_id, o_version, o_position, o_recorded_at FROM "
            "eventstore.append_events(%s)",
            (Jsonb(docs),),
        )
        rows = {r["o_event_id"]: r for r in await cur.fetchall()}
        if not conn.autocommit and not appended_on(conn):
            # A transaction the caller manages: wake the relay at its commit, from inside it.
            await conn.execute("SELECT pg_notify(%s, '')", (NOTIFY_CHANNEL,))
    except psycopg.errors.UniqueViolation as exc:
        taken = _version_taken(exc, appends)
        if taken is None:  # another unique key, e.g. an event id stored twice
            raise
        raise taken from exc
    except psycopg.Error as exc:
        if exc.sqlstate != _WRONG_VERSION:
            raise
        diag = exc.diag
        raise ConcurrencyError(
            diag.message_primary or "", int(diag.message_hint or 0), int(diag.message_detail or 0)
        ) from exc
    out: list[EventEnvelope] = []
    for e in stamped:
        r = rows[e.event_id]
        out.append(
            e.model_copy(
                update={
                    "stream_version": r["o_version"],
                    "position": r["o_position"],
                    "recorded_at": r["o_recorded_at"],
                }
            )
        )
    return out


def _version_taken(
    exc: psycopg.errors.UniqueViolation, appends: Sequence[Append]
) -> ConcurrencyError | None:
    """A stream version stored meanwhile by a writer that bypassed the stream lock.

    Every append takes the lock, so this needs a foreign writer; it is still a conflict the
    caller can retry, never an internal error.
    """
    found = _UNIQUE_VERSION.search(exc.diag.message_detail or "")
    if found is None:
        # The server leaves the key out of the message when row-level security applies to the
        # inserting role, as it does inside append_events (migration 0003); the constraint still
        # says it was a stream version. Of several streams, the first is named.
        if exc.diag.constraint_name != _VERSION_KEY or not appends:
            return None
        first = appends[0]
        expected = first.expected_version
        return ConcurrencyError(first.stream_id, expected, (expected or 0) + 1)
    stream_id, version = found.group(1), int(found.group(2))
    expected = next((a.expected_version for a in appends if a.stream_id == stream_id), None)
    return ConcurrencyError(stream_id, expected, version)
