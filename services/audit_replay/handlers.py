"""The projector: events from JetStream (or the store, for a rebuild) into ClickHouse.

Rows are buffered per table and written with one INSERT per table per flush; a flush happens when
the buffer holds ``flush_rows`` rows, every ``flush_interval`` seconds, and at shutdown. A message
is acknowledged only after the flush that contains its rows succeeded, so a crash loses nothing:
un-acked messages are redelivered and, because every table is an upsert keyed by identity and
versioned by store position, the duplicates disappear.

Events do not always arrive in store order: a failed batch is sent back with a delay while later
batches flow, and the relay may publish out of order after a partial failure. A run or incident
event older than the row it belongs to, and not provably folded in already, makes the projector
re-fold that entity from its stream in the event store (:meth:`Projector._refold`), so a late
``run.started`` or ``incident.opened`` is never lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry, Gauge
from psycopg_pool import AsyncConnectionPool

from libs.contracts.envelope import EventEnvelope, stream_id_for
from libs.contracts.subjects import EVENTS_PREFIX
from libs.errors import Conflict, InvalidInput, MissionControlError
from libs.eventbus.consumer import BatchEventConsumer
from libs.eventbus.db import transaction
from libs.eventbus.jetstream import ConsumerSpec
from libs.eventbus.store import EventStore, row_to_envelope
from services.audit_replay import schema
from services.audit_replay.clickhouse import Clickhouse
from services.audit_replay.domain import (
    IncidentRow,
    Key,
    Projection,
    RunRow,
    incident_key,
    incident_stream,
    parse_ts,
    project,
    refold_incident,
    refold_run,
    run_key,
    run_stream,
)

log = structlog.get_logger("audit.projector")

PROJECTOR = "audit-projector"
# Parents before children is not needed by ClickHouse, but writing the raw log first means a
# half-written flush leaves the log ahead of the projections, never behind.
WRITE_ORDER = ("events", "runs", "steps", "decisions", "incidents", "policies", "costs")
# Streams read back per store round trip when re-folding entities that received late events.
REFOLD_READ_CHUNK = 200

V = TypeVar("V")


def consumer_spec() -> ConsumerSpec:
    """The durable consumer that feeds the projections with every event."""
    return ConsumerSpec(
        durable=PROJECTOR,
        filter_subjects=(f"{EVENTS_PREFIX}.>",),
        fetch_batch=500,
        max_ack_pending=20_000,
        # A ClickHouse outage must not dead-letter events: keep redelivering for a long time.
        max_deliver=200,
        backoff=(0.2, 1.0, 2.0, 5.0),
    )


class Projector:
    """Buffers projected rows and writes them to ClickHouse in batches.

    :meth:`add` projects a batch of envelopes and returns a future that completes when the flush
    holding their rows has succeeded (or fails with the flush's error). All work on the buffer,
    the caches and ClickHouse writes happens under one lock, so a rebuild can run while the
    consumer is live. ``store`` is where runs and incidents that received a late event are
    re-folded from.
    """

    def __init__(
        self,
        ch: Clickhouse,
        store: EventStore,
        *,
        flush_rows: int = 5_000,
        flush_interval: float = 0.2,
        cache_limit: int = 50_000,
    ) -> None:
        self.ch = ch
        self.store = store
        self.flush_rows = flush_rows
        self.flush_interval = flush_interval
        self.cache_limit = cache_limit
        self.projected_position = 0
        self.last_recorded_at: datetime | None = None
        self.rebuilding = False
        self.rebuilds_started = 0
        """Rebuilds begun by this process: a query that saw it change read half-built tables."""
        self.refolds = 0
        """Runs and incidents re-folded from the store because of a late event."""
        self._lock = asyncio.Lock()
        self._buffer: dict[str, list[dict[str, Any]]] = {}
        self._buffered = 0
        self._pending_position = 0
        self._pending_recorded_at: datetime | None = None
        self._waiter: asyncio.Future[None] | None = None
        # The state of every run/incident this process has written, so a later event can carry
        # the earlier fields forward without reading ClickHouse back.
        self._runs: OrderedDict[Key, RunRow] = OrderedDict()
        self._incidents: OrderedDict[Key, IncidentRow] = OrderedDict()
        self._ticker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Create the schema, read the projected position back and start the interval flush."""
        await schema.migrate(self.ch)
        await self._load_position()
        if self._ticker is None:
            self._ticker = asyncio.create_task(self._tick(), name="audit-projector-flush")

    async def close(self) -> None:
        """Stop the interval flush and write what is buffered."""
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        try:
            await self.flush()
        except MissionControlError as exc:
            log.warning("audit.final_flush_failed", error=str(exc))

    async def add(self, envs: Sequence[EventEnvelope]) -> asyncio.Future[None]:
        """Project ``envs`` into the buffer; the future resolves once they are written."""
        async with self._lock:
            p = await self._project_locked(envs)
            for table, rows in p.rows.items():
                if rows:
                    self._buffer.setdefault(table, []).extend(rows)
            self._buffered += p.count()
            if p.last_position >= self._pending_position:
                self._pending_position = p.last_position
                self._pending_recorded_at = p.last_recorded_at
            if self._waiter is None:
                self._waiter = asyncio.get_running_loop().create_future()
            waiter = self._waiter
            if self._buffered >= self.flush_rows:
                # The failure reaches the caller through the future (and is logged there).
                with contextlib.suppress(MissionControlError):
                    await self._flush_locked()
            return waiter

    async def project_now(self, envs: Sequence[EventEnvelope]) -> None:
        """Project ``envs`` and wait until they are written (raises the flush's error)."""
        fut = await self.add(envs)
        await self.flush()
        await fut

    async def flush(self) -> None:
        """Write everything buffered now."""
        async with self._lock:
            await self._flush_locked()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            if not (self._buffered or self._waiter):
                continue
            try:
                await self.flush()
            except MissionControlError as exc:
                log.warning("audit.flush_failed", error=str(exc))

    async def _flush_locked(self) -> None:
        buffer, self._buffer = self._buffer, {}
        waiter, self._waiter = self._waiter, None
        position, recorded_at = self._pending_position, self._pending_recorded_at
        self._buffered = 0
        if not buffer and waiter is None:
            return
        try:
            for table in WRITE_ORDER:
                rows = buffer.get(table)
                if rows:
                    await self.ch.insert(f"{schema.DATABASE}.{table}", list(rows[0]), rows)
            if position > self.projected_position:
                await self.ch.insert(
                    f"{schema.DATABASE}.projection_state",
                    ("name", "position", "recorded_at"),
                    [{"name": PROJECTOR, "position": position, "recorded_at": recorded_at}],
                )
        except BaseException as exc:
            # The cached states include rows that may not have been written: forget them and
            # read ClickHouse again when the redelivered events come back.
            self._runs.clear()
            self._incidents.clear()
            self._pending_position = self.projected_position
            self._pending_recorded_at = self.last_recorded_at
            if waiter is not None and not waiter.done():
                if isinstance(exc, Exception):
                    waiter.set_exception(exc)
                else:
                    waiter.cancel()
            raise
        if position > self.projected_position:
            self.projected_position = position
            self.last_recorded_at = recorded_at
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        _trim(self._runs, self.cache_limit)
        _trim(self._incidents, self.cache_limit)

    async def _project_locked(self, envs: Sequence[EventEnvelope]) -> Projection:
        """Project ``envs`` from the cached states, re-folding the entities with late events."""
        await self._load_state(envs)
        p = project(envs, self._runs, self._incidents)
        if p.refold_runs or p.refold_incidents:
            await self._refold(p)
        self._runs.update(p.runs)
        self._incidents.update(p.incidents)
        return p

    async def _refold(self, p: Projection) -> None:
        """Fold the runs and incidents ``p`` names afresh from their whole stream in the store.

        The stream holds every event of the entity, the late one and any not delivered yet
        included, so the row written is the one a rebuild would write. Its ``version`` is the
        newest position folded, never below the row it replaces.
        """
        run_streams = {run_stream(*k): k for k in p.refold_runs}
        incident_streams = {incident_stream(*k): k for k in p.refold_incidents}
        wanted = sorted([*run_streams, *incident_streams])
        read: dict[str, list[EventEnvelope]] = {}
        for i in range(0, len(wanted), REFOLD_READ_CHUNK):
            chunk = wanted[i : i + REFOLD_READ_CHUNK]
            async with transaction(self.store.pool) as conn:
                read.update(await self.store.read_streams([(s, 1) for s in chunk], conn=conn))
        runs: dict[Key, RunRow] = {}
        for sid, key in run_streams.items():
            run = refold_run(read.get(sid, []))
            if run is not None:
                runs[key] = run
        incidents: dict[Key, IncidentRow] = {}
        for sid, key in incident_streams.items():
            incident = refold_incident(read.get(sid, []))
            if incident is not None:
                incidents[key] = incident
        self.refolds += len(runs) + len(incidents)
        log.info("audit.refolded_late_events", runs=len(runs), incidents=len(incidents))
        p.apply_refolds(runs, incidents)

    async def _load_state(self, envs: Sequence[EventEnvelope]) -> None:
        """Read the current rows of runs/incidents the batch touches that are not cached."""
        runs = {k for k in map(run_key, envs) if k is not None and k not in self._runs}
        if runs:
            # By full key, so the read uses the primary index instead of scanning every run.
            rows = await self.ch.query(
                f"SELECT * FROM {schema.DATABASE}.runs FINAL "
                "WHERE (tenant_id, run_id) IN {keys:Array(Tuple(String, String))}",
                {"keys": sorted(runs)},
            )
            for row in rows:
                key = (row["tenant_id"], row["run_id"])
                if key in runs:
                    self._runs[key] = RunRow.from_row(row)
        incidents = {k for k in map(incident_key, envs) if k is not None}
        incidents -= self._incidents.keys()
        if incidents:
            rows = await self.ch.query(
                f"SELECT * FROM {schema.DATABASE}.incidents FINAL "
                "WHERE (tenant_id, incident_id) IN {keys:Array(Tuple(String, String))}",
                {"keys": sorted(incidents)},
            )
            for row in rows:
                key = (row["tenant_id"], row["incident_id"])
                if key in incidents:
                    self._incidents[key] = IncidentRow.from_row(row)

    async def _load_position(self) -> None:
        rows = await self.ch.query(
            f"SELECT position, recorded_at FROM {schema.DATABASE}.projection_state FINAL "
            "WHERE name = {name:String}",
            {"name": PROJECTOR},
        )
        if rows:
            self.projected_position = int(rows[0]["position"])
            self.last_recorded_at = parse_ts(rows[0]["recorded_at"])
            self._pending_position = self.projected_position
            self._pending_recorded_at = self.last_recorded_at

    async def rebuild(
        self, store: EventStore, *, batch: int = 5_000, progress_every: int = 50_000
    ) -> dict[str, Any]:
        """Drop every table, re-create them and project the whole event store again.

        Raises :class:`~libs.errors.Conflict` while another rebuild is running. Queries refuse to
        answer from the moment this starts (see ``entrypoints``), before the tables are dropped.
        """
        if self.rebuilding:
            raise Conflict("a rebuild of the projections is already running")
        started = time.monotonic()
        counts: dict[str, int] = {}
        events = 0
        next_log = progress_every
        # Set before waiting for the lock: from here on the tables may be dropped at any moment.
        self.rebuilding = True
        self.rebuilds_started += 1
        try:
            async with self._lock:
                # Whatever the consumer buffered is written (and acked) before the drop; the
                # rebuild then covers it again from the store.
                await self._flush_locked()
                self._runs.clear()
                self._incidents.clear()
                await schema.drop_all(self.ch)
                await schema.migrate(self.ch)
                self.projected_position = 0
                self.last_recorded_at = None
                self._pending_position = 0
                self._pending_recorded_at = None
                log.info("audit.rebuild_started")
                async for envs in store.iter_all(batch=batch):
                    p = await self._project_locked(envs)
                    for table, rows in p.rows.items():
                        counts[table] = counts.get(table, 0) + len(rows)
                        if rows:
                            self._buffer.setdefault(table, []).extend(rows)
                    self._pending_position = p.last_position
                    self._pending_recorded_at = p.last_recorded_at
                    await self._flush_locked()
                    events += len(envs)
                    if events >= next_log:
                        log.info(
                            "audit.rebuild_progress",
                            events=events,
                            position=self.projected_position,
                            seconds=round(time.monotonic() - started, 2),
                        )
                        next_log += progress_every
        finally:
            self.rebuilding = False
        duration = time.monotonic() - started
        log.info("audit.rebuild_finished", events=events, seconds=round(duration, 2))
        return {
            "events": events,
            "rows": counts,
            "position": self.projected_position,
            "duration_s": round(duration, 3),
        }


def _trim(cache: OrderedDict[Key, V], limit: int) -> None:
    # Only called right after a successful flush, so evicted states are all in ClickHouse.
    while len(cache) > limit:
        cache.popitem(last=False)


class ProjectionConsumer(BatchEventConsumer):
    """The JetStream side of the projector: batches in, acks after the flush that wrote them.

    Acks are settled in background tasks, so the next batch is fetched and projected while the
    previous one waits for its flush (up to ``max_ack_pending`` messages in flight).
    """

    def __init__(self, js: JetStreamContext, projector: Projector) -> None:
        super().__init__(js, consumer_spec(), projector.project_now)
        self.projector = projector
        self._settling: set[asyncio.Task[None]] = set()

    async def handle_batch(self, msgs: list[Msg]) -> None:
        """Project a fetched batch; ack or retry each message once its flush is known."""
        parsed = await self.parse_batch(msgs)
        if not parsed:
            return
        good = [m for m, _ in parsed]
        envs = [e for _, e in parsed]
        try:
            fut = await self.projector.add(envs)
        except Exception as exc:
            log.warning("audit.project_failed", error=str(exc)[:300], messages=len(good))
            for m in good:
                await self.fail(m, exc)
            return
        task = asyncio.create_task(self._settle(good, envs, fut))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _settle(
        self, msgs: list[Msg], envs: list[EventEnvelope], fut: asyncio.Future[None]
    ) -> None:
        try:
            await fut
        except Exception as exc:
            for m in msgs:
                with contextlib.suppress(Exception):
                    await self.fail(m, exc)
            return
        for m, e in zip(msgs, envs, strict=True):
            with contextlib.suppress(Exception):
                await m.ack()
            self.stats.applied += 1
            self.stats.last_position = max(self.stats.last_position, e.position or 0)

    async def drain(self) -> None:
        """Wait until every batch handed to the projector has been acked or sent back."""
        while self._settling:
            await asyncio.gather(*list(self._settling), return_exceptions=True)


class LagMonitor:
    """Keeps ``mc_projection_lag_events`` and ``mc_projection_lag_seconds`` current."""

    def __init__(
        self, projector: Projector, store: EventStore, registry: CollectorRegistry
    ) -> None:
        self.projector = projector
        self.store = store
        self.lag_events = Gauge(
            "mc_projection_lag_events",
            "Events in the store not yet projected (store head - projected position).",
            registry=registry,
        )
        self.lag_seconds = Gauge(
            "mc_projection_lag_seconds",
            "Seconds since the last projected event was recorded, while behind the store.",
            registry=registry,
        )

    async def snapshot(self) -> dict[str, Any]:
        """Current positions and lags (also updates the gauges)."""
        head = await self.store.head_position()
        projected = self.projector.projected_position
        behind = max(head - projected, 0)
        seconds = 0.0
        last = self.projector.last_recorded_at
        if behind and last is not None:
            seconds = max((datetime.now(UTC) - last).total_seconds(), 0.0)
        self.lag_events.set(behind)
        self.lag_seconds.set(seconds)
        return {
            "head_position": head,
            "projected_position": projected,
            "lag_events": behind,
            "lag_seconds": round(seconds, 3),
            "rebuilding": self.projector.rebuilding,
        }

    async def run(self, interval: float = 1.0) -> None:
        """Poll the store head every ``interval`` seconds until cancelled."""
        while True:
            try:
                await self.snapshot()
            except MissionControlError as exc:
                log.warning("audit.lag_poll_failed", error=str(exc))
            await asyncio.sleep(interval)


_HISTORY_COLUMNS = (
    "position, event_id, event_type, schema_version, tenant_id, stream_id, stream_version, "
    "occurred_at, recorded_at, correlation_id, causation_id, actor, trace_context, payload"
)


async def read_run_history(
    pool: AsyncConnectionPool,
    tenant_id: str,
    run_id: str,
    *,
    at_position: int | None = None,
    at_version: int | None = None,
) -> list[EventEnvelope]:
    """Every stored event about one run, in store order, up to a point.

    The run, its decisions and its costs live in streams named after the run; its incidents in
    streams named after each incident, found by the run id their ``incident.opened`` carries.
    ``at_version`` is a version of the run stream, turned into the position of that event.
    """
    run_stream = stream_id_for(tenant_id, "run", run_id)
    streams = [
        run_stream,
        stream_id_for(tenant_id, "decisions", run_id),
        stream_id_for(tenant_id, "cost", run_id),
    ]
    async with transaction(pool) as conn:
        limit = at_position
        if at_version is not None:
            cur = await conn.execute(
                "SELECT position FROM eventstore.events WHERE stream_id = %s "
                "AND stream_version = %s",
                (run_stream, at_version),
            )
            found = await cur.fetchone()
            if found is None:
                raise InvalidInput(f"at_version {at_version} does not exist in run {run_id}")
            pos = int(found["position"])
            limit = pos if limit is None else min(limit, pos)
        cur = await conn.execute(
            f"SELECT {_HISTORY_COLUMNS} FROM eventstore.events WHERE tenant_id = %s "
            "AND position <= %s AND (stream_id = ANY(%s) OR stream_id IN ("
            "  SELECT stream_id FROM eventstore.events WHERE tenant_id = %s"
            "  AND event_type = 'incident.opened' AND payload->>'run_id' = %s)) "
            "ORDER BY position",
            (tenant_id, limit if limit is not None else 2**62, streams, tenant_id, run_id),
        )
        return [row_to_envelope(r) for r in await cur.fetchall()]
