"""The projector: events from JetStream (or the store, for a rebuild) into ClickHouse.

Events arrive in two lanes (see :mod:`services.audit_replay.lanes`), so a stop or an incident is
never queued behind a burst of step events. Each lane buffers its rows per table and writes them
with one INSERT per table per flush; a flush happens when the lane's buffer holds ``flush_rows``
rows, every ``flush_interval`` seconds, and at shutdown. A message is acknowledged only after the
flush that contains its rows succeeded, so a crash loses nothing: un-acked messages are
redelivered and, because every table is an upsert keyed by identity and versioned by store
position, the duplicates disappear.

Runs and incidents are folded from events of both lanes. The fold runs under one lock over one
cache of entity states, and a lane's flush writes the *current* cached state of the entities its
events touched (snapshot and insert under one lock, so the row written last always holds every
event folded so far), whichever lane the events came through.

Events do not always arrive in store order: the lanes interleave, a failed batch is sent back
with a delay while later batches flow, and the relay may publish out of order after a partial
failure. A run or incident event older than the row it belongs to, and not provably folded in
already, makes the projector re-fold that entity from its stream in the event store
(:meth:`Projector._refold`), so a late ``run.started`` or step is never lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple, TypeVar

import orjson
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from prometheus_client import CollectorRegistry, Gauge

from libs.contracts.envelope import EventEnvelope, stream_id_for
from libs.contracts.subjects import EVENTS_STREAM
from libs.errors import Conflict, InvalidInput, MissionControlError, TransientError
from libs.eventbus.consumer import BatchEventConsumer
from libs.eventbus.db import transaction
from libs.eventbus.store import EventStore
from services.audit_replay import schema
from services.audit_replay.clickhouse import TENANT, Clickhouse, tenant_filter
from services.audit_replay.domain import (
    IncidentRow,
    Key,
    Projection,
    RunRow,
    StepFacts,
    incident_key,
    incident_stream,
    parse_ts,
    project,
    project_steps,
    refold_incident,
    refold_run,
    run_key,
    run_stream,
)
from services.audit_replay.lanes import LANES, LEGACY_DURABLE, Lane, lane_of

log = structlog.get_logger("audit.projector")

# Tables with one row per event, in write order. Writing the raw log first means a half-written
# flush leaves the log ahead of the projections, never behind. Runs and incidents (entity states)
# are written after them.
EVENT_TABLES = ("events", "steps", "decisions", "policies", "costs")
# Streams read back per store round trip when re-folding entities that received late events.
REFOLD_READ_CHUNK = 200

V = TypeVar("V")


@dataclass
class _LaneState:
    """What one lane has buffered, is writing, and has written."""

    lane: Lane
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    runs: set[Key] = field(default_factory=set)
    incidents: set[Key] = field(default_factory=set)
    inbox: list[bytes] = field(default_factory=list)
    """Envelope JSON lines for the ClickHouse inbox, which builds their rows itself."""
    count: int = 0
    position: int = 0
    recorded_at: datetime | None = None
    waiter: asyncio.Future[None] | None = None
    writing_runs: set[Key] = field(default_factory=set)
    writing_incidents: set[Key] = field(default_factory=set)
    flushed_position: int = 0
    """Every event of this lane up to here is written (events of a lane arrive in store order)."""
    flushed_recorded_at: datetime | None = None
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    urgent: bool = False
    """The buffer holds an event outside the lane's relaxed types: write at the short interval."""
    last_flush: float = 0.0

    def take(self) -> _LaneState:
        """Hand the buffer over to a flush and start an empty one."""
        taken = _LaneState(
            self.lane, self.rows, self.runs, self.incidents, self.inbox, self.count,
            self.position, self.recorded_at, self.waiter,
        )  # fmt: skip
        self.rows, self.runs, self.incidents, self.inbox = {}, set(), set(), []
        self.count, self.waiter, self.urgent = 0, None, False
        return taken

    def fail(self, exc: BaseException) -> None:
        """Drop the buffer; the messages behind it are sent back by the waiter's failure."""
        taken = self.take()
        self.position, self.recorded_at = self.flushed_position, self.flushed_recorded_at
        _settle(taken.waiter, exc)


def _settle(waiter: asyncio.Future[None] | None, exc: BaseException | None) -> None:
    if waiter is None or waiter.done():
        return
    if exc is None:
        waiter.set_result(None)
    elif isinstance(exc, Exception):
        waiter.set_exception(exc)
    else:
        waiter.cancel()


class Projector:
    """Buffers projected rows per lane and writes them to ClickHouse in batches.

    :meth:`add` projects a batch of envelopes of one lane and returns a future that completes
    when the flush holding their rows has succeeded (or fails with the flush's error). Folding
    and the entity caches are guarded by one lock, so a rebuild can run while the consumers are
    live. ``store`` is where runs and incidents that received a late event are re-folded from.
    """

    def __init__(
        self,
        ch: Clickhouse,
        store: EventStore,
        *,
        lanes: Sequence[Lane] = LANES,
        cache_limit: int = 50_000,
    ) -> None:
        self.ch = ch
        self.store = store
        self.cache_limit = cache_limit
        self.projected_position = 0
        """Every event of the store up to here is projected (see :meth:`refresh_position`)."""
        self.last_recorded_at: datetime | None = None
        self.rebuilding = False
        self.rebuilds_started = 0
        """Rebuilds begun by this process: a query that saw it change read half-built tables."""
        self.writes = 0
        """Writes to the tables (flushes and rebuilds, failed ones included): see
        :attr:`data_version`."""
        self.refolds = 0
        """Runs and incidents re-folded from the store because of a late event."""
        self._lock = asyncio.Lock()
        self._entity_lock = asyncio.Lock()
        self._lanes = {lane.name: _LaneState(lane) for lane in lanes}
        self._generation = 0
        # The state of every run/incident folded so far, so a later event can carry the earlier
        # fields forward without reading ClickHouse back.
        self._runs: OrderedDict[Key, RunRow] = OrderedDict()
        self._incidents: OrderedDict[Key, IncidentRow] = OrderedDict()
        self._tickers: list[asyncio.Task[None]] = []

    @property
    def data_version(self) -> tuple[int, int]:
        """Moves whenever what the projection tables hold may have changed.

        The lanes' flushed positions are not enough: an event that arrives late (below its lane's
        position) is written, and its run re-folded, without moving them, and a flush that fails
        half-way has written some tables. So every flush and rebuild counts, once its writes are
        done (or have failed): an answer computed after this moved has read them. The first
        member, the rebuilds begun, is the epoch no kept answer crosses
        (:mod:`services.audit_replay.answers`).
        """
        return (self.rebuilds_started, self.writes)

    async def start(self) -> None:
        """Create the schema, read the projected positions back and start the interval flushes."""
        await schema.migrate(self.ch)
        await self._load_positions()
        await self.refresh_position()
        if not self._tickers:
            self._tickers = [
                asyncio.create_task(self._tick(state), name=f"audit-flush-{name}")
                for name, state in self._lanes.items()
            ]

    async def close(self) -> None:
        """Stop the interval flushes and write what is buffered."""
        for t in self._tickers:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tickers = []
        for name in self._lanes:
            try:
                await self.flush(name)
            except MissionControlError as exc:
                log.warning("audit.final_flush_failed", lane=name, error=str(exc))

    # --- projecting ------------------------------------------------------------------------------

    async def add(
        self,
        lane: str,
        envs: Sequence[EventEnvelope],
        inbox: Sequence[InboxItem] = (),
    ) -> asyncio.Future[None]:
        """Project ``envs`` into ``lane``'s buffer; the future resolves once they are written.

        ``inbox`` holds events whose rows ClickHouse builds from their JSON (see
        :func:`inbox_item`): only their runs and incidents are folded here.
        """
        state = self._lanes[lane]
        urgent = bool(inbox) or any(e.event_type not in state.lane.relaxed_events for e in envs)
        async with self._lock:
            projections = []
            if envs:
                projections.append(await self._project_locked(envs))
            if inbox:
                p = await self._project_steps_locked([i.step for i in inbox if i.step])
                last = max(inbox, key=lambda i: i.position)
                p.last_position, p.last_recorded_at = last.position, last.recorded_at
                projections.append(p)
                state.inbox.extend(i.raw for i in inbox)
                state.count += len(inbox)
            for p in projections:
                for table in EVENT_TABLES:
                    rows = p.rows.get(table)
                    if rows:
                        state.rows.setdefault(table, []).extend(rows)
                        state.count += len(rows)
                state.runs.update(p.runs)
                state.incidents.update(p.incidents)
                state.count += len(p.runs) + len(p.incidents)
                if p.last_position >= state.position:
                    state.position, state.recorded_at = p.last_position, p.last_recorded_at
            # Set with the rows, between awaits, so a flush taking the buffer takes both.
            state.urgent = state.urgent or urgent
            if state.waiter is None:
                state.waiter = asyncio.get_running_loop().create_future()
            waiter = state.waiter
            full = state.count >= state.lane.flush_rows
        if full:
            # The failure reaches the caller through the future (and is logged there).
            with contextlib.suppress(MissionControlError):
                await self.flush(lane)
        return waiter

    async def project_now(self, envs: Sequence[EventEnvelope]) -> None:
        """Project ``envs`` in their order, each through its lane, and wait until written."""
        default = next(iter(self._lanes))
        runs: list[tuple[str, list[EventEnvelope]]] = []
        for env in envs:
            name = lane_of(env.event_type).name
            name = name if name in self._lanes else default
            if runs and runs[-1][0] == name:
                runs[-1][1].append(env)
            else:
                runs.append((name, [env]))
        futures = [await self.add(name, batch) for name, batch in runs]
        await self.flush()
        for fut in futures:
            await fut

    async def _project_locked(self, envs: Sequence[EventEnvelope]) -> Projection:
        """Project ``envs`` from the cached states, re-folding the entities with late events."""
        runs = {k for k in map(run_key, envs) if k is not None}
        await self._load_state(runs, {k for k in map(incident_key, envs) if k is not None})
        p = project(envs, self._runs, self._incidents)
        return await self._settle_projection(p)

    async def _project_steps_locked(self, steps: Sequence[StepFacts]) -> Projection:
        """Fold bulk steps into their runs (see :func:`project_steps`)."""
        await self._load_state({(s.tenant_id, s.run_id) for s in steps}, set())
        return await self._settle_projection(project_steps(steps, self._runs))

    async def _settle_projection(self, p: Projection) -> Projection:
        """Re-fold what ``p`` names and take its states into the caches."""
        if p.refold_runs or p.refold_incidents:
            await self._refold(p)
        for k, r in p.runs.items():
            self._runs[k] = r
            self._runs.move_to_end(k)
        for ik, i in p.incidents.items():
            self._incidents[ik] = i
            self._incidents.move_to_end(ik)
        return p

    # --- writing ---------------------------------------------------------------------------------

    async def flush(self, lane: str | None = None) -> None:
        """Write what ``lane`` (every lane when ``None``) has buffered now."""
        for name in [lane] if lane is not None else list(self._lanes):
            state = self._lanes[name]
            async with state.write_lock:
                await self._flush_lane(state)

    async def _tick(self, state: _LaneState) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(state.lane.flush_interval)
            if not (state.count or state.waiter):
                continue
            relaxed = not state.urgent and state.lane.relaxed_events
            if relaxed and loop.time() - state.last_flush < state.lane.relaxed_interval:
                continue
            state.last_flush = loop.time()
            try:
                async with state.write_lock:
                    await self._flush_lane(state)
            except MissionControlError as exc:
                log.warning("audit.flush_failed", lane=state.lane.name, error=str(exc))

    async def _flush_lane(self, state: _LaneState) -> None:
        """Write one lane's buffer (the caller holds the lane's write lock)."""
        taken = state.take()
        if not taken.count and taken.waiter is None:
            return
        generation = self._generation
        state.writing_runs, state.writing_incidents = taken.runs, taken.incidents
        try:
            if taken.inbox:
                await self.ch.insert_json(
                    f"{schema.DATABASE}.inbox",
                    None,
                    b"\n".join(taken.inbox),
                    schema.INBOX_FORMAT_SETTINGS,
                )
            for table in EVENT_TABLES:
                rows = taken.rows.get(table)
                if rows:
                    await self.ch.insert(f"{schema.DATABASE}.{table}", list(rows[0]), rows)
            await self._write_entities(taken.runs, taken.incidents, generation)
        except BaseException as exc:
            self._reset(exc)
            _settle(taken.waiter, exc)
            raise
        finally:
            state.writing_runs, state.writing_incidents = set(), set()
            self.writes += 1
        if taken.position > state.flushed_position:
            state.flushed_position, state.flushed_recorded_at = taken.position, taken.recorded_at
        _settle(taken.waiter, None)
        self._trim()

    async def _write_entities(self, runs: set[Key], incidents: set[Key], generation: int) -> None:
        """Write the current state of ``runs`` and ``incidents``.

        Under one lock from snapshot to insert, so of two lanes writing the same run, the one
        that writes last wrote the newer state (equal versions keep the last insert).
        """
        if not (runs or incidents):
            return
        async with self._entity_lock:
            if generation != self._generation:
                # A failed flush dropped the cached states these keys point at.
                raise TransientError("projection state was reset by a failed flush; retrying")
            run_rows = [asdict(self._runs[k]) for k in runs if k in self._runs]
            incident_rows = [asdict(self._incidents[k]) for k in incidents if k in self._incidents]
            if run_rows:
                await self.ch.insert(f"{schema.DATABASE}.runs", list(run_rows[0]), run_rows)
            if incident_rows:
                await self.ch.insert(
                    f"{schema.DATABASE}.incidents", list(incident_rows[0]), incident_rows
                )

    def _reset(self, exc: BaseException) -> None:
        """After a failed write: forget every cached state and send back every lane's buffer.

        The cached states include folds whose rows may not have been written; ClickHouse is read
        again when the redelivered events come back.
        """
        self._generation += 1
        self._runs.clear()
        self._incidents.clear()
        for state in self._lanes.values():
            state.fail(exc)

    def _trim(self) -> None:
        # Only states no lane still has to write may go: evicted states are all in ClickHouse.
        busy_runs: set[Key] = set()
        busy_incidents: set[Key] = set()
        for s in self._lanes.values():
            busy_runs |= s.runs | s.writing_runs
            busy_incidents |= s.incidents | s.writing_incidents
        _trim(self._runs, self.cache_limit, busy_runs)
        _trim(self._incidents, self.cache_limit, busy_incidents)

    # --- reading state back ----------------------------------------------------------------------

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

    async def _load_state(self, runs: set[Key], incidents: set[Key]) -> None:
        """Read the current rows of ``runs``/``incidents`` that are not cached."""
        runs = runs - self._runs.keys()
        if runs:
            # By full key, so the read uses the primary index instead of scanning every run.
            rows = await self.ch.select(
                tenant_filter(*{t for t, _ in runs}),
                f"SELECT * FROM {schema.DATABASE}.runs FINAL WHERE {TENANT} "
                "AND (tenant_id, run_id) IN {keys:Array(Tuple(String, String))}",
                {"keys": sorted(runs)},
            )
            for row in rows:
                key = (row["tenant_id"], row["run_id"])
                if key in runs:
                    self._runs[key] = RunRow.from_row(row)
        incidents = incidents - self._incidents.keys()
        if incidents:
            rows = await self.ch.select(
                tenant_filter(*{t for t, _ in incidents}),
                f"SELECT * FROM {schema.DATABASE}.incidents FINAL WHERE {TENANT} "
                "AND (tenant_id, incident_id) IN {keys:Array(Tuple(String, String))}",
                {"keys": sorted(incidents)},
            )
            for row in rows:
                key = (row["tenant_id"], row["incident_id"])
                if key in incidents:
                    self._incidents[key] = IncidentRow.from_row(row)

    # --- positions -------------------------------------------------------------------------------

    async def _load_positions(self) -> None:
        """Each lane's position: the newest of its events in the raw log.

        Every flush writes the raw log first, so this is where the lane got to, and no flush
        pays for an extra insert to record it (with chDB every insert costs milliseconds of CPU
        whatever its size).
        """
        for state in self._lanes.values():
            # The newest position of the lane's events, over every tenant: no tenant's rows.
            rows = await self.ch.query_all_tenants(
                "SELECT max(position) AS last, argMax(recorded_at, position) AS last_recorded_at "
                f"FROM {schema.DATABASE}.events WHERE event_type IN {{types:Array(String)}}",
                {"types": sorted(state.lane.event_types)},
            )
            if rows and int(rows[0]["last"]):
                state.flushed_position = state.position = int(rows[0]["last"])
                state.flushed_recorded_at = parse_ts(rows[0]["last_recorded_at"])
                state.recorded_at = state.flushed_recorded_at

    async def refresh_position(self) -> int:
        """Work out :attr:`projected_position` from the lanes' positions and the store.

        Each lane has written its own events up to its position; the whole log is projected up
        to just before the first event some lane has yet to write (or to the store's head when
        no lane has one).
        """
        pending: list[tuple[int, _LaneState]] = []
        for state in self._lanes.values():
            nxt = await self.store.first_position_after(
                state.flushed_position, sorted(state.lane.event_types)
            )
            if nxt is not None:
                pending.append((nxt - 1, state))
        if pending:
            position, behind = min(pending, key=lambda x: x[0])
            recorded_at = behind.flushed_recorded_at
        else:
            position = await self.store.head_position()
            recorded_at = max(
                (s.flushed_recorded_at for s in self._lanes.values() if s.flushed_recorded_at),
                default=None,
            )
        if position >= self.projected_position:
            self.projected_position = position
            self.last_recorded_at = recorded_at
        return self.projected_position

    # --- rebuilding ------------------------------------------------------------------------------

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
            async with contextlib.AsyncExitStack() as stack:
                await stack.enter_async_context(self._lock)
                for state in self._lanes.values():
                    await stack.enter_async_context(state.write_lock)
                    # Whatever the consumers buffered is written (and acked) before the drop;
                    # the rebuild then covers it again from the store.
                    await self._flush_lane(state)
                self._runs.clear()
                self._incidents.clear()
                await schema.drop_all(self.ch)
                await schema.migrate(self.ch)
                self.projected_position = 0
                self.last_recorded_at = None
                last, last_at = 0, None
                log.info("audit.rebuild_started")
                async for envs in store.iter_all(batch=batch):
                    p = await self._project_locked(envs)
                    for table, rows in p.rows.items():
                        counts[table] = counts.get(table, 0) + len(rows)
                    await self._write_projection(p)
                    last, last_at = p.last_position, p.last_recorded_at
                    events += len(envs)
                    self._trim()
                    if events >= next_log:
                        log.info(
                            "audit.rebuild_progress",
                            events=events,
                            position=last,
                            seconds=round(time.monotonic() - started, 2),
                        )
                        next_log += progress_every
                for s in self._lanes.values():
                    s.flushed_position = s.position = last
                    s.flushed_recorded_at = s.recorded_at = last_at
                self.projected_position, self.last_recorded_at = last, last_at
        finally:
            self.writes += 1
            self.rebuilding = False
        duration = time.monotonic() - started
        log.info("audit.rebuild_finished", events=events, seconds=round(duration, 2))
        return {
            "events": events,
            "rows": counts,
            "position": self.projected_position,
            "duration_s": round(duration, 3),
        }

    async def _write_projection(self, p: Projection) -> None:
        for table in (*EVENT_TABLES, "runs", "incidents"):
            rows = p.rows.get(table)
            if rows:
                await self.ch.insert(f"{schema.DATABASE}.{table}", list(rows[0]), rows)


def _trim(cache: OrderedDict[Key, V], limit: int, keep: set[Key]) -> None:
    excess = len(cache) - limit
    if excess <= 0:
        return
    for key in list(cache)[: excess + len(keep)]:
        if excess <= 0:
            break
        if key not in keep:
            del cache[key]
            excess -= 1


class ProjectionConsumer(BatchEventConsumer):
    """One lane's JetStream side of the projector: batches in, acks after the flush that wrote them.

    Acks are settled in background tasks, so the next batch is fetched and projected while the
    previous one waits for its flush (up to ``max_ack_pending`` messages in flight).
    """

    def __init__(self, js: JetStreamContext, projector: Projector, lane: Lane) -> None:
        super().__init__(js, lane.spec(), projector.project_now)
        self.projector = projector
        self.lane = lane
        # Only a lane carrying inbox event types looks for them (one JSON parse per message).
        self._inbox = bool(lane.event_types & schema.INBOX_EVENT_TYPES.keys())
        self._settling: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Bring the durable consumer to this lane's subjects, then consume until stopped."""
        await prepare_lane(self.js, self.lane)
        await super().run()

    async def handle_batch(self, msgs: list[Msg]) -> None:
        """Project a fetched batch; ack or retry each message once its flush is known."""
        inbox: list[tuple[Msg, InboxItem]] = []
        rest: list[Msg] = []
        for m in msgs:
            item = inbox_item(m.data) if self._inbox else None
            if item is not None:
                inbox.append((m, item))
            else:
                rest.append(m)
        parsed = await self.parse_batch(rest)
        if not (parsed or inbox):
            return
        good = [m for m, _ in parsed] + [m for m, _ in inbox]
        positions = [e.position or 0 for _, e in parsed] + [i.position for _, i in inbox]
        try:
            fut = await self.projector.add(
                self.lane.name, [e for _, e in parsed], [item for _, item in inbox]
            )
        except Exception as exc:
            log.warning("audit.project_failed", error=str(exc)[:300], messages=len(good))
            for m in good:
                await self.fail(m, exc)
            return
        task = asyncio.create_task(self._settle(good, positions, fut))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _settle(
        self, msgs: list[Msg], positions: list[int], fut: asyncio.Future[None]
    ) -> None:
        try:
            await fut
        except Exception as exc:
            for m in msgs:
                with contextlib.suppress(Exception):
                    await self.fail(m, exc)
            return
        for m in msgs:
            with contextlib.suppress(Exception):
                await m.ack()
        self.stats.applied += len(msgs)
        self.stats.last_position = max(self.stats.last_position, *positions)

    async def drain(self) -> None:
        """Wait until every batch handed to the projector has been acked or sent back."""
        while self._settling:
            await asyncio.gather(*list(self._settling), return_exceptions=True)


class InboxItem(NamedTuple):
    """A bulk event bound for the ClickHouse inbox, with what the projector needs of it."""

    position: int
    recorded_at: datetime | None
    step: StepFacts | None
    """What the run fold reads, for a recorded step (``None`` for events that fold nothing)."""
    raw: bytes
    """The envelope JSON, as it arrived."""


def inbox_item(data: bytes) -> InboxItem | None:
    """A bulk event's JSON, read just enough to fold it; ClickHouse builds its rows.

    Only for the event types and schema versions the inbox views know
    (:data:`schema.INBOX_EVENT_TYPES`); ``None`` for anything else, or anything that does not
    have the fields the fold reads, which then takes the validating path (and its dead-letter
    path). The event was validated when it was appended; validating its envelope and payload
    again with pydantic would be the largest cost per event here.
    """
    try:
        d = orjson.loads(data)
        event_type = d["event_type"]
        if d["schema_version"] not in schema.INBOX_EVENT_TYPES.get(event_type, ()):
            return None
        position = d["position"]
        tenant_id, stream_id = d["tenant_id"], d["stream_id"]
        recorded = d.get("recorded_at")
        recorded_at = datetime.fromisoformat(recorded) if recorded else None
        if not (isinstance(position, int) and isinstance(tenant_id, str)):
            return None
        step = None
        if event_type == "run.step_recorded":
            p = d["payload"]
            run_id, agent_id, step_index = p["run_id"], p["agent_id"], p["step_index"]
            version = d["stream_version"]
            if not (
                isinstance(run_id, str)
                and isinstance(agent_id, str)
                and isinstance(step_index, int)
                and isinstance(version, int)
                and isinstance(stream_id, str)
            ):
                return None
            step = StepFacts(tenant_id, run_id, agent_id, step_index, position, stream_id, version)
    except (KeyError, TypeError, ValueError, orjson.JSONDecodeError):
        return None
    return InboxItem(position, recorded_at, step, data)


async def prepare_lane(js: JetStreamContext, lane: Lane) -> None:
    """Remove the single consumer of earlier builds, which the lanes replace.

    The lane's own durable is created, or brought to the lane's subjects while keeping its
    position, by the consumer's start (JetStream updates a durable's filter subjects in place).
    """
    with contextlib.suppress(NotFoundError):
        await js.delete_consumer(EVENTS_STREAM, LEGACY_DURABLE)


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
        projected = await self.projector.refresh_position()
        head = await self.store.head_position()
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


async def replay_limit(
    store: EventStore, stream: str, at_position: int | None, at_version: int | None, what: str
) -> int | None:
    """The store position a replay stops at: ``at_position``, or the position of ``stream``'s
    event at ``at_version`` (the lower of the two when both are given)."""
    limit = at_position
    if at_version is not None:
        pos = await store.position_of(stream, at_version)
        if pos is None:
            raise InvalidInput(f"at_version {at_version} does not exist in {what}")
        limit = pos if limit is None else min(limit, pos)
    return limit


async def read_run_history(
    store: EventStore,
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
    stream = run_stream(tenant_id, run_id)
    limit = await replay_limit(store, stream, at_position, at_version, f"run {run_id}")
    return await store.read_history(
        tenant_id,
        [
            stream,
            stream_id_for(tenant_id, "decisions", run_id),
            stream_id_for(tenant_id, "cost", run_id),
        ],
        linked_by=("incident.opened", "run_id", run_id),
        up_to_position=limit,
    )
