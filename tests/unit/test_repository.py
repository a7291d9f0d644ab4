"""The application layer on the in-memory twin: load, execute, retries, cache, envelopes."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from functools import partial

import pytest

from libs.contracts import stream_id_for
from libs.contracts.envelope import DomainEvent, EventEnvelope, TraceContext
from libs.contracts.events import AdmissionDecided, RunStarted, StepRecorded
from libs.domain.run import RunState, empty_run
from libs.domain.run import fold as fold_run
from libs.errors import ConcurrencyError, Conflict, NotFound
from libs.eventbus.memory import InMemoryEventStore
from libs.eventbus.repository import (
    Aggregate,
    EventMeta,
    Recorded,
    Repository,
    begin,
    envelopes_for,
    fold_with,
)
from libs.eventbus.store import Append
from libs.eventbus.uow import DeferredAppends, UnitOfWork
from tests.contract.eventstore import step, steps_of

pytestmark = pytest.mark.unit

T = "acme"


def _fold(state: RunState, recorded: Sequence[Recorded]) -> RunState:
    return fold_run(state, [r.event for r in recorded])


RUN = Aggregate[RunState](category="run", initial=empty_run, fold=_fold)
META = EventMeta(correlation_id="corr-1", actor="user:alice")


class CountingStore(InMemoryEventStore):
    """The twin, counting the reads its transactions make."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[list[tuple[str, int]]] = []

    def begin(self):  # type: ignore[no-untyped-def]
        outer = super().begin()
        reads = self.reads

        class _Counting:
            async def __aenter__(self) -> UnitOfWork:
                uow = await outer.__aenter__()
                original = uow.read_streams

                async def read_streams(ranges):  # type: ignore[no-untyped-def]
                    reads.append(list(ranges))
                    return await original(ranges)

                uow.read_streams = read_streams  # type: ignore[method-assign]
                return uow

            async def __aexit__(self, *exc: object) -> bool | None:
                return await outer.__aexit__(*exc)  # type: ignore[arg-type]

        return _Counting()


def _start(run_id: str = "r1") -> partial[list[DomainEvent]]:
    def decide(state: RunState) -> list[DomainEvent]:
        if state.exists:
            raise Conflict(f"run {run_id} already exists")
        return [RunStarted(run_id=run_id, agent_id="a1")]

    return partial(decide)


def _step(i: int, run_id: str = "r1") -> partial[list[DomainEvent]]:
    def decide(state: RunState) -> list[DomainEvent]:
        if not state.exists:
            raise NotFound(f"run {run_id} not found")
        if i in state.steps:
            raise Conflict(f"step {i} already recorded")
        return [StepRecorded(run_id=run_id, agent_id=state.agent_id, step_index=i)]

    return partial(decide)


async def test_execute_appends_with_the_decided_version_and_builds_the_envelopes() -> None:
    store = InMemoryEventStore()
    repo = Repository(store, RUN)
    trace = TraceContext(traceparent="00-" + "a" * 32 + "-" + "b" * 16 + "-01")
    meta = EventMeta(
        correlation_id="corr-9",
        actor=lambda s: f"agent:{s.agent_id or 'new'}",
        causation_id="cause-1",
        trace_context=trace,
    )
    state, stored = await repo.execute(T, "r1", _start(), meta)
    assert state.status == "running" and state.version == 1
    (env,) = stored
    assert (env.stream_id, env.stream_version) == (stream_id_for(T, "run", "r1"), 1)
    assert (env.correlation_id, env.causation_id, env.actor) == ("corr-9", "cause-1", "agent:new")
    assert env.trace_context == trace
    _, stored = await repo.execute(T, "r1", _step(1), meta)
    assert stored[0].actor == "agent:a1"  # the actor is a function of the state decided on
    with pytest.raises(Conflict, match="already exists"):
        await repo.execute(T, "r1", _start(), meta)


def test_chained_causation_names_the_first_event_of_a_decision() -> None:
    events: list[DomainEvent] = [
        StepRecorded(run_id="r", agent_id="a", step_index=1),
        StepRecorded(run_id="r", agent_id="a", step_index=2),
        StepRecorded(run_id="r", agent_id="a", step_index=3),
    ]
    meta = EventMeta(correlation_id="c", actor="x", chain_causation=True)
    envs = envelopes_for(events, tenant_id=T, stream_id="acme/run/r", meta=meta)
    assert [e.causation_id for e in envs] == [None, str(envs[0].event_id), str(envs[0].event_id)]


async def test_load_catches_the_cached_state_up_in_one_read_of_the_newer_versions() -> None:
    store = CountingStore()
    repo = Repository(store, RUN)
    await repo.execute(T, "r1", _start(), META)
    sid = stream_id_for(T, "run", "r1")
    # Another replica records two steps behind this repository's back.
    await store.append(sid, [step(T, "r1", 1), step(T, "r1", 2)], expected_version=1)
    store.reads.clear()
    state = await repo.load(T, "r1")
    assert store.reads == [[(sid, 2)]]  # only what the cache misses, in one read
    assert state.steps == {1, 2} and state.version == 3
    assert repo.cached(T, "r1") == state


async def test_a_cache_behind_the_store_is_refreshed_without_counting_as_a_conflict() -> None:
    store = InMemoryEventStore()
    mine, other = Repository(store, RUN, max_retries=0), Repository(store, RUN)
    await mine.execute(T, "r1", _start(), META)
    await other.execute(T, "r1", _step(1), META)
    cached = mine.cached(T, "r1")
    assert cached is not None and cached.version == 1  # behind
    state, _ = await mine.execute(T, "r1", _step(2), META)
    assert state.steps == {1, 2} and state.version == 3


async def test_a_no_op_decided_on_a_cached_state_is_decided_again_on_the_store() -> None:
    store = InMemoryEventStore()
    mine, other = Repository(store, RUN), Repository(store, RUN)
    await mine.execute(T, "r2", _start("r2"), META)
    await other.execute(T, "r2", _step(1, "r2"), META)
    decided_on: list[int] = []

    def only_once(state: RunState) -> list[DomainEvent]:
        decided_on.append(state.version)
        return [] if 1 in state.steps else [StepRecorded(run_id="r2", agent_id="a", step_index=1)]

    # On the cached state (version 1) step 1 looks new; the append finds the store at version 2,
    # and decided again on the store's state there is nothing to do.
    _, stored = await mine.execute(T, "r2", only_once, META)
    assert stored == [] and decided_on == [1, 2]
    # Now the cache (version 2) says "nothing to do": that too is checked against the store
    # before it is answered, since nothing would be appended to prove it.
    decided_on.clear()
    _, stored = await mine.execute(T, "r2", only_once, META)
    assert stored == [] and decided_on == [2, 2]


async def test_concurrent_writers_retry_and_lose_nothing() -> None:
    store = InMemoryEventStore()
    await Repository(store, RUN).execute(T, "r1", _start(), META)
    writers = [Repository(store, RUN, max_retries=10) for _ in range(5)]
    for w in writers:
        await w.load(T, "r1")  # every cache at version 1
    await asyncio.gather(*(w.execute(T, "r1", _step(i + 1), META) for i, w in enumerate(writers)))
    state = await writers[0].load(T, "r1")
    assert state.steps == {1, 2, 3, 4, 5} and state.version == 6


async def test_a_writer_that_keeps_losing_gets_a_conflict_after_its_retries() -> None:
    store = InMemoryEventStore()
    repo = Repository(store, RUN, max_retries=2, max_jitter_s=0)
    await repo.execute(T, "r1", _start(), META)
    sid = stream_id_for(T, "run", "r1")
    attempts: list[int] = []
    counter = iter(range(100, 200))

    def decide(state: RunState) -> list[DomainEvent]:
        attempts.append(state.version)
        # Somebody else writes between every read and append.
        store._streams[sid].append(
            store._streams[sid][-1].model_copy(update={"stream_version": state.version + 1})
        )
        return [StepRecorded(run_id="r1", agent_id="a1", step_index=next(counter))]

    with pytest.raises(Conflict, match="gave up after 3 conflicting attempts"):
        await repo.execute(T, "r1", decide, META)
    assert len(attempts) == 4  # the cached try, then three fresh ones


async def test_a_batch_over_several_aggregates_is_one_transaction() -> None:
    store = InMemoryEventStore()
    repo = Repository(store, RUN)
    for r in ("a", "b", "c"):
        await repo.execute(T, r, _start(r), META)
    out = await repo.execute_many(T, {"a": _step(1, "a"), "b": _step(1, "b")}, META)
    assert [e.stream_id for e in out.stored] == [stream_id_for(T, "run", r) for r in "ab"]
    with pytest.raises(Conflict, match="step 1 already recorded"):
        await repo.execute_many(T, {"c": _step(1, "c"), "a": _step(1, "a")}, META)
    # All or none: c's step was not stored although it was fine on its own.
    assert (await repo.load(T, "c")).steps == frozenset()


async def test_inside_a_callers_transaction_the_cache_waits_for_the_commit() -> None:
    store = InMemoryEventStore()
    repo = Repository(store, RUN)
    await repo.execute(T, "r1", _start(), META)

    async def fail_after_the_effect() -> None:
        async with begin(store) as uow:
            await repo.execute(T, "r1", _step(1), META, uow=uow)
            cached = repo.cached(T, "r1")
            assert cached is not None and cached.version == 1  # never ahead, even for a moment
            raise RuntimeError("the caller's transaction fails after the effect")

    with pytest.raises(RuntimeError):
        await fail_after_the_effect()
    assert (await repo.load(T, "r1")).steps == frozenset()
    async with begin(store) as uow:
        await repo.execute(T, "r1", _step(1), META, uow=uow)
    cached = repo.cached(T, "r1")
    assert cached is not None and cached.steps == {1}


async def test_an_aggregate_of_several_streams_folds_them_in_store_order() -> None:
    store = InMemoryEventStore()

    def streams(tenant: str, run_id: str) -> tuple[str, ...]:
        return (stream_id_for(tenant, "decisions", run_id), stream_id_for(tenant, "run", run_id))

    def order(state: tuple[str, ...], recorded: Sequence[Recorded]) -> tuple[str, ...]:
        return (*state, *(r.event.event_type for r in recorded))

    view = Aggregate[tuple[str, ...]](
        category="decisions",
        initial=lambda t, r: (),
        fold=order,
        streams=streams,
        lock_key=lambda t, r: stream_id_for(t, "run", r),
    )
    repo = Repository(store, view)
    runs = Repository(store, RUN)
    await runs.execute(T, "r1", _start(), META)

    def decided(state: tuple[str, ...]) -> list[DomainEvent]:
        return [
            AdmissionDecided(
                decision_id="d",
                run_id="r1",
                agent_id="a1",
                step_index=len(state),
                outcome="allow",
                bundle_digest="x",
            )
        ]

    await repo.execute(T, "r1", decided, META)
    await runs.execute(T, "r1", _step(1), META)
    state, stored = await repo.execute(T, "r1", decided, META)
    assert stored[0].stream_id == stream_id_for(T, "decisions", "r1")
    assert state == (
        "run.started",
        "admission.decided",
        "run.step_recorded",
        "admission.decided",
    )


async def test_a_lock_key_serialises_commands_on_one_aggregate() -> None:
    store = InMemoryEventStore()
    counted = Aggregate[int](
        category="counter",
        initial=lambda t, i: 0,
        fold=fold_with(lambda n, e: n + 1),
        # Two streams, so no cache is trusted and nothing but the lock orders the writers.
        streams=lambda t, i: (f"{t}/counter/{i}", f"{t}/counter-shadow/{i}"),
        lock_key=lambda t, i: f"{t}/counter/{i}",
    )
    repos = [Repository(store, counted, max_retries=0) for _ in range(4)]

    def bump(n: int) -> list[DomainEvent]:
        return [StepRecorded(run_id="c", agent_id="a", step_index=n + 1)]

    await asyncio.gather(*(r.execute(T, "c", bump, META) for r in repos for _ in range(3)))
    events = await store.read_stream(f"{T}/counter/c")
    assert [e.payload["step_index"] for e in events] == list(range(1, 13))


async def test_appends_outside_repositories_are_seen_by_the_next_load() -> None:
    store = InMemoryEventStore()
    repo = Repository(store, RUN)
    await repo.execute(T, "r1", _start(), META)
    sid = stream_id_for(T, "run", "r1")
    envs: list[EventEnvelope] = [step(T, "r1", 7)]
    await store.append_many([Append(sid, envs, expected_version=1)])
    assert (await repo.load(T, "r1")).last_step_index == 7


async def test_deferred_appends_are_read_back_and_written_together_at_flush() -> None:
    store = InMemoryEventStore()
    repo = Repository(store, RUN)
    await repo.execute(T, "r1", _start(), META)
    await repo.execute(T, "r2", _start("r2"), META)
    sid = stream_id_for(T, "run", "r1")

    async def refused(uow: UnitOfWork) -> None:
        await repo.execute(T, "r2", _step(9, "r2"), META, uow=uow)
        raise RuntimeError("this decision fails after deciding")

    async with begin(store) as outer:
        uow = DeferredAppends(outer)
        await repo.execute(T, "r1", _step(1), META, uow=uow)
        state, _ = await repo.execute(T, "r1", _step(2), META, uow=uow)  # sees step 1
        assert state.steps == {1, 2}
        with pytest.raises(RuntimeError):
            async with uow.savepoint():
                await refused(uow)
        assert await store.read_stream(sid, 2) == []  # nothing reached the store yet
        stored = await uow.flush()
    assert [(e.stream_id, e.stream_version) for e in stored] == [(sid, 2), (sid, 3)]
    assert (await repo.load(T, "r2")).steps == frozenset()
    assert (await repo.load(T, "r1")).steps == {1, 2}


async def test_deferred_appends_are_checked_by_the_store_at_flush() -> None:
    store = InMemoryEventStore()
    repo = Repository(store, RUN)
    await repo.execute(T, "r1", _start(), META)
    sid = stream_id_for(T, "run", "r1")

    async def flush_behind_a_concurrent_writer() -> None:
        async with begin(store) as outer:
            uow = DeferredAppends(outer)
            await repo.execute(T, "r1", _step(1), META, uow=uow)
            await store.append(sid, [step(T, "r1", 5)])  # another writer commits first
            await uow.flush()

    with pytest.raises(ConcurrencyError):
        await flush_behind_a_concurrent_writer()
    assert steps_of(await store.read_stream(sid, 2)) == [5]
