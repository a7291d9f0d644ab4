"""Load runs from the event store, decide, append: the workflow-engine's command handlers.

Runs are loaded by reading ``<tenant>/run/<run_id>`` and folding. A small LRU cache keeps the
latest known state of recently used runs; commands trust it and let the append's
``expected_version`` check it (optimistic concurrency). A cached state can only be *behind* the
stream (it is updated after commits only), so a rejection decided on it is still right, and an
acceptance decided on it fails the version check instead of being written. On that
:class:`~libs.errors.ConcurrencyError` the handler catches up every run of the command in one read
(only the versions it is missing) and tries again. Conflicts that only show the cache was behind
(another replica wrote) are free; conflicts on runs read fresh in the same attempt are genuine
concurrency and are retried up to :attr:`WorkflowHandlers.max_retries` times.
"""

from __future__ import annotations

import asyncio
import random
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import structlog

from libs.contracts import DomainEvent, envelope_for, stream_id_for
from libs.contracts.envelope import EventEnvelope
from libs.contracts.events import PolicyViolationDetected
from libs.contracts.registry import decode
from libs.errors import ConcurrencyError, Conflict, NotFound, PermanentError, TransientError
from libs.eventbus.db import AsyncConn, transaction
from libs.eventbus.rpc import RequestMeta
from libs.eventbus.store import Append, EventStore
from services.workflow_engine.domain import (
    Command,
    FinishRun,
    RecordStep,
    RecordSteps,
    RunState,
    StartRun,
    StopRunForViolation,
    decide,
    empty_run,
    fold,
)

log = structlog.get_logger("workflow_engine")

SERVICE_ACTOR = "service:workflow-engine"


class RunCache:
    """Latest known state of recently used runs, keyed by stream id (LRU, bounded)."""

    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, RunState] = OrderedDict()

    def get(self, stream_id: str) -> RunState | None:
        """The cached state, marking it recently used."""
        state = self._items.get(stream_id)
        if state is not None:
            self._items.move_to_end(stream_id)
        return state

    def put(self, stream_id: str, state: RunState) -> None:
        """Remember ``state`` unless a newer one is already cached (or the run does not exist)."""
        if not state.exists:
            return
        known = self._items.get(stream_id)
        if known is not None and known.version >= state.version:
            return
        self._items[stream_id] = state
        self._items.move_to_end(stream_id)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def drop(self, stream_id: str) -> None:
        """Forget a run."""
        self._items.pop(stream_id, None)

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True)
class Outcome:
    """What one command execution wrote: the stored envelopes and the runs' new states."""

    stored: list[EventEnvelope]
    states: dict[str, RunState]


class WorkflowHandlers:
    """Command and query handlers of the run aggregate."""

    def __init__(self, store: EventStore, *, cache_size: int = 10_000, max_retries: int = 3):
        self.store = store
        self.cache = RunCache(cache_size)
        self.max_retries = max_retries

    # --- commands --------------------------------------------------------------------------------

    async def start_run(
        self,
        tenant_id: str,
        run_id: str,
        agent_id: str,
        labels: Mapping[str, str],
        meta: RequestMeta,
    ) -> dict[str, Any]:
        """Start a run; the reply carries the position of ``run.started``."""
        cmd = StartRun(run_id=run_id, agent_id=agent_id, labels=dict(labels))
        out = await self._execute(tenant_id, {run_id: cmd}, meta, actor_agent={run_id: agent_id})
        state = out.states[run_id]
        return {
            "run_id": run_id,
            "status": state.status,
            "positions": [e.position for e in out.stored],
        }

    async def record_steps(
        self, tenant_id: str, items: Sequence[RecordStep], meta: RequestMeta
    ) -> dict[str, Any]:
        """Record steps of any number of runs in one transaction (all or none).

        ``positions[i]`` is the store position of ``items[i]``.
        """
        by_run: dict[str, list[RecordStep]] = {}
        for item in items:
            by_run.setdefault(item.run_id, []).append(item)
        commands: dict[str, Command] = {
            run_id: RecordSteps(run_id=run_id, steps=tuple(steps))
            for run_id, steps in by_run.items()
        }
        out = await self._execute(tenant_id, commands, meta)
        # Events of one run are stored in the order of its items; map them back to the request.
        stored_by_run: dict[str, list[EventEnvelope]] = {}
        for env in out.stored:
            stored_by_run.setdefault(str(env.payload["run_id"]), []).append(env)
        cursors = {run_id: iter(envs) for run_id, envs in stored_by_run.items()}
        positions = [next(cursors[item.run_id]).position for item in items]
        return {"recorded": len(out.stored), "positions": positions}

    async def finish_run(
        self,
        tenant_id: str,
        run_id: str,
        status: Literal["completed", "failed"],
        reason: str | None,
        meta: RequestMeta,
    ) -> dict[str, Any]:
        """End a run as ``completed`` or ``failed``."""
        cmd = FinishRun(run_id=run_id, status=status, reason=reason)
        out = await self._execute(tenant_id, {run_id: cmd}, meta)
        return {
            "run_id": run_id,
            "status": out.states[run_id].status,
            "positions": [e.position for e in out.stored],
        }

    # --- queries ---------------------------------------------------------------------------------

    async def get_run(self, tenant_id: str, run_id: str) -> RunState:
        """The run's current state (always caught up with the store: reads the newer versions).

        Raises :class:`~libs.errors.NotFound` when the tenant has no such run.
        """
        sid = stream_id_for(tenant_id, "run", run_id)
        state = await self._catch_up(sid, self.cache.get(sid) or empty_run(tenant_id, run_id))
        if not state.exists:
            raise NotFound(f"run {run_id} not found")
        return state

    # --- the violation consumer ------------------------------------------------------------------

    async def on_violation(self, conn: AsyncConn, env: EventEnvelope) -> None:
        """Stop the violating run, in the consumer's transaction (``EventConsumer`` handler)."""
        event = decode(env)
        if not isinstance(event, PolicyViolationDetected):
            raise PermanentError(f"expected policy.violation_detected, got {env.event_type}")
        tenant_id = env.tenant_id
        sid = stream_id_for(tenant_id, "run", event.run_id)
        cmd = StopRunForViolation(
            run_id=event.run_id,
            step_index=event.step_index,
            policy_id=event.policy_id,
            decision_id=event.decision_id,
            reason=event.message,
        )
        state = self.cache.get(sid) or empty_run(tenant_id, event.run_id)
        for _ in range(self.max_retries + 1):
            state = await self._catch_up(sid, state, conn=conn)
            events = decide(state, cmd)
            if not events:
                log.info("workflow.violation_ignored", run_id=event.run_id, status=state.status)
                return
            envelopes = [
                envelope_for(
                    e,
                    tenant_id=tenant_id,
                    stream_id=sid,
                    correlation_id=env.correlation_id,
                    causation_id=str(env.event_id),
                    actor=SERVICE_ACTOR,
                    trace_context=env.trace_context,
                )
                for e in events
            ]
            try:
                # A savepoint, so a version conflict leaves the consumer's transaction usable.
                async with conn.transaction():
                    await self.store.append(
                        sid, envelopes, expected_version=state.version, conn=conn
                    )
            except ConcurrencyError:
                continue
            # The outer transaction has not committed yet: let the next command re-read.
            self.cache.drop(sid)
            log.info(
                "workflow.run_stopped_by_policy",
                run_id=event.run_id,
                step_index=event.step_index,
                policy_id=event.policy_id,
            )
            return
        raise TransientError(f"run {event.run_id} kept changing while being stopped")

    # --- internals -------------------------------------------------------------------------------

    async def _catch_up(
        self, stream_id: str, state: RunState, *, conn: AsyncConn | None = None
    ) -> RunState:
        """``state`` plus the events stored after its version."""
        newer = await self.store.read_stream(stream_id, state.version + 1, conn=conn)
        if not newer:
            return state
        state = fold(state, [decode(e) for e in newer])
        self.cache.put(stream_id, state)
        return state

    async def _catch_up_many(
        self, states: Mapping[str, RunState], *, conn: AsyncConn
    ) -> dict[str, RunState]:
        """Each of ``states`` plus the events stored after its version, in one read."""
        if not states:
            return {}
        newer = await self.store.read_streams(
            [(sid, state.version + 1) for sid, state in states.items()], conn=conn
        )
        out: dict[str, RunState] = {}
        for sid, state in states.items():
            events = newer.get(sid, [])
            if events:
                state = fold(state, [decode(e) for e in events])
                # Read committed: what was read is stored, so the cache stays behind the store.
                self.cache.put(sid, state)
            out[sid] = state
        return out

    async def _execute(
        self,
        tenant_id: str,
        commands: Mapping[str, Command],
        meta: RequestMeta,
        *,
        actor_agent: Mapping[str, str] | None = None,
    ) -> Outcome:
        """Decide ``commands`` (one per run) and append all their events in one transaction.

        A version conflict on a run whose state came from the cache only means the cache was
        behind (another replica wrote to the run): every run of the batch is caught up in one
        read and the batch retried at once, without using the retry budget. Only conflicts on
        runs read fresh in that very attempt are genuine concurrency; after
        :attr:`max_retries` retries of those the caller gets a :class:`~libs.errors.Conflict`.
        """
        refresh_all = False
        retries = 0
        while True:
            fresh: set[str] = set()
            try:
                return await self._attempt(
                    tenant_id, commands, meta, actor_agent or {}, refresh_all, fresh
                )
            except ConcurrencyError as exc:
                if exc.stream_id not in fresh:
                    # Stale cache, not a concurrent writer. Bounded: from now on every run is
                    # read fresh, so any further conflict counts below.
                    refresh_all = True
                    continue
                if retries == self.max_retries:
                    # Callers see a plain conflict (retrying later is theirs to decide).
                    raise Conflict(
                        f"{exc.stream_id} kept changing concurrently; "
                        f"gave up after {retries + 1} conflicting attempts"
                    ) from exc
                retries += 1
                refresh_all = True
                # Jitter, so writers that collided do not collide again in lockstep.
                await asyncio.sleep(random.uniform(0, 0.004 * retries))

    async def _attempt(
        self,
        tenant_id: str,
        commands: Mapping[str, Command],
        meta: RequestMeta,
        actor_agent: Mapping[str, str],
        refresh_all: bool,
        fresh: set[str],
    ) -> Outcome:
        """One try of :meth:`_execute`; adds the streams it read from the store to ``fresh``."""
        states: dict[str, RunState] = {}
        new_events: dict[str, list[DomainEvent]] = {}
        appends: list[Append] = []
        async with transaction(self.store.pool) as conn:
            # Cached runs are trusted (the append checks them); the others, or all of them after
            # a conflict, are caught up together in one round trip.
            before: dict[str, RunState] = {}
            to_read: dict[str, RunState] = {}
            for run_id in commands:
                sid = stream_id_for(tenant_id, "run", run_id)
                cached = self.cache.get(sid)
                if cached is None or refresh_all:
                    to_read[sid] = cached if cached is not None else empty_run(tenant_id, run_id)
                else:
                    before[sid] = cached
            caught_up = await self._catch_up_many(to_read, conn=conn)
            fresh.update(caught_up)
            before.update(caught_up)
            for run_id, cmd in commands.items():
                sid = stream_id_for(tenant_id, "run", run_id)
                state = before[sid]
                states[run_id] = state
                events = decide(state, cmd)
                if not events:
                    continue
                new_events[run_id] = events
                actor = meta.actor_for(actor_agent.get(run_id) or state.agent_id)
                appends.append(
                    Append(
                        sid,
                        [
                            envelope_for(
                                e,
                                tenant_id=tenant_id,
                                stream_id=sid,
                                correlation_id=meta.correlation_id,
                                actor=actor,
                                trace_context=meta.trace_context,
                            )
                            for e in events
                        ],
                        expected_version=state.version,
                    )
                )
            stored = await self.store.append_many(appends, conn=conn)
        # Committed: the cache may move forward now.
        after: dict[str, RunState] = {}
        for run_id, state in states.items():
            new = fold(state, new_events.get(run_id, ()))
            self.cache.put(stream_id_for(tenant_id, "run", run_id), new)
            after[run_id] = new
        return Outcome(stored=stored, states=after)
