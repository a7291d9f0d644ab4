"""The PostgreSQL event store: optimistic concurrency, append-only, hash chains, upcasting."""

from __future__ import annotations

import psycopg
import pytest

from libs.contracts import envelope_for, stream_id_for
from libs.contracts.events import RunStarted, RunStartedV1, StepRecorded
from libs.contracts.registry import decode
from libs.errors import ConcurrencyError
from libs.eventbus.store import EventStore
from libs.eventbus.verify import verify_chains

pytestmark = pytest.mark.integration


def _step(tenant: str, run: str, i: int) -> object:
    return envelope_for(
        StepRecorded(run_id=run, agent_id="a1", step_index=i, input_tokens=10 * i),
        tenant_id=tenant,
        stream_id=stream_id_for(tenant, "run", run),
        correlation_id=f"corr-{run}",
        actor="test",
    )


async def test_append_assigns_versions_and_reads_back_in_order(pool, tenant, unique) -> None:
    store = EventStore(pool)
    run = unique("run")
    sid = stream_id_for(tenant, "run", run)
    out = await store.append(sid, [_step(tenant, run, i) for i in (1, 2, 3)], expected_version=0)
    assert [e.stream_version for e in out] == [1, 2, 3]
    positions = [e.position for e in out]
    assert positions == sorted(positions)
    back = await store.read_stream(sid)
    assert [e.event_id for e in back] == [e.event_id for e in out]
    assert [decode(e).step_index for e in back] == [1, 2, 3]  # type: ignore[attr-defined]
    assert all(e.recorded_at is not None for e in back)


async def test_stale_expected_version_raises_typed_conflict(pool, tenant, unique) -> None:
    store = EventStore(pool)
    run = unique("run")
    sid = stream_id_for(tenant, "run", run)
    await store.append(sid, [_step(tenant, run, 1)], expected_version=0)
    with pytest.raises(ConcurrencyError) as info:
        await store.append(sid, [_step(tenant, run, 2)], expected_version=0)
    assert info.value.stream_id == sid
    assert info.value.actual == 1
    # Nothing from the failed append was stored.
    assert len(await store.read_stream(sid)) == 1


async def test_read_all_from_position(pool, tenant, unique) -> None:
    store = EventStore(pool)
    run = unique("run")
    sid = stream_id_for(tenant, "run", run)
    out = await store.append(sid, [_step(tenant, run, i) for i in (1, 2, 3)])
    after = await store.read_all(out[0].position or 0, tenant_id=tenant)
    assert [e.event_id for e in after] == [e.event_id for e in out[1:]]


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE eventstore.events SET actor = 'x'",
        "DELETE FROM eventstore.events",
        "TRUNCATE eventstore.events",
    ],
)
def test_service_role_cannot_rewrite_history(system, statement) -> None:
    with (
        psycopg.connect(system.service_url) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        conn.execute(statement)


def test_even_the_owner_is_stopped_by_the_append_only_triggers(system) -> None:
    with psycopg.connect(system.admin_url) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
            conn.execute("DELETE FROM eventstore.events WHERE false OR true")
        conn.rollback()
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
            conn.execute("TRUNCATE eventstore.events")


async def test_tampered_byte_is_found_and_named(own_system, unique) -> None:
    from libs.eventbus.db import open_pool

    pool = await open_pool(own_system.service_url)
    try:
        store = EventStore(pool)
        tenant = unique("t")
        runs = [unique("ra"), unique("rb")]
        for run in runs:
            sid = stream_id_for(tenant, "run", run)
            await store.append(sid, [_step(tenant, run, i) for i in (1, 2, 3, 4)])
    finally:
        await pool.close()
    ok = verify_chains(own_system.admin_url)
    assert ok.ok and ok.events == 8 and ok.streams == 2

    target = stream_id_for(tenant, "run", runs[1])
    with psycopg.connect(own_system.admin_url, autocommit=True) as conn:
        # A superuser can switch off the guard triggers; the chain still tells.
        conn.execute("ALTER TABLE eventstore.events DISABLE TRIGGER events_no_update")
        conn.execute(
            "UPDATE eventstore.events SET payload = jsonb_set(payload, '{input_tokens}', '31') "
            "WHERE stream_id = %s AND stream_version = 3",
            (target,),
        )
        conn.execute("ALTER TABLE eventstore.events ENABLE TRIGGER events_no_update")
    report = verify_chains(own_system.admin_url)
    assert not report.ok
    assert report.first_broken is not None
    assert report.first_broken[:2] == (target, 3)


async def test_v1_event_in_the_store_reads_back_as_current_version(
    pool, system, tenant, unique
) -> None:
    store = EventStore(pool)
    run = unique("run")
    sid = stream_id_for(tenant, "run", run)
    old = envelope_for(
        RunStartedV1(run_id=run, agent="legacy-agent"),
        tenant_id=tenant,
        stream_id=sid,
        correlation_id="c",
        actor="test",
    )
    assert old.schema_version == 1
    await store.append(sid, [old], expected_version=0)
    (stored,) = await store.read_stream(sid)
    assert stored.schema_version == 1  # never rewritten in place
    current = decode(stored)
    assert isinstance(current, RunStarted)
    assert current.agent_id == "legacy-agent"
    assert current.labels == {}


async def test_an_event_too_large_for_the_bus_is_refused_and_nothing_is_stored(
    pool, tenant, unique
) -> None:
    from libs.errors import InvalidInput
    from libs.eventbus.store import MAX_EVENT_BYTES

    store = EventStore(pool)
    run = unique("run")
    sid = stream_id_for(tenant, "run", run)
    big = envelope_for(
        StepRecorded(run_id=run, agent_id="a1", step_index=2, input="x" * MAX_EVENT_BYTES),
        tenant_id=tenant,
        stream_id=sid,
        correlation_id="c",
        actor="test",
    )
    with pytest.raises(InvalidInput, match="over the limit"):
        await store.append(sid, [_step(tenant, run, 1), big])
    assert await store.read_stream(sid) == []
