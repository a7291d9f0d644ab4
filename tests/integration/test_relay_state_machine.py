"""A hypothesis state machine over concurrent appends, rollbacks, relay steps and relay crashes.

Real PostgreSQL and NATS. Transactions stay open across steps while others append, commit, roll
back and the relay publishes, so commits land out of position order and out of transaction-id
order, and some transactions take their id before they lock a stream another one appends to
first (the case ``log_xid`` is raised for). After every step:

* nothing of a transaction still open, or rolled back, has been published;
* JetStream holds each event once (republishing after a crash is absorbed by ``Nats-Msg-Id``);
* what was published is exactly a prefix of the log's order (so no gap can open behind it);
* every stream's versions are published in order.

At the end everything committed has been published, once, in the log's order.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import psycopg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)
from nats.aio.client import Client as NATS
from psycopg.rows import dict_row

from libs.contracts import envelope_for, stream_id_for
from libs.contracts.envelope import EventEnvelope
from libs.contracts.events import StepRecorded
from libs.eventbus.db import AsyncConn, open_pool
from libs.eventbus.jetstream import connect, ensure_streams
from libs.eventbus.relay import Relay
from libs.eventbus.store import EventStore
from tests.conftest import System
from tests.integration.helpers.bus import tenant_reader

pytestmark = pytest.mark.integration

T = TypeVar("T")
STREAMS = ("a", "b", "c", "d")


class _Tx:
    """One open transaction of the machine, on its own connection."""

    def __init__(self, conn: AsyncConn) -> None:
        self.conn = conn
        self.streams: set[str] = set()
        self.events: list[uuid.UUID] = []


class _CrashBeforeCheckpoint(Relay):
    """A relay that dies after JetStream acked a batch and before it moved its checkpoint."""

    async def relay_once(self, conn: psycopg.AsyncConnection[dict[str, Any]]) -> int:
        async with conn.transaction(force_rollback=True):
            return await super().relay_once(conn)


def _machine(system: System) -> type[RuleBasedStateMachine]:
    loop = asyncio.new_event_loop()

    def run(coro: Coroutine[Any, Any, T]) -> T:
        return loop.run_until_complete(coro)

    class RelayMachine(RuleBasedStateMachine):
        txs = Bundle("txs")

        def __init__(self) -> None:
            super().__init__()
            self.tenant = f"sm{uuid.uuid4().hex[:10]}"
            self.relay_name = f"sm-{self.tenant}"
            self.open: list[_Tx] = []
            self.committed: set[uuid.UUID] = set()
            self.aborted: set[uuid.UUID] = set()
            self.published: list[EventEnvelope] = []
            self.step_of: dict[str, int] = {}
            run(self._setup())

        async def _setup(self) -> None:
            self.nc: NATS = await connect(system.nats_url, "state-machine")
            self.js = self.nc.jetstream()
            await ensure_streams(self.js)
            self.pool = await open_pool(system.service_url, max_size=2)
            self.store = EventStore(self.pool)
            self.sub = await tenant_reader(self.js, self.tenant)
            self.relay_conn = await self._relay_connection()
            self.relay = Relay(system.service_url, self.js, name=self.relay_name, batch_size=3)
            # Start this relay at the end of the log: earlier tests' events are not ours.
            await self.relay_conn.execute(
                "INSERT INTO eventstore.relay_checkpoints (name, log_xid, position) "
                "SELECT %s, coalesce(max(log_xid), '0'), 0 FROM eventstore.events "
                "WHERE log_xid < pg_snapshot_xmin(pg_current_snapshot())",
                (self.relay_name,),
            )

        async def _relay_connection(self) -> psycopg.AsyncConnection[dict[str, Any]]:
            return await psycopg.AsyncConnection.connect(
                system.service_url, autocommit=True, row_factory=dict_row
            )

        # -- transactions ---------------------------------------------------------------

        def _free(self, tx: _Tx | None = None) -> list[str]:
            """Streams no other open transaction has locked (their lock would block us)."""
            held = {s for t in self.open if t is not tx for s in t.streams}
            return [s for s in STREAMS if s not in held]

        def _event(self, stream: str) -> EventEnvelope:
            n = self.step_of[stream] = self.step_of.get(stream, 0) + 1
            return envelope_for(
                StepRecorded(run_id=stream, agent_id="sm", step_index=n),
                tenant_id=self.tenant,
                stream_id=stream_id_for(self.tenant, "run", stream),
                correlation_id="sm",
                actor="state-machine",
            )

        async def _append(self, tx: _Tx, stream: str, count: int) -> None:
            events = [self._event(stream) for _ in range(count)]
            await self.store.append(stream_id_for(self.tenant, "run", stream), events, conn=tx.conn)
            tx.streams.add(stream)
            tx.events.extend(e.event_id for e in events)

        @precondition(lambda self: len(self.open) < 3)
        @rule(target=txs, data=st.data(), count=st.integers(1, 3), write_first=st.booleans())
        def begin(self, data: st.DataObject, count: int, write_first: bool) -> _Tx:
            async def go() -> _Tx:
                conn = await psycopg.AsyncConnection.connect(
                    system.service_url, row_factory=dict_row
                )
                tx = _Tx(conn)
                if write_first:
                    # Takes a transaction id now, before any stream lock: a later append of
                    # this transaction may follow events of a younger one in the same stream.
                    await conn.execute("SELECT pg_current_xact_id()")
                free = self._free(tx)
                if free and not write_first:
                    await self._append(tx, data.draw(st.sampled_from(free)), count)
                return tx

            tx = run(go())
            self.open.append(tx)
            return tx

        @rule(tx=txs, data=st.data(), count=st.integers(1, 3))
        def append(self, tx: _Tx, data: st.DataObject, count: int) -> None:
            if tx not in self.open:
                return
            free = self._free(tx)
            if free:
                run(self._append(tx, data.draw(st.sampled_from(free)), count))

        @rule(tx=consumes(txs))
        def commit(self, tx: _Tx) -> None:
            if tx not in self.open:
                return
            run(self._end(tx, commit=True))

        @rule(tx=consumes(txs))
        def rollback(self, tx: _Tx) -> None:
            if tx not in self.open:
                return
            run(self._end(tx, commit=False))

        async def _end(self, tx: _Tx, *, commit: bool) -> None:
            self.open.remove(tx)
            if commit:
                await tx.conn.commit()
                self.committed.update(tx.events)
            else:
                await tx.conn.rollback()
                self.aborted.update(tx.events)
                # Versions of a rolled-back append are free again.
                for s in tx.streams:
                    self.step_of[s] = len(
                        await self.store.read_stream(stream_id_for(self.tenant, "run", s))
                    )
            await tx.conn.close()

        # -- the relay ------------------------------------------------------------------

        @rule()
        def relay_step(self) -> None:
            run(self.relay.relay_once(self.relay_conn))
            run(self._collect())

        @rule()
        def relay_crashes_after_publishing(self) -> None:
            crashing = _CrashBeforeCheckpoint(
                system.service_url, self.js, name=self.relay_name, batch_size=3
            )
            run(crashing.relay_once(self.relay_conn))
            run(self._collect())
            self.relay_restarts()

        @rule()
        def relay_restarts(self) -> None:
            run(self.relay_conn.close())
            self.relay_conn = run(self._relay_connection())
            self.relay = Relay(system.service_url, self.js, name=self.relay_name, batch_size=3)

        async def _collect(self) -> None:
            """Read every message JetStream now holds for this tenant that we have not seen."""
            info = await self.sub.consumer_info()
            pending = info.num_pending
            while pending:
                msgs = await self.sub.fetch(pending, timeout=10)
                self.published.extend(EventEnvelope.model_validate_json(m.data) for m in msgs)
                pending -= len(msgs)

        # -- invariants -----------------------------------------------------------------

        @invariant()
        def nothing_open_or_rolled_back_is_published(self) -> None:
            ids = {e.event_id for e in self.published}
            still_open = {i for tx in self.open for i in tx.events}
            assert not ids & still_open, "published an event of a transaction still open"
            assert not ids & self.aborted, "published an event that was rolled back"
            assert ids <= self.committed

        @invariant()
        def each_event_is_held_once(self) -> None:
            ids = [e.event_id for e in self.published]
            assert len(ids) == len(set(ids)), "JetStream holds an event twice"

        @invariant()
        def published_is_a_prefix_of_the_log(self) -> None:
            log = run(self.store.read_all(0, 100_000, tenant_id=self.tenant))
            got = [e.event_id for e in self.published]
            assert got == [e.event_id for e in log[: len(got)]], "a gap or a reordering"

        @invariant()
        def streams_are_published_in_version_order(self) -> None:
            last: dict[str, int] = {}
            for e in self.published:
                assert e.stream_version == last.get(e.stream_id, 0) + 1
                last[e.stream_id] = e.stream_version

        def teardown(self) -> None:
            try:
                for tx in list(self.open):
                    run(self._end(tx, commit=True))
                while run(self.relay.relay_once(self.relay_conn)):
                    pass
                run(self._collect())
                got = [e.event_id for e in self.published]
                assert set(got) == self.committed, "a committed event was never published"
                log = run(self.store.read_all(0, 100_000, tenant_id=self.tenant))
                assert got == [e.event_id for e in log]
            finally:
                run(self._close())

        async def _close(self) -> None:
            for tx in self.open:
                await tx.conn.close()
            await self.relay_conn.close()
            await self.sub.unsubscribe()
            await self.pool.close()
            await self.nc.close()

    RelayMachine.close_loop = loop.close  # type: ignore[attr-defined]
    return RelayMachine


def test_relay_state_machine(system: System) -> None:
    machine = _machine(system)
    try:
        run_machine: Callable[..., None] = machine.TestCase  # type: ignore[attr-defined]
        machine.TestCase.settings = settings(  # type: ignore[attr-defined]
            max_examples=20,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        )
        run_machine().runTest()
    finally:
        machine.close_loop()  # type: ignore[attr-defined]
