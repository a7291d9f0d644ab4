"""Wiring of the cost service into the shared service host."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter

from libs.eventbus.consumer import EventConsumer
from libs.eventbus.rpc import RpcServer
from libs.runtime.service_host import ServiceContext, run_service
from services.cost.entrypoints import build_rpc_server
from services.cost.handlers import APPLIED_TABLE, CONSUMER, CostHandlers, steps_consumer_spec

# The consumer notices a stop request within its 1 s fetch timeout; wait a little longer.
STOP_TIMEOUT_S = 5.0


class CostService:
    """Costs every recorded step and serves the tenants' price tables.

    ``durable`` names the JetStream consumer; only tests running beside another cost consumer
    on the same server need to change it.
    """

    name: str = "cost"

    def __init__(self, durable: str = CONSUMER) -> None:
        self.durable = durable
        self.ctx: ServiceContext | None = None
        self.handlers: CostHandlers | None = None
        self.consumer: EventConsumer | None = None
        self.rpc: RpcServer | None = None
        self._task: asyncio.Task[Any] | None = None

    async def start(self, ctx: ServiceContext) -> None:
        """Serve the RPC routes and start the ``cost-steps`` consumer in the background."""
        self.ctx = ctx
        self.handlers = CostHandlers(ctx.store, ctx.registry)
        self.consumer = EventConsumer(
            ctx.js,
            ctx.pool,
            steps_consumer_spec(self.durable),
            self.handlers.on_step_recorded,
            applied_table=APPLIED_TABLE,
            # Every recorded step passes through here: one commit per fetched batch keeps up
            # with ingest. The handler only caches committed price tables, so a rolled-back
            # batch leaves nothing behind.
            batch_transactions=True,
        )
        self.rpc = build_rpc_server(ctx.nc, self.handlers)
        await self.rpc.start()
        self._task = asyncio.create_task(self.consumer.run(), name=f"cost-consumer-{self.durable}")
        ctx.tasks.append(self._task)

    async def stop(self) -> None:
        """Stop answering requests, then let the consumer finish the message in hand."""
        if self.rpc is not None:
            await self.rpc.stop()
        if self.consumer is not None:
            self.consumer.stop()
        if self._task is not None and not self._task.done():
            # asyncio.wait never raises: a task still running after the timeout is cancelled
            # by the host with the rest of ctx.tasks.
            await asyncio.wait({self._task}, timeout=STOP_TIMEOUT_S)

    def router(self) -> APIRouter | None:
        """No HTTP routes of its own: requests arrive over NATS."""
        return None

    def ready(self) -> bool:
        """Ready once the consumer is fetching (a dead consumer task means not ready)."""
        return (
            self.consumer is not None
            and self.consumer.running
            and self._task is not None
            and not self._task.done()
        )


def main() -> None:
    """Run the cost service until SIGTERM."""
    run_service(CostService())
