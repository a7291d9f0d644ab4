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
    budget_consumer_spec,
    build_rpc,
    violation_consumer_spec,
)
from services.incident.handlers import IncidentHandlers
from services.incident.metrics import IncidentMetrics


class IncidentService(ConsumerRpcService):
    """Opens an incident per policy violation and per exhausted budget window, and serves
    ``mc.rpc.incident.*``.

    The specs default to the production consumers; tests pass ones with their own durable names
    and tenant filters.
    """

    name: str = "incident"

    def __init__(
        self, violation_spec: ConsumerSpec | None = None, budget_spec: ConsumerSpec | None = None
    ) -> None:
        super().__init__()
        self.violation_spec = violation_spec or violation_consumer_spec()
        self.budget_spec = budget_spec or budget_consumer_spec()
        self.budget_consumer: EventConsumer | None = None
        self._budget_task: asyncio.Task[None] | None = None
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
        self.budget_consumer = EventConsumer(
            ctx.js,
            ctx.pool,
            self.budget_spec,
            self.handlers.on_budget_alert,
            applied_table=APPLIED_TABLE,
        )
        return consumer, build_rpc(RpcServer(ctx.nc, RPC_SERVICE), self.handlers)

    async def start(self, ctx: ServiceContext) -> None:
        """Start the consumers and the routes, and keep the incident metrics fresh."""
        await super().start(ctx)
        assert self.budget_consumer is not None
        self._budget_task = asyncio.create_task(
            self.budget_consumer.run(), name="incident-budget-consumer"
        )
        ctx.tasks.append(self._budget_task)
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
        if self.budget_consumer is not None:
            self.budget_consumer.stop()
        if self._budget_task is not None and not self._budget_task.done():
            await asyncio.wait({self._budget_task}, timeout=10)
        await super().stop()

    def ready(self) -> bool:
        """Ready once the routes and both consumers are running."""
        return super().ready() and self.budget_consumer is not None and self.budget_consumer.running


def main() -> None:
    """Run the incident service until SIGTERM."""
    run_service(IncidentService())
