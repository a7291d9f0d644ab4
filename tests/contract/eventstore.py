"""One contract for every event store adapter: PostgreSQL and its in-memory twin.

Subclassed per adapter (``tests/unit/test_eventstore_contract.py`` for the twin,
``tests/integration/test_eventstore_contract.py`` for PostgreSQL); a subclass provides the
``store`` fixture. Whatever a handler's unit test learns on the twin holds on the real store
because both pass exactly these tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from libs.contracts import envelope_for, stream_id_for
from libs.contracts.envelope import EventEnvelope
from libs.contracts.events import StepRecorded
from libs.contracts.registry import decode
from libs.errors import ConcurrencyError, InvalidInput
from libs.eventbus.repository import Store, begin
from libs.eventbus.store import GENESIS, MAX_EVENT_BYTES, Append, chain_hash_v2
from libs.eventbus.uow import UnitOfWork
from tests.conftest import wait_until


def step(tenant: str, run: str, i: int, **extra: Any) -> EventEnvelope:
    """A ``run.step_recorded`` envelope for step ``i`` of ``run``."""
    return envelope_for(
        StepRecorded(run_id=run, agent_id="a1", step_index=i, input_tokens=10 * i, **extra),
        tenant_id=tenant,
        stream_id=stream_id_for(tenant, "run", run),
        correlation_id=f"corr-{run}",
        actor="test",
    )


def steps_of(events: list[EventEnvelope]) -> list[int]:
    """The step indexes of ``run.step_recorded`` envelopes."""
    return [decode(e).step_index for e in events]  # type: ignore[attr-defined]


class EventStoreContract:
    """The append and read semantics every adapter keeps."""

    @pytest.fixture
    def store(self) -> Store:  # pragma: no cover - every subclass overrides it
        raise NotImplementedError

    async def test_append_numbers_versions_from_one_and_reads_back_in_order(
        self, store: Store, tenant: str, unique: Callable[[str], str]
    ) -> None:
        run = unique("run")
        sid = stream_id_for(tenant, "run", run)
        out = await store.append(sid, [step(tenant, run, i) for i in (1, 2, 3)], expected_version=0)
        assert [e.stream_version for e in out] == [1, 2, 3]
        positions = [e.position or 0 for e in out]
        assert positions == sorted(positions) and positions[0] > 0
        more = await store.append(sid, [step(tenant, run, 4)])
        assert more[0].stream_version == 4 and (more[0].position or 0) > positions[-1]
        back = await store.read_stream(sid)
        assert [e.event_id for e in back] == [e.event_id for e in [*out, *more]]
        assert steps_of(back) == [1, 2, 3, 4]
        assert all(e.recorded_at is not None for e in back)
        assert steps_of(await store.read_stream(sid, 3)) == [3, 4]
        assert await store.read_stream(stream_id_for(tenant, "run", unique("none"))) == []

    async def test_expected_version_zero_means_a_new_stream_and_n_means_exactly_n(
        self, store: Store, tenant: str, unique: Callable[[str], str]
    ) -> None:
        run = unique("run")
        sid = stream_id_for(tenant, "run", run)
        await store.append(sid, [step(tenant, run, 1)], expected_version=0)
        for wrong in (0, 2):
            with pytest.raises(ConcurrencyError) as info:
                await store.append(sid, [step(tenant, run, 2)], expected_version=wrong)
            assert (info.value.stream_id, info.value.expected, info.value.actual) == (sid, wrong, 1)
        await store.append(sid, [step(tenant, run, 2)], expected_version=1)
        await store.append(sid, [step(tenant, run, 3)], expected_version=None)
        assert steps_of(await store.read_stream(sid)) == [1, 2, 3]

    async def test_append_many_is_all_or_nothing(
        self, store: Store, tenant: str, unique: Callable[[str], str]
    ) -> None:
        a, b = unique("ra"), unique("rb")
        sa, sb = stream_id_for(tenant, "run", a), stream_id_for(tenant, "run", b)
        await store.append(sb, [step(tenant, b, 1)])
        with pytest.raises(ConcurrencyError):
            await store.append_many(
                [
                    Append(sa, [step(tenant, a, 1)], expected_version=0),
                    Append(sb, [step(tenant, b, 2)], expected_version=0),
                ]
            )
        assert await store.read_stream(sa) == []
        out = await store.append_many(
            [
                Append(sa, [step(tenant, a, 1)], expected_version=0),
                Append(sb, [step(tenant, b, 2)], expected_version=1),
            ]
        )
        assert [(e.stream_id, e.stream_version) for e in out] == [(sa, 1), (sb, 2)]

    async def test_refused_events_store_nothing(
        self, store: Store, tenant: str, unique: Callable[[str], str]
    ) -> None:
        run, other = unique("run"), unique("other")
        sid = stream_id_for(tenant, "run", run)
        with pytest.raises(InvalidInput, match="over the limit"):
            await store.append(
                sid, [step(tenant, run, 1), step(tenant, run, 2, input="x" * MAX_EVENT_BYTES)]
            )
        with pytest.raises(InvalidInput, match="is for"):
            await store.append(sid, [step(tenant, run, 1), step(tenant, other, 1)])
        assert await store.read_stream(sid) == []

    async def test_read_all_follows_store_order_from_a_position(
        self, store: Store, tenant: str, unique: Callable[[str], str]
    ) -> None:
        run = unique("run")
        sid = stream_id_for(tenant, "run", run)
        out = await store.append(sid, [step(tenant, run, i) for i in (1, 2, 3)])
        after = await store.read_all(out[0].position or 0, tenant_id=tenant)
        assert [e.event_id for e in after] == [e.event_id for e in out[1:]]
        assert [e.event_id for e in await store.read_all(0, 1, tenant_id=tenant)] == [
            out[0].event_id
        ]
        assert await store.read_all(0, tenant_id=unique("nobody")) == []
        assert await store.head_position() >= (out[-1].position or 0)

    async def test_a_unit_of_work_commits_at_its_end_and_reads_its_own_writes(
        self, store: Store, tenant: str, unique: Callable[[str], str]
    ) -> None:
        run = unique("run")
        sid = stream_id_for(tenant, "run", run)
        committed: list[str] = []
        async with begin(store) as uow:
            await uow.append_many([Append(sid, [step(tenant, run, 1)], expected_version=0)])
            assert uow.wrote(sid) and not uow.wrote(stream_id_for(tenant, "run", "x"))
            mine = await uow.read_streams([(sid, 1), (stream_id_for(tenant, "run", "x"), 1)])
            assert steps_of(mine[sid]) == [1]
            assert await store.read_stream(sid) == []  # not visible to others yet
            uow.after_commit(lambda: committed.append("done"))
            assert committed == []
        assert committed == ["done"]
        assert steps_of(await store.read_stream(sid)) == [1]

    async def test_a_failed_unit_of_work_leaves_nothing_behind(
        self, store: Store, tenant: str, unique: Callable[[str], str]
    ) -> None:
        run = unique("run")
        sid = stream_id_for(tenant, "run", run)
        called: list[str] = []

        async def fail_after_appending() -> None:
            async with begin(store) as uow:
                await uow.append_many([Append(sid, [step(tenant, run, 1)])])
                uow.after_commit(lambda: called.append("no"))
                raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            await fail_after_appending()
        assert await store.read_stream(sid) == []
        assert called == []

    async def test_a_savepoint_undoes_only_what_was_done_inside_it(
        self, store: Store, tenant: str, unique: Callable[[str], str]
    ) -> None:
        run = unique("run")
        sid = stream_id_for(tenant, "run", run)

        called: list[str] = []

        async def conflict_in_savepoint(uow: UnitOfWork) -> None:
            async with uow.savepoint():
                await uow.append_many([Append(sid, [step(tenant, run, 2)])])
                uow.after_commit(lambda: called.append("undone"))
                await uow.append_many([Append(sid, [step(tenant, run, 3)], expected_version=0)])

        async with begin(store) as uow:
            await uow.append_many([Append(sid, [step(tenant, run, 1)], expected_version=0)])
            with pytest.raises(ConcurrencyError):
                await conflict_in_savepoint(uow)
            # The transaction is still usable and its version is what survived.
            await uow.append_many([Append(sid, [step(tenant, run, 4)], expected_version=1)])
            uow.after_commit(lambda: called.append("kept"))
        assert called == ["kept"]  # what the savepoint undid is not remembered at commit
        back = await store.read_stream(sid)
        assert steps_of(back) == [1, 4]
        assert [e.stream_version for e in back] == [1, 2]

    async def test_a_lock_makes_the_second_holder_wait_for_the_first_to_commit(
        self, store: Store, tenant: str, unique: Callable[[str], str]
    ) -> None:
        run = unique("run")
        sid = stream_id_for(tenant, "run", run)
        started = asyncio.Event()

        async def second() -> None:
            async with begin(store) as uow:
                started.set()
                await uow.lock(sid)
                await uow.lock(sid)  # re-entrant within one transaction
                seen = (await uow.read_streams([(sid, 1)]))[sid]
                await uow.append_many(
                    [Append(sid, [step(tenant, run, 2)], expected_version=len(seen))]
                )

        async with begin(store) as uow:
            await uow.lock(sid)
            task = asyncio.create_task(second())
            await wait_until(started.is_set, what="the second transaction started")
            await uow.append_many([Append(sid, [step(tenant, run, 1)], expected_version=0)])
        await asyncio.wait_for(task, 10)
        assert steps_of(await store.read_stream(sid)) == [1, 2]

    async def test_every_append_moves_its_stream_head_in_the_same_transaction(
        self, store: Store, tenant: str, unique: Callable[[str], str]
    ) -> None:
        a, b = unique("ra"), unique("rb")
        sa, sb = stream_id_for(tenant, "run", a), stream_id_for(tenant, "run", b)
        assert await store.stream_head(sa) is None
        await store.append(sa, [step(tenant, a, 1), step(tenant, a, 2)])
        out = await store.append_many(
            [Append(sa, [step(tenant, a, 3)]), Append(sb, [step(tenant, b, 1)])]
        )
        for sid, last in ((sa, out[0]), (sb, out[1])):
            head = await store.stream_head(sid)
            assert head is not None
            assert (head.stream_id, head.tenant_id, head.version, head.position) == (
                sid,
                tenant,
                last.stream_version,
                last.position,
            )
        # A refused append and an undone transaction leave the head where it was.
        before = await store.stream_head(sa)
        with pytest.raises(ConcurrencyError):
            await store.append(sa, [step(tenant, a, 4)], expected_version=1)

        async def undone() -> None:
            async with begin(store) as uow:
                await uow.append_many([Append(sa, [step(tenant, a, 4)])])
                raise RuntimeError("undone")

        with pytest.raises(RuntimeError, match="undone"):
            await undone()
        assert await store.stream_head(sa) == before

    async def test_the_chain_covers_each_events_position_and_recorded_at(
        self, store: Store, tenant: str, unique: Callable[[str], str]
    ) -> None:
        run = unique("run")
        sid = stream_id_for(tenant, "run", run)
        await store.append(sid, [step(tenant, run, i) for i in (1, 2)])
        await store.append(sid, [step(tenant, run, 3)])
        events = await store.read_stream(sid)
        head = await store.stream_head(sid)
        assert head is not None

        def chain(evs: list[EventEnvelope]) -> bytes:
            digest = GENESIS
            for e in evs:
                digest = chain_hash_v2(digest, e)
            return digest

        # The head's hash is the scheme-2 chain over the events as stored ...
        assert chain(events) == head.hash
        # ... so it changes with any one event's position or recorded_at.
        moved = events[1].model_copy(update={"position": (events[1].position or 0) + 1})
        assert chain([events[0], moved, events[2]]) != head.hash
        recorded = events[1].recorded_at
        assert recorded is not None
        later = events[1].model_copy(update={"recorded_at": recorded + timedelta(microseconds=1)})
        assert chain([events[0], later, events[2]]) != head.hash
