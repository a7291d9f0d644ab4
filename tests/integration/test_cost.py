"""The cost service against real NATS and PostgreSQL: steps in, one ``cost.recorded`` each out."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest

from libs.contracts import EventEnvelope, TraceContext, decode, envelope_for, stream_id_for
from libs.contracts.events import CostRecorded, RunStarted, StepRecorded
from libs.contracts.subjects import event_subject
from libs.errors import InvalidInput
from libs.eventbus.db import open_pool
from libs.eventbus.jetstream import connect, ensure_streams
from libs.eventbus.relay import Relay
from libs.eventbus.rpc import RpcClient
from libs.eventbus.store import EventStore
from libs.runtime.service_host import ServiceContext, new_registry
from libs.settings import Settings
from services.cost.bootstrap import CostService
from services.cost.domain import cost_id_for
from services.cost.handlers import CostHandlers
from tests.conftest import System, wait_until

pytestmark = pytest.mark.integration

TRACE = TraceContext(traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")


def _step(
    tenant: str, run: str, index: int, model: str | None, tin: int, tout: int
) -> EventEnvelope:
    return envelope_for(
        StepRecorded(
            run_id=run,
            agent_id="agent-1",
            step_index=index,
            model=model,
            input_tokens=tin,
            output_tokens=tout,
        ),
        tenant_id=tenant,
        stream_id=stream_id_for(tenant, "run", run),
        correlation_id=f"corr-{run}",
        actor="workflow",
        trace_context=TRACE,
    )


def _costs(envs: list[EventEnvelope]) -> dict[str, tuple[EventEnvelope, CostRecorded]]:
    """Cost events by the step event that caused them."""
    out: dict[str, tuple[EventEnvelope, CostRecorded]] = {}
    for env in envs:
        cost = decode(env)
        assert isinstance(cost, CostRecorded)
        assert env.causation_id is not None
        out[env.causation_id] = (env, cost)
    return out


# Its own servers: the relay holds a database-wide advisory lock and a fresh relay republishes
# the whole store, so sharing the session system would couple this test to every other one.
async def test_steps_are_costed_once_with_the_tenant_prices_in_force(
    own_system: System, unique: Callable[[str], str]
) -> None:
    nc = await connect(own_system.nats_url, unique("cost-test-"))
    js = nc.jetstream()
    await ensure_streams(js)
    pool = await open_pool(own_system.service_url, max_size=6)
    store = EventStore(pool)
    ctx = ServiceContext.wire("cost", Settings(), nc, pool, new_registry())
    relay = Relay(own_system.service_url, js, name=unique("relay-"), idle_wait=0.2)
    relay_task = asyncio.create_task(relay.run(), name=unique("cost-test-relay-"))
    service = CostService()
    assert not service.ready()
    await service.start(ctx)
    try:
        await wait_until(service.ready, what="cost consumer running")
        tenant, run = unique("t"), unique("run")
        cost_sid = stream_id_for(tenant, "cost", run)

        async def cost_events(n: int) -> list[EventEnvelope] | None:
            envs = await store.read_stream(cost_sid)
            return envs if len(envs) >= n else None

        started = envelope_for(
            RunStarted(run_id=run, agent_id="agent-1"),
            tenant_id=tenant,
            stream_id=stream_id_for(tenant, "run", run),
            correlation_id=f"corr-{run}",
            actor="workflow",
        )
        priced = _step(tenant, run, 1, "gpt-4o-2024-08-06", 1000, 200)
        unknown = _step(tenant, run, 2, "in-house-llm", 500, 50)
        await store.append(started.stream_id, [started, priced, unknown], expected_version=0)

        await wait_until(lambda: cost_events(2), what="two cost.recorded events")
        costs = _costs(await store.read_stream(cost_sid))
        assert set(costs) == {str(priced.event_id), str(unknown.event_id)}

        env1, cost1 = costs[str(priced.event_id)]
        assert cost1.pricing_status == "priced"
        # gpt-4o list price: 2.50 USD / 1M input, 10.00 USD / 1M output.
        assert cost1.input_cost_usd == Decimal("0.0025")
        assert cost1.output_cost_usd == Decimal("0.002")
        assert cost1.total_cost_usd == Decimal("0.0045")
        assert cost1.price_table_version == "builtin-2026.11"
        assert cost1.cost_id == cost_id_for(priced.event_id)
        assert (cost1.run_id, cost1.step_index, cost1.model) == (run, 1, "gpt-4o-2024-08-06")
        assert env1.correlation_id == f"corr-{run}"
        assert env1.trace_context == TRACE
        assert env1.actor == "cost"

        env2, cost2 = costs[str(unknown.event_id)]
        assert cost2.pricing_status == "unpriced"
        assert env2.payload["total_cost_usd"] is None
        assert env2.payload["input_cost_usd"] is None
        assert env2.payload["output_cost_usd"] is None

        # Custom prices through the service's request subject.
        client = RpcClient(nc)
        with pytest.raises(InvalidInput, match="negative"):
            await client.call(
                "cost",
                "set_prices",
                {
                    "tenant_id": tenant,
                    "prices": [{"model": "gpt-4o", "input_per_token": -1, "output_per_token": 0}],
                },
            )
        published = await client.call(
            "cost",
            "set_prices",
            {
                "tenant_id": tenant,
                "prices": [
                    {
                        "model": "gpt-4o",
                        "input_per_token": "0.000001",
                        "output_per_token": "0.000002",
                    }
                ],
            },
        )
        assert published == {"version": 1, "price_table_version": "builtin-2026.11+tenant.1"}
        listing = await client.call("cost", "prices", {"tenant_id": tenant})
        assert listing["version"] == 1
        overrides = [p for p in listing["prices"] if p["source"] == "override"]
        assert [(p["model"], p["input_per_token"]) for p in overrides] == [("gpt-4o", "0.000001")]
        assert not any(
            p["model"] == "gpt-4o" for p in listing["prices"] if p["source"] == "builtin"
        )

        third = _step(tenant, run, 3, "gpt-4o", 1000, 200)
        await store.append(third.stream_id, [third])
        await wait_until(lambda: cost_events(3), what="the third cost.recorded event")
        _, cost3 = _costs(await store.read_stream(cost_sid))[str(third.event_id)]
        assert cost3.pricing_status == "priced"
        assert cost3.total_cost_usd == Decimal("0.0014")  # 1000 x 1e-6 + 200 x 2e-6
        assert cost3.price_table_version == "builtin-2026.11+tenant.1"

        # Redelivery: the same step event again, under a message id JetStream has not seen.
        consumer = service.consumer
        assert consumer is not None
        duplicates_before = consumer.stats.duplicates
        (stored_priced,) = [
            e for e in await store.read_stream(priced.stream_id) if e.event_id == priced.event_id
        ]
        await js.publish(
            event_subject(tenant, "run.step_recorded"),
            stored_priced.model_dump_json().encode(),
            headers={"Nats-Msg-Id": f"redelivery-{uuid.uuid4()}"},
        )
        await wait_until(
            lambda: consumer.stats.duplicates > duplicates_before, what="the redelivery handled"
        )
        final = await store.read_stream(cost_sid)
        assert len(final) == 3
        assert sorted(e.causation_id or "" for e in final) == sorted(
            str(e.event_id) for e in (priced, unknown, third)
        )
        assert consumer.stats.dead_lettered == 0
    finally:
        await service.stop()
        assert not service.ready()
        for task in ctx.tasks:
            task.cancel()
        await asyncio.gather(*ctx.tasks, return_exceptions=True)
        relay.stop()
        await asyncio.wait_for(relay_task, 10)
        await nc.close()
        await pool.close()


async def test_concurrent_price_changes_get_consecutive_versions(pool: Any, tenant: str) -> None:
    handlers = CostHandlers(EventStore(pool))

    async def publish(price: str) -> Any:
        return await handlers.set_prices(
            tenant,
            [{"model": "m", "input_per_token": price, "output_per_token": price}],
            correlation_id="c",
            actor="test",
        )

    results = await asyncio.gather(publish("0.1"), publish("0.2"))
    assert sorted(r["version"] for r in results) == [1, 2]
    listing = await handlers.prices(tenant)
    assert listing["version"] == 2
    table = await handlers.price_table(tenant)
    assert table.version == "builtin-2026.11+tenant.2"
    # Exactly two published events: the loser of the race retried instead of overwriting.
    events = await EventStore(pool).read_stream(stream_id_for(tenant, "prices", "table"))
    assert [decode(e).version for e in events] == [1, 2]  # type: ignore[attr-defined]
