"""Wiring of the cost service into the shared service host."""

from __future__ import annotations

from libs.eventbus.consumer import EventConsumer
from libs.eventbus.rpc import RpcServer
from libs.runtime.service_host import ConsumerRpcService, ServiceContext, run_service
from services.cost.entrypoints import build_rpc_server
from services.cost.handlers import APPLIED_TABLE, CONSUMER, CostHandlers, steps_consumer_spec


class CostService(ConsumerRpcService):
    """Costs every recorded step and serves the tenants' price tables.

    ``durable`` names the JetStream consumer; only tests running beside another cost consumer
    on the same server need to change it.
    """

    name: str = "cost"

    def __init__(self, durable: str = CONSUMER) -> None:
        super().__init__()
        self.durable = durable
        self.handlers: CostHandlers | None = None

    def wire(self, ctx: ServiceContext) -> tuple[EventConsumer, RpcServer]:
        """The recorded-step consumer and the price-table routes."""
        self.handlers = CostHandlers(ctx.store, ctx.registry)
        consumer = EventConsumer(
            ctx.js,
            ctx.pool,
            steps_consumer_spec(self.durable),
            self.handlers.on_step_recorded,
            applied_table=APPLIED_TABLE,
            # Every recorded step passes through here: one transaction and one append per
            # fetched batch keeps up with ingest. The handler only caches committed price
            # tables, so a rolled-back batch leaves nothing behind.
            batch_handler=self.handlers.on_steps_recorded,
        )
        return consumer, build_rpc_server(ctx.nc, self.handlers)


def main() -> None:
    """Run the cost service until SIGTERM."""
    run_service(CostService())
