"""Wiring of the workflow-engine service into the shared service host."""

from __future__ import annotations

from libs.eventbus.consumer import EventConsumer
from libs.eventbus.jetstream import ConsumerSpec
from libs.eventbus.rpc import RpcServer
from libs.runtime.service_host import ConsumerRpcService, ServiceContext, run_service
from services.workflow_engine.entrypoints import (
    APPLIED_TABLE,
    RPC_SERVICE,
    build_definition_rpc,
    build_rpc,
    violation_consumer_spec,
)
from services.workflow_engine.handlers import DefinitionHandlers, WorkflowHandlers


class WorkflowEngineService(ConsumerRpcService):
    """The run aggregate's owner: ``mc.rpc.workflow.*`` and the policy-violation consumer.

    ``violation_spec`` defaults to the production consumer; tests pass one with their own durable
    name and tenant filter.
    """

    name: str = "workflow-engine"

    def __init__(self, violation_spec: ConsumerSpec | None = None) -> None:
        super().__init__()
        self.violation_spec = violation_spec or violation_consumer_spec()
        self.handlers: WorkflowHandlers | None = None

    def wire(self, ctx: ServiceContext) -> tuple[EventConsumer, RpcServer]:
        """The violation consumer and the run commands' routes."""
        self.handlers = WorkflowHandlers(ctx.store)
        consumer = EventConsumer(
            ctx.js,
            ctx.pool,
            self.violation_spec,
            self.handlers.on_violation,
            applied_table=APPLIED_TABLE,
        )
        server = build_rpc(RpcServer(ctx.nc, RPC_SERVICE), self.handlers)
        build_definition_rpc(server, DefinitionHandlers(ctx.store))
        return consumer, server


def main() -> None:
    """Run the workflow-engine service until SIGTERM."""
    run_service(WorkflowEngineService())
