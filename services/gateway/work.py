"""Agents take their dispatched workflow steps through the gateway.

The workflow-engine puts each dispatched attempt on the JetStream work queue
``mc.work.<tenant>.<agent>`` (stream ``MC_WORK``). Workers do not connect to NATS: they ask the
gateway over HTTP with their API key (``POST /v1/agents/{agent}/work:take``), so an agent needs no
bus credentials and can only ever see its own tenant's work. The gateway holds one durable pull
consumer per tenant and agent, takes at most one item per request, and acknowledges it as it hands
it over: an attempt is delivered once. If the worker then never finishes it, the engine's deadline
fails the attempt and dispatches the next one.

A long poll whose worker has gone (it stopped, or its client gave up) must not take an item: the
handler checks the connection before each fetch and again before acknowledging, and gives back
(``nak``) an item fetched for a worker that left, so the next request takes it at once. A
gateway that dies between fetch and acknowledgement leaves the item unacknowledged; it is
delivered again after ``ack_wait``.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import BadRequestError, NotFoundError

from libs.contracts.subjects import WORK_STREAM, work_subject
from libs.errors import TransientError

POLL_S = 1.0
"""One fetch's wait: a long poll is several, so other requests for the same queue get turns."""


def work_durable(tenant_id: str, agent_id: str) -> str:
    """The durable consumer of one tenant's agent's queue."""
    return f"work-{tenant_id}-{agent_id}"


class WorkQueues:
    """The pull consumers of the work queues, created on first use."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self._subs: dict[tuple[str, str], Any] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    async def _sub(self, tenant_id: str, agent_id: str) -> Any:
        key = (tenant_id, agent_id)
        sub = self._subs.get(key)
        if sub is None:
            durable = work_durable(tenant_id, agent_id)
            config = ConsumerConfig(
                durable_name=durable,
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                filter_subject=work_subject(tenant_id, agent_id),
                # An item is acknowledged as it is handed over, so redelivery only ever covers
                # one fetched for a worker that left (given back) or by a gateway that died
                # before handing it over.
                max_deliver=-1,
                ack_wait=30,
            )
            try:
                await self.js.add_consumer(WORK_STREAM, config)
            except NotFoundError:
                raise TransientError(
                    "no work queue yet: the workflow-engine has not created it"
                ) from None
            except BadRequestError:
                pass  # it exists already
            sub = self._subs[key] = await self.js.pull_subscribe_bind(durable, stream=WORK_STREAM)
        return sub

    async def take(
        self,
        tenant_id: str,
        agent_id: str,
        wait_s: float,
        gone: Callable[[], Awaitable[bool]] | None = None,
    ) -> dict[str, Any] | None:
        """The next work item of the agent, waiting up to ``wait_s`` for one; None if none came
        or if the asker is ``gone`` (an item fetched for it is given back)."""
        lock = self._locks.setdefault((tenant_id, agent_id), asyncio.Lock())
        deadline = time.monotonic() + wait_s
        while True:
            async with lock:
                if gone is not None and await gone():
                    return None
                sub = await self._sub(tenant_id, agent_id)
                left = deadline - time.monotonic()
                try:
                    msgs = await sub.fetch(1, timeout=max(0.05, min(POLL_S, left)))
                except NatsTimeout:
                    msgs = []
                if msgs and gone is not None and await gone():
                    await msgs[0].nak()
                    return None
                if msgs:
                    await msgs[0].ack()
                    item: dict[str, Any] = orjson.loads(msgs[0].data)
                    return item
            if time.monotonic() >= deadline:
                return None


_queues: weakref.WeakKeyDictionary[JetStreamContext, WorkQueues] = weakref.WeakKeyDictionary()


def work_queues(js: JetStreamContext) -> WorkQueues:
    """The :class:`WorkQueues` of a gateway's JetStream context (one per process)."""
    queues = _queues.get(js)
    if queues is None:
        queues = _queues[js] = WorkQueues(js)
    return queues
