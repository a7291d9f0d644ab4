"""Wiring of the workflow-engine service into the shared service host."""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import APIRouter

from libs.eventbus.consumer import EventConsumer
from libs.eventbus.jetstream import ConsumerSpec
from libs.eventbus.rpc import RpcServer
from libs.runtime.service_host import ServiceContext, run_service
from services.workflow_engine.entrypoints import (
    APPLIED_TABLE,
    RPC_SERVICE,
    build_rpc,
    violation_consumer_spec,
)
from services.workflow_engine.handlers import WorkflowHandlers


class WorkflowEngineService:
    """The run aggregate's owner: ``mc.rpc.workflow.*`` and the policy-violation consumer.

    ``violation_spec`` defaults to the production consumer; tests pass one with their own durable
    name and tenant filter.
    """

    name: str = "workflow-engine"

    def __init__(self, violation_spec: ConsumerSpec | None = None) -> None:
        self.violation_spec = violation_spec or violation_consumer_spec()
        self.ctx: ServiceContext | None = None
        self.handlers: WorkflowHandlers | None = None
        self.consumer: EventConsumer | None = None
        self.rpc: RpcServer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, ctx: ServiceContext) -> None:
        """Start the violation consumer and serve the RPC routes."""
        self.ctx = ctx
        self.handlers = WorkflowHandlers(ctx.store)
        self.consumer = EventConsumer(
            ctx.js,
            ctx.pool,
            self.violation_spec,
            self.handlers.on_violation,
            applied_table=APPLIED_TABLE,
        )
        self._task = asyncio.create_task(self.consumer.run(), name="workflow-violations")
        ctx.tasks.append(self._task)
        self.rpc = build_rpc(RpcServer(ctx.nc, RPC_SERVICE), self.handlers)
        await self.rpc.start()

    async def stop(self) -> None:
        """Stop serving requests, then stop the consumer (a message in hand is rolled back)."""
        if self.rpc is not None:
            await self.rpc.stop()
        if self.consumer is not None:
            self.consumer.stop()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    def router(self) -> APIRouter | None:
        """No HTTP routes of its own: everything goes through NATS requests."""
        return None

    def ready(self) -> bool:
        """Ready once the consumer is bound to its durable and the routes are subscribed."""
        return self.rpc is not None and self.consumer is not None and self.consumer.running


def main() -> None:
    """Run the workflow-engine service until SIGTERM."""
    run_service(WorkflowEngineService())
