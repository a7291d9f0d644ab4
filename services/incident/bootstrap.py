"""Wiring of the incident service into the shared service host."""

from __future__ import annotations

import asyncio

from libs.eventbus.consumer import EventConsumer
from libs.eventbus.jetstream import ConsumerSpec
from libs.eventbus.rpc import RpcServer
from libs.runtime.service_host import ConsumerRpcService, ServiceContext, run_service
from services.incident.entrypoints import (
    APPLIED_TABLE,
    RPC_SERVICE,
    build_rpc,
    violation_consumer_spec,
)
from services.incident.handlers import IncidentHandlers
from services.incident.metrics import IncidentMetrics


class IncidentService(ConsumerRpcService):
    """Opens an incident per policy violation and serves ``mc.rpc.incident.*``.

    ``violation_spec`` defaults to the production consumer; tests pass one with their own durable
    name and tenant filter.
    """

    name: str = "incident"

    def __init__(self, violation_spec: ConsumerSpec | None = None) -> None:
        super().__init__()
        self.violation_spec = violation_spec or violation_consumer_spec()
        self.handlers: IncidentHandlers | None = None
        self.metrics: IncidentMetrics | None = None
        self._metrics_task: asyncio.Task[None] | None = None

    def wire(self, ctx: ServiceContext) -> tuple[EventConsumer, RpcServer]:
        """The violation consumer and the acknowledge/resolve/get routes."""
        self.handlers = IncidentHandlers(ctx.store)
        consumer = EventConsumer(
            ctx.js,
            ctx.pool,
            self.violation_spec,
            self.handlers.on_violation,
            applied_table=APPLIED_TABLE,
        )
        return consumer, build_rpc(RpcServer(ctx.nc, RPC_SERVICE), self.handlers)

    async def start(self, ctx: ServiceContext) -> None:
        """Start the consumer and the routes, and keep the incident metrics fresh."""
        await super().start(ctx)
        self.metrics = IncidentMetrics().register(ctx.registry)
        self._metrics_task = asyncio.create_task(
            self.metrics.run(ctx.pool), name="incident-metrics"
        )

    async def stop(self) -> None:
        """Stop refreshing the metrics, then stop the routes and the consumer."""
        if self._metrics_task is not None:
            self._metrics_task.cancel()
            await asyncio.gather(self._metrics_task, return_exceptions=True)
            self._metrics_task = None
        await super().stop()


def main() -> None:
    """Run the incident service until SIGTERM."""
    run_service(IncidentService())
