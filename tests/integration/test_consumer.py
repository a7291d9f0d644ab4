"""Consumers: exactly-once effects across a crash, poison messages to the dead-letter path."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import orjson
import psycopg
import pytest

from libs.contracts import envelope_for, stream_id_for
from libs.contracts.events import StepRecorded
from libs.contracts.subjects import dlq_subject, event_subject, events_filter
from libs.errors import TransientError
from libs.eventbus.consumer import EventConsumer
from libs.eventbus.jetstream import ConsumerSpec, connect, ensure_streams
from libs.eventbus.store import EventStore
from tests.conftest import wait_until
from tests.integration.helpers.bus import scratch_schema
from tests.integration.helpers.crashing_consumer import consumer_spec

pytestmark = pytest.mark.integration


async def _publish(js, env) -> None:  # type: ignore[no-untyped-def]
    # What the relay does, for tests that must not depend on a relay on the shared database.
    await js.publish(
        event_subject(env.tenant_id, env.event_type),
        env.model_dump_json().encode(),
        headers={"Nats-Msg-Id": str(env.event_id), "Mc-Correlation-Id": env.correlation_id},
    )


def _step(tenant: str, i: int):  # type: ignore[no-untyped-def]
    return envelope_for(
        StepRecorded(run_id="r", agent_id="a", step_index=i),
        tenant_id=tenant,
        stream_id=stream_id_for(tenant, "run", f"r{i}"),
        correlation_id=f"corr-{i}",
        actor="t",
    )


def _count(admin_url: str, schema: str) -> tuple[int, int]:
    with psycopg.connect(admin_url) as conn:
        row = conn.execute(
            f"SELECT count(*), count(DISTINCT event_id) FROM {schema}.effects"
        ).fetchone()
        assert row
        return int(row[0]), int(row[1])


async def test_consumer_killed_after_effect_before_ack_applies_once(system, pool, tenant, unique):
    schema = scratch_schema(system.admin_url, unique("cc"))
    durable = unique("crash")
    nc = await connect(system.nats_url, "test")
    js = nc.jetstream()
    await ensure_streams(js)
    env = _step(tenant, 1)
    await EventStore(pool).append(env.stream_id, [env])
    await _publish(js, env)

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.integration.helpers.crashing_consumer",
            system.nats_url,
            system.service_url,
            durable,
            schema,
            tenant,
        ],
        env=system.env(),
        timeout=60,
        capture_output=True,
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert _count(system.admin_url, schema) == (1, 1)  # the effect committed before the crash

    async def effect(conn, e) -> None:  # type: ignore[no-untyped-def]
        await conn.execute(f"INSERT INTO {schema}.effects (event_id) VALUES (%s)", (e.event_id,))

    consumer = EventConsumer(
        js, pool, consumer_spec(durable, tenant), effect, applied_table=f"{schema}.applied_events"
    )
    task = asyncio.create_task(consumer.run())
    try:
        await wait_until(lambda: consumer.stats.duplicates == 1, 30, what="the redelivery")
        assert consumer.stats.applied == 0
        assert _count(system.admin_url, schema) == (1, 1)
    finally:
        consumer.stop()
        await task
        await nc.close()


@pytest.mark.parametrize("batched", [False, True], ids=["per-event", "per-batch"])
async def test_poison_message_is_dead_lettered_after_max_deliver_while_others_flow(
    system, pool, tenant, unique, batched
):
    schema = scratch_schema(system.admin_url, unique("pm"))
    nc = await connect(system.nats_url, "test")
    js = nc.jetstream()
    await ensure_streams(js)
    envs = [_step(tenant, i) for i in range(1, 11)]
    poison = envs[3]
    attempts: dict[str, int] = {}

    async def effect(conn, e) -> None:  # type: ignore[no-untyped-def]
        attempts[str(e.event_id)] = attempts.get(str(e.event_id), 0) + 1
        if e.event_id == poison.event_id:
            raise TransientError("downstream keeps failing for this one")
        await conn.execute(f"INSERT INTO {schema}.effects (event_id) VALUES (%s)", (e.event_id,))

    async def effects(conn, batch) -> None:  # type: ignore[no-untyped-def]
        for e in batch:
            await effect(conn, e)

    durable = unique("poison")
    spec = ConsumerSpec(
        durable=durable,
        filter_subjects=(events_filter(">", tenant),),
        max_deliver=3,
        backoff=(0.05, 0.05, 0.05),
        ack_wait=5,
    )
    dlq = await js.pull_subscribe(dlq_subject(durable), durable=unique("dlqreader"))
    for e in envs:
        await _publish(js, e)
    consumer = EventConsumer(
        js,
        pool,
        spec,
        effect,
        applied_table=f"{schema}.applied_events",
        batch_handler=effects if batched else None,
    )
    task = asyncio.create_task(consumer.run())
    try:
        await wait_until(lambda: _count(system.admin_url, schema)[1] == 9, 30, what="the others")
        await wait_until(lambda: consumer.stats.dead_lettered == 1, 30, what="dead letter")
        msgs = await dlq.fetch(1, timeout=5)
        assert len(msgs) == 1
        dead = msgs[0]
        assert orjson.loads(dead.data)["event_id"] == str(poison.event_id)
        assert dead.headers and dead.headers["Mc-Dlq-Deliveries"] == "3"
        assert "downstream keeps failing" in dead.headers["Mc-Dlq-Reason"]
        if batched:
            # A failed batch is rolled back whole and each message retried alone, so others in
            # the poison's batch ran twice; their effect still landed exactly once.
            assert attempts[str(poison.event_id)] == 4
        else:
            assert attempts[str(poison.event_id)] == 3
            # Nothing else was retried.
            assert all(n == 1 for k, n in attempts.items() if k != str(poison.event_id))
        assert _count(system.admin_url, schema) == (9, 9)
    finally:
        consumer.stop()
        await task
        await nc.close()


async def test_malformed_message_goes_straight_to_the_dead_letter_path(
    system, pool, tenant, unique
):
    schema = scratch_schema(system.admin_url, unique("mf"))
    nc = await connect(system.nats_url, "test")
    js = nc.jetstream()
    await ensure_streams(js)
    durable = unique("malformed")
    dlq = await js.pull_subscribe(dlq_subject(durable), durable=unique("dlqreader"))
    await js.publish(
        event_subject(tenant, "run.step_recorded"),
        b"{not json",
        headers={"Nats-Msg-Id": unique("m")},
    )

    async def effect(conn, e) -> None:  # type: ignore[no-untyped-def]
        raise AssertionError("must not be called")

    consumer = EventConsumer(
        js,
        pool,
        ConsumerSpec(durable=durable, filter_subjects=(events_filter(">", tenant),)),
        effect,
        applied_table=f"{schema}.applied_events",
    )
    task = asyncio.create_task(consumer.run())
    try:
        msgs = await dlq.fetch(1, timeout=15)
        assert msgs[0].data == b"{not json"
        assert msgs[0].headers and msgs[0].headers["Mc-Dlq-Deliveries"] == "1"
    finally:
        consumer.stop()
        await task
        await nc.close()


async def test_batched_consumer_skips_what_was_applied_and_in_batch_repeats(
    system, pool, tenant, unique
):
    schema = scratch_schema(system.admin_url, unique("ba"))
    nc = await connect(system.nats_url, "test")
    js = nc.jetstream()
    await ensure_streams(js)
    envs = [_step(tenant, i) for i in range(1, 6)]
    durable = unique("batched")
    with psycopg.connect(system.admin_url, autocommit=True) as conn:
        for e in envs[:2]:  # applied before, by an earlier incarnation of this consumer
            conn.execute(
                f"INSERT INTO {schema}.applied_events (consumer, event_id) VALUES (%s, %s)",
                (durable, e.event_id),
            )
    for e in envs:
        await _publish(js, e)
    # The same event again under another message id: a redelivery JetStream cannot deduplicate.
    await js.publish(
        event_subject(tenant, envs[4].event_type),
        envs[4].model_dump_json().encode(),
        headers={"Nats-Msg-Id": unique("again")},
    )
    batches: list[int] = []

    async def effects(conn, batch) -> None:  # type: ignore[no-untyped-def]
        batches.append(len(batch))
        for e in batch:
            await conn.execute(
                f"INSERT INTO {schema}.effects (event_id) VALUES (%s)", (e.event_id,)
            )

    async def one(conn, e) -> None:  # type: ignore[no-untyped-def]
        await effects(conn, [e])

    spec = ConsumerSpec(durable=durable, filter_subjects=(events_filter(">", tenant),))
    consumer = EventConsumer(
        js, pool, spec, one, applied_table=f"{schema}.applied_events", batch_handler=effects
    )
    task = asyncio.create_task(consumer.run())
    try:
        await wait_until(
            lambda: consumer.stats.applied + consumer.stats.duplicates == 6, 30, what="all six"
        )
        assert _count(system.admin_url, schema) == (3, 3)
        assert consumer.stats.applied == 3
        assert consumer.stats.duplicates == 3
        assert max(batches) > 1  # it really took the batched path
    finally:
        consumer.stop()
        await task
        await nc.close()
