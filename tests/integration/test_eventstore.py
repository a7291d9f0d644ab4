"""The PostgreSQL event store: optimistic concurrency, append-only, hash chains, upcasting."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psycopg
import psycopg.rows
import pytest

from libs.contracts import envelope_for, stream_id_for
from libs.contracts.events import RunStarted, RunStartedV1, StepRecorded
from libs.contracts.registry import decode
from libs.errors import ConcurrencyError
from libs.eventbus.store import EventStore
from libs.eventbus.verify import verify_chains
from tests.conftest import wait_until

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


# What each service role is refused is proved in test_pg_roles.py.


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


async def test_an_append_after_a_younger_transactions_append_stays_behind_it_in_the_log(
    pool, system, tenant, unique
) -> None:
    # The older transaction takes its id first, then appends to a stream a younger transaction
    # appended to and committed meanwhile: its event must still come after in the log's order
    # (its log_xid is raised to the younger one's), or per-stream order breaks on the bus.
    store = EventStore(pool)
    run = unique("run")
    sid = stream_id_for(tenant, "run", run)
    async with await psycopg.AsyncConnection.connect(
        system.service_url, row_factory=psycopg.rows.dict_row
    ) as older:
        await older.execute("SELECT pg_current_xact_id()")
        (first,) = await store.append(sid, [_step(tenant, run, 1)])
        (second,) = await store.append(sid, [_step(tenant, run, 2)], conn=older)
        await older.commit()
    assert (first.stream_version, second.stream_version) == (1, 2)
    log = await store.read_all(0, 100, tenant_id=tenant)
    assert [e.event_id for e in log] == [first.event_id, second.event_id]


async def test_log_order_is_numeric_across_transaction_ids_of_different_lengths(
    own_system, unique
) -> None:
    from libs.eventbus.db import open_pool

    tenant = unique("t")
    pool = await open_pool(own_system.service_url)
    try:
        store = EventStore(pool)
        run = unique("run")
        sid = stream_id_for(tenant, "run", run)
        await store.append(sid, [_step(tenant, run, 1)])
        # A fresh cluster's transaction ids are in the hundreds: take ids until they have one
        # more digit, so a comparison of their text would put the next event first.
        with psycopg.connect(own_system.admin_url, autocommit=True) as conn:
            conn.execute("SET synchronous_commit = off")
            (start,) = conn.execute("SELECT pg_current_xact_id()::text").fetchone()  # type: ignore[misc]
            target = 10 ** len(start)
            assert target - int(start) < 50_000
            for _ in range(target - int(start)):
                conn.execute("SELECT pg_current_xact_id()")
        await store.append(sid, [_step(tenant, run, 2)])
        log = await store.read_all(0, 100, tenant_id=tenant)
        assert [e.stream_version for e in log] == [1, 2]
        pages = [page async for page in store.iter_all(batch=1)]
        assert [e.stream_version for page in pages for e in page if e.tenant_id == tenant] == [1, 2]
    finally:
        await pool.close()


async def test_a_version_taken_by_a_writer_that_bypassed_the_lock_is_a_concurrency_error(
    pool, system, tenant, unique
) -> None:
    store = EventStore(pool)
    run = unique("run")
    sid = stream_id_for(tenant, "run", run)
    # A foreign writer holds version 1 uncommitted without the stream lock; our append then
    # waits on the unique index and must fail as a typed conflict once the foreign row commits.
    with psycopg.connect(system.admin_url) as foreign:
        foreign.execute(
            "INSERT INTO eventstore.events (event_id, event_type, schema_version, tenant_id, "
            "stream_id, stream_version, occurred_at, correlation_id, actor, payload, prev_hash, "
            "hash) VALUES (gen_random_uuid(), 'run.step_recorded', 1, %s, %s, 1, now(), 'c', "
            "'foreign', '{}', '\\x00', '\\x00')",
            (tenant, sid),
        )
        appending = asyncio.ensure_future(store.append(sid, [_step(tenant, run, 1)]))

        def waiting_on_the_row() -> bool:
            with psycopg.connect(system.admin_url, autocommit=True) as c:
                row = c.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query LIKE '%%eventstore.append_events%%'"
                ).fetchone()
            return bool(row and row[0])

        await wait_until(waiting_on_the_row, 20, what="the append waiting on the foreign row")
        foreign.commit()
    with pytest.raises(ConcurrencyError) as info:
        await appending
    assert info.value.stream_id == sid


async def test_append_many_to_several_streams_and_twice_to_one(
    pool, system, tenant, unique
) -> None:
    from libs.eventbus.store import Append

    store = EventStore(pool)
    runs = [unique("ra"), unique("rb")]
    sids = [stream_id_for(tenant, "run", r) for r in runs]
    out = await store.append_many(
        [
            Append(sids[1], [_step(tenant, runs[1], 1)], expected_version=0),
            Append(sids[0], [_step(tenant, runs[0], 1), _step(tenant, runs[0], 2)]),
            Append(sids[1], [_step(tenant, runs[1], 2)], expected_version=1),
        ]
    )
    assert [(e.stream_id, e.stream_version) for e in out] == [
        (sids[1], 1),
        (sids[0], 1),
        (sids[0], 2),
        (sids[1], 2),
    ]
    for sid in sids:
        assert verify_chains(system.admin_url, stream_id=sid).ok


def test_the_log_order_migration_applies_to_a_store_that_holds_events(tmp_path) -> None:
    # Adding log_xid must neither rewrite nor UPDATE the rows (the append-only triggers would
    # refuse), and old events and checkpoints must land at log_xid 0 in their position order.
    from libs.eventbus.migrate import ensure_service_role
    from libs.runtime.embedded import start_postgres

    migrations = Path(__file__).resolve().parents[2] / "libs/eventbus/migrations"
    pg = start_postgres(tmp_path)
    try:
        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            ensure_service_role(conn)
            conn.execute((migrations / "0001_event_store.sql").read_text().encode())
            conn.execute(
                "INSERT INTO eventstore.events (event_id, event_type, schema_version, tenant_id, "
                "stream_id, stream_version, occurred_at, correlation_id, actor, payload, "
                "prev_hash, hash) VALUES (gen_random_uuid(), 'run.started', 1, 't', 's', 1, "
                "now(), 'c', 'a', '{}', '\\x00', '\\x00')"
            )
            conn.execute(
                "INSERT INTO eventstore.relay_checkpoints (name, position) VALUES ('default', 1)"
            )
            conn.execute((migrations / "0002_log_order.sql").read_text().encode())
            events = conn.execute("SELECT log_xid::text, position FROM eventstore.events")
            assert events.fetchall() == [("0", 1)]
            checkpoints = conn.execute(
                "SELECT log_xid::text, position FROM eventstore.relay_checkpoints"
            )
            assert checkpoints.fetchall() == [("0", 1)]
    finally:
        pg.stop()


async def test_an_append_wakes_the_relay_once_it_committed(pool, system, tenant, unique) -> None:
    """The relay's wake-up (NOTIFY) is sent by the store after an appending transaction commits
    (not inside it, where it would take PostgreSQL's database-wide notify lock through every
    appending commit): an append in a transaction and a standalone one must each wake a
    listener."""
    from libs.eventbus.db import NOTIFY_CHANNEL, transaction

    store = EventStore(pool)
    listener = await psycopg.AsyncConnection.connect(system.service_url, autocommit=True)
    got: list[str] = []

    async def listen() -> None:
        async for n in listener.notifies():
            got.append(n.channel)

    try:
        await listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
        listening = asyncio.create_task(listen())
        run = unique("run")
        async with transaction(pool) as conn:
            await store.append(
                stream_id_for(tenant, "run", run), [_step(tenant, run, 1)], conn=conn
            )
        await wait_until(lambda: got, what="a wake-up after the transaction committed")
        got.clear()
        run = unique("run")
        await store.append(stream_id_for(tenant, "run", run), [_step(tenant, run, 1)])
        await wait_until(lambda: got, what="a wake-up after a standalone append")
        listening.cancel()
    finally:
        await listener.close()
