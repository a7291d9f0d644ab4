"""The outbox relay: gap-free under out-of-order commits, lossless across kill -9."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import uuid

import psycopg
import psycopg.rows
import pytest

from libs.contracts import envelope_for, stream_id_for
from libs.contracts.events import StepRecorded
from libs.contracts.subjects import events_filter
from libs.eventbus.consumer import EventConsumer
from libs.eventbus.db import open_pool, transaction
from libs.eventbus.jetstream import ConsumerSpec, connect, ensure_streams
from libs.eventbus.relay import Relay
from libs.eventbus.store import EventStore
from tests.conftest import wait_until
from tests.integration.helpers.bus import read_stream_messages, scratch_schema

pytestmark = pytest.mark.integration


def _event(tenant: str, stream: str, i: int):  # type: ignore[no-untyped-def]
    return envelope_for(
        StepRecorded(run_id=stream, agent_id="a", step_index=i + 1, input_tokens=i),
        tenant_id=tenant,
        stream_id=stream_id_for(tenant, "run", stream),
        correlation_id="c",
        actor="writer",
    )


async def test_eight_writers_with_sleeps_and_rollbacks_publish_exactly_the_committed(own_system):
    tenant = "writers"
    pool = await open_pool(own_system.service_url, max_size=10)
    nc = await connect(own_system.nats_url, "test")
    js = nc.jetstream()
    await ensure_streams(js)
    relay = Relay(own_system.service_url, js, idle_wait=0.2)
    relay_task = asyncio.create_task(relay.run())
    store = EventStore(pool)
    committed: list[uuid.UUID] = []
    rng = random.Random(7)

    async def writer(w: int) -> None:
        for n in range(15):
            stream = f"s{w}-{n % 3}"
            events = [_event(tenant, stream, k) for k in range(rng.randint(1, 3))]
            rollback = rng.random() < 0.25
            try:
                async with transaction(pool) as conn:
                    # Sleep before and after the append so transactions overlap and commit out
                    # of position order.
                    await asyncio.sleep(rng.random() * 0.02)
                    await store.append(stream_id_for(tenant, "run", stream), events, conn=conn)
                    await asyncio.sleep(rng.random() * 0.02)
                    if rollback:
                        raise RuntimeError("rollback on purpose")
                committed.extend(e.event_id for e in events)
            except RuntimeError:
                pass

    try:
        await asyncio.gather(*(writer(w) for w in range(8)))
        assert committed
        log = await store.read_all(0, 10_000, tenant_id=tenant)
        assert {e.event_id for e in log} == set(committed), "the store lost or kept an event"
        got = await read_stream_messages(js, tenant, len(committed))
        ids = [e.event_id for e in got]
        assert len(ids) == len(set(ids)), "an event was published twice"
        # Exactly the committed events, in the log's one order, and versions in order per stream.
        assert ids == [e.event_id for e in log]
        per_stream: dict[str, list[int]] = {}
        for e in got:
            per_stream.setdefault(e.stream_id, []).append(e.stream_version)
        for versions in per_stream.values():
            assert versions == list(range(1, len(versions) + 1))
    finally:
        relay.stop()
        await relay_task
        await nc.close()
        await pool.close()


def _start_relay_process(system) -> subprocess.Popen[bytes]:  # type: ignore[no-untyped-def]
    return subprocess.Popen(
        [sys.executable, "-m", "libs.eventbus.relay"],
        env=system.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def test_relay_killed_at_random_moments_loses_nothing_and_effects_apply_once(own_system):
    tenant = "crashy"
    schema = scratch_schema(own_system.admin_url, "relaycrash")
    pool = await open_pool(own_system.service_url, max_size=6)
    nc = await connect(own_system.nats_url, "test")
    js = nc.jetstream()
    await ensure_streams(js)
    store = EventStore(pool)
    total = 0
    rng = random.Random(11)

    async def appender() -> None:
        nonlocal total
        for n in range(400):
            stream = f"r{n % 7}"
            await store.append(stream_id_for(tenant, "run", stream), [_event(tenant, stream, n)])
            total += 1
            if n % 25 == 0:
                await asyncio.sleep(0.01)

    relay = _start_relay_process(own_system)
    kills = 0
    try:
        writing = asyncio.create_task(appender())
        while not writing.done():
            await asyncio.sleep(rng.uniform(0.05, 0.3))
            os.kill(relay.pid, signal.SIGKILL)  # kill -9 at an arbitrary point
            relay.wait()
            kills += 1
            relay = _start_relay_process(own_system)
        await writing
        assert kills >= 2

        async def caught_up() -> bool:
            with psycopg.connect(own_system.admin_url) as conn:
                row = conn.execute(
                    "SELECT (SELECT (log_xid, position) FROM eventstore.relay_checkpoints"
                    " WHERE name='default')"
                    " = (SELECT max((log_xid, position)) FROM eventstore.events)"
                ).fetchone()
                return bool(row and row[0])

        await wait_until(caught_up, 60, what="relay checkpoint reaching the head")

        async def effect(conn, env) -> None:  # type: ignore[no-untyped-def]
            await conn.execute(
                f"INSERT INTO {schema}.effects (event_id) VALUES (%s)", (env.event_id,)
            )

        consumer = EventConsumer(
            js,
            pool,
            ConsumerSpec(durable="crashy-effects", filter_subjects=(events_filter(">", tenant),)),
            effect,
            applied_table=f"{schema}.applied_events",
        )
        task = asyncio.create_task(consumer.run())

        def effects() -> tuple[int, int]:
            with psycopg.connect(own_system.admin_url) as conn:
                row = conn.execute(
                    f"SELECT count(*), count(DISTINCT event_id) FROM {schema}.effects"
                ).fetchone()
                assert row
                return int(row[0]), int(row[1])

        await wait_until(lambda: effects()[1] == total, 60, what="every event applied")
        consumer.stop()
        await task
        count, distinct = effects()
        assert (count, distinct) == (total, total)
        with psycopg.connect(own_system.admin_url) as conn:
            stored = conn.execute(
                "SELECT count(*) FROM eventstore.events WHERE tenant_id = %s", (tenant,)
            ).fetchone()
        assert stored and stored[0] == total
    finally:
        with contextlib.suppress(ProcessLookupError):
            relay.send_signal(signal.SIGTERM)
        relay.wait(10)
        await nc.close()
        await pool.close()


class _LosesOneMessage(Relay):
    """A relay whose connection "drops" one message of a batch or window (fault injection)."""

    lost: set[str]

    async def _publish(self, row, *, after):  # type: ignore[no-untyped-def]
        if str(row["event_id"]) in self.lost:
            self.lost.discard(str(row["event_id"]))
            raise TimeoutError("message lost with the connection")
        await super()._publish(row, after=after)

    async def _send(self, subject, body, headers):  # type: ignore[no-untyped-def]
        if headers["Nats-Msg-Id"] in self.lost:
            self.lost.discard(headers["Nats-Msg-Id"])
            return  # gone without a trace: core publishes have no ack
        await super()._send(subject, body, headers)


@pytest.mark.parametrize("atomic", [True, False], ids=["atomic-batch", "pipelined"])
async def test_a_message_lost_mid_batch_never_lets_later_ones_overtake_it(own_system, atomic):
    tenant = "lossy"
    pool = await open_pool(own_system.service_url, max_size=2)
    nc = await connect(own_system.nats_url, "test")
    js = nc.jetstream()
    await ensure_streams(js)
    store = EventStore(pool)
    try:
        stream = stream_id_for(tenant, "run", "r")
        appended = await store.append(stream, [_event(tenant, "r", i) for i in range(8)])
        relay = _LosesOneMessage(own_system.service_url, js, atomic=atomic)
        relay.lost = {str(appended[2].event_id)}
        async with await psycopg.AsyncConnection.connect(
            own_system.service_url, autocommit=True, row_factory=psycopg.rows.dict_row
        ) as conn:
            await conn.execute(
                "INSERT INTO eventstore.relay_checkpoints (name, position) VALUES ('default', 0) "
                "ON CONFLICT DO NOTHING"
            )
            assert await relay.relay_once(conn) == 8
        assert not relay.lost, "the fault was not injected"
        got = await read_stream_messages(js, tenant, 8)
        assert [e.stream_version for e in got] == list(range(1, 9))
    finally:
        await nc.close()
        await pool.close()


async def test_events_held_back_by_an_open_transaction_are_reported_then_published(own_system):
    """A transaction left open holds the horizon: the relay says so, and publishes the events
    waiting behind it as soon as it ends."""
    from structlog.testing import capture_logs

    tenant = "held"
    pool = await open_pool(own_system.service_url, max_size=3)
    nc = await connect(own_system.nats_url, "test")
    js = nc.jetstream()
    await ensure_streams(js)
    store = EventStore(pool)
    relay = Relay(own_system.service_url, js, held_warning=0.0)
    try:
        async with await psycopg.AsyncConnection.connect(
            own_system.service_url, autocommit=True, row_factory=psycopg.rows.dict_row
        ) as work:
            await work.execute(
                "INSERT INTO eventstore.relay_checkpoints (name, position) VALUES ('default', 0) "
                "ON CONFLICT DO NOTHING"
            )
            await relay.relay_once(work)  # whatever earlier tests left behind
            async with transaction(pool) as open_tx:
                await store.append(
                    stream_id_for(tenant, "run", "open"), [_event(tenant, "open", 0)], conn=open_tx
                )
                await store.append(
                    stream_id_for(tenant, "run", "done"), [_event(tenant, "done", 0)]
                )
                with capture_logs() as logs:
                    assert await relay.relay_once(work) == 0
                held = [e for e in logs if e["event"] == "relay.held_back_by_open_transaction"]
                assert len(held) == 1 and held[0]["xid"]
                assert relay._held is not None and relay._held[2]  # warned, and still held
            assert await relay.relay_once(work) == 2
            assert relay._held is None and relay.stats.held_back_seconds == 0.0
        got = await read_stream_messages(js, tenant, 2)
        assert sorted(e.stream_id for e in got) == sorted(
            stream_id_for(tenant, "run", r) for r in ("open", "done")
        )
    finally:
        await nc.close()
        await pool.close()
