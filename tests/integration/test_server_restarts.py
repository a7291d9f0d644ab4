"""NATS and PostgreSQL dying under load: nothing committed is lost, everything flows again."""

from __future__ import annotations

import asyncio
import contextlib
import signal

import psycopg
import pytest

from libs.contracts import envelope_for, stream_id_for
from libs.contracts.events import StepRecorded
from libs.errors import MissionControlError
from libs.eventbus.db import open_pool
from libs.eventbus.jetstream import connect, ensure_streams
from libs.eventbus.relay import Relay
from libs.eventbus.store import EventStore
from libs.runtime.embedded import start_nats, start_postgres
from tests.conftest import System, wait_until
from tests.integration.helpers.bus import read_stream_messages

pytestmark = pytest.mark.integration


def _event(tenant: str, i: int):  # type: ignore[no-untyped-def]
    run = f"r{i % 5}"
    return envelope_for(
        StepRecorded(run_id=run, agent_id="a", step_index=i + 1),
        tenant_id=tenant,
        stream_id=stream_id_for(tenant, "run", run),
        correlation_id="c",
        actor="t",
    )


def _stored_ids(admin_url: str, tenant: str) -> set[str]:
    with psycopg.connect(admin_url) as conn:
        rows = conn.execute(
            "SELECT event_id::text FROM eventstore.events WHERE tenant_id = %s", (tenant,)
        ).fetchall()
    return {r[0] for r in rows}


async def test_nats_killed_and_restarted_loses_no_event(own_system: System) -> None:
    tenant = "natsdown"
    pool = await open_pool(own_system.service_url, max_size=4)
    nc = await connect(own_system.nats_url, "test")
    js = nc.jetstream()
    await ensure_streams(js)
    relay = Relay(own_system.service_url, js, idle_wait=0.2)
    relay_task = asyncio.create_task(relay.run())
    store = EventStore(pool)
    try:
        for i in range(100):
            await store.append(_event(tenant, i).stream_id, [_event(tenant, i)])
        own_system.nats.proc.send_signal(signal.SIGKILL)
        own_system.nats.proc.wait(5)
        # Appends go on while the bus is down: the store is the system of record.
        for i in range(100, 200):
            await store.append(_event(tenant, i).stream_id, [_event(tenant, i)])
        own_system.nats = start_nats(own_system.data_dir, port=own_system.nats.port)
        for i in range(200, 300):
            await store.append(_event(tenant, i).stream_id, [_event(tenant, i)])

        async def everything_on_the_bus() -> bool:
            got = await read_stream_messages(js, tenant, 300, timeout=2)
            return len({str(e.event_id) for e in got}) == 300

        await wait_until(everything_on_the_bus, 60, interval=0.5, what="all 300 events relayed")
        got = await read_stream_messages(js, tenant, 300)
        assert {str(e.event_id) for e in got} == _stored_ids(own_system.admin_url, tenant)
        assert len(got) == 300  # republished tail deduplicated by Nats-Msg-Id
    finally:
        relay.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(relay_task, 10)
        await nc.close()
        await pool.close()


async def test_postgres_stopped_immediately_during_appends_keeps_every_committed_event(
    own_system: System,
) -> None:
    tenant = "pgdown"
    nc = await connect(own_system.nats_url, "test")
    js = nc.jetstream()
    await ensure_streams(js)
    relay = Relay(own_system.service_url, js, idle_wait=0.2)
    relay_task = asyncio.create_task(relay.run())
    pool = await open_pool(own_system.service_url, max_size=4, timeout=1.0)
    store = EventStore(pool)
    acknowledged: set[str] = set()
    failed = 0
    try:
        for i in range(300):
            env = _event(tenant, i)
            if i == 150:
                # "pg_ctl stop -m immediate": the postmaster quits without a checkpoint.
                own_system.pg.proc.send_signal(signal.SIGQUIT)
                own_system.pg.proc.wait(10)
            if i == 156:
                own_system.pg = start_postgres(own_system.data_dir, port=own_system.pg.port)
                await pool.check()
            try:
                await store.append(env.stream_id, [env])
                acknowledged.add(str(env.event_id))
            except MissionControlError:
                failed += 1  # refused while the database was down: the caller knows
        assert failed >= 5
        stored = _stored_ids(own_system.admin_url, tenant)
        # Every append that was acknowledged survived the crash.
        assert acknowledged <= stored

        async def all_relayed() -> bool:
            got = await read_stream_messages(js, tenant, len(stored), timeout=2)
            return {str(e.event_id) for e in got} == stored

        await wait_until(all_relayed, 60, interval=0.5, what="the relay to catch up")
    finally:
        relay.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(relay_task, 10)
        await nc.close()
        await pool.close()
