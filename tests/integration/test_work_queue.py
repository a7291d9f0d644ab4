"""The gateway's work queues on a real NATS: an item fetched for a worker that has gone goes
back to the queue and the next worker takes it; an item handed over is never delivered again."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import orjson
import pytest
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from libs.contracts.subjects import WORK_STREAM, work_subject
from libs.eventbus.jetstream import connect, ensure_streams
from services.gateway.work import WorkQueues, work_durable
from tests.conftest import System

pytestmark = pytest.mark.integration


@pytest.fixture
async def js(system: System) -> AsyncIterator[JetStreamContext]:
    nc = await connect(system.nats_url, "test")
    try:
        js = nc.jetstream()
        await ensure_streams(js)
        yield js
    finally:
        await nc.close()


async def _queued(
    js: JetStreamContext, unique: Callable[[str], str], item: dict[str, int]
) -> tuple[WorkQueues, str, str]:
    """A new agent's queue holding ``item``; the queues, the tenant and the agent."""
    tenant, agent = unique("t"), unique("agent")
    queues = WorkQueues(js)
    # The queue's consumer exists before the item is published (as the engine's does).
    assert await queues.take(tenant, agent, 0.05) is None
    await js.publish(work_subject(tenant, agent), orjson.dumps(item))
    return queues, tenant, agent


async def test_a_poll_whose_worker_left_gives_its_item_back(
    js: JetStreamContext, unique: Callable[[str], str]
) -> None:
    queues, tenant, agent = await _queued(js, unique, {"attempt": 1})
    asked: list[int] = []

    async def gone_after_fetch() -> bool:
        # Connected when the poll starts; gone by the time the item arrives.
        asked.append(1)
        return len(asked) > 1

    assert await queues.take(tenant, agent, 5, gone=gone_after_fetch) is None
    assert len(asked) == 2  # asked again once the item was fetched
    # The next worker takes it at once, and only once.
    assert await queues.take(tenant, agent, 5) == {"attempt": 1}
    assert await queues.take(tenant, agent, 0.5) is None


async def test_a_worker_gone_before_the_poll_takes_nothing(
    js: JetStreamContext, unique: Callable[[str], str]
) -> None:
    queues, tenant, agent = await _queued(js, unique, {"attempt": 2})

    async def gone() -> bool:
        return True

    assert await queues.take(tenant, agent, 5, gone=gone) is None
    assert await queues.take(tenant, agent, 5) == {"attempt": 2}


async def test_a_queue_made_by_an_older_gateway_is_brought_up_to_date(
    js: JetStreamContext, unique: Callable[[str], str]
) -> None:
    """Earlier gateways made the consumers with ``max_deliver=1`` (an item given back would be
    lost); the first take updates such a consumer in place."""
    tenant, agent = unique("t"), unique("agent")
    old = ConsumerConfig(
        durable_name=work_durable(tenant, agent),
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        filter_subject=work_subject(tenant, agent),
        max_deliver=1,
        ack_wait=30,
    )
    await js.add_consumer(WORK_STREAM, old)
    assert await WorkQueues(js).take(tenant, agent, 0.05) is None
    info = await js.consumer_info(WORK_STREAM, work_durable(tenant, agent))
    assert info.config.max_deliver == -1
