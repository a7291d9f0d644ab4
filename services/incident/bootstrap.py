"""Wiring of the incident service into the shared service host."""

from __future__ import annotations

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


def main() -> None:
    """Run the incident service until SIGTERM."""
    run_service(IncidentService())
