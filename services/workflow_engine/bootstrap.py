"""Wiring of the workflow-engine service into the shared service host."""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from libs.contracts.envelope import EventEnvelope
from libs.eventbus.consumer import EventConsumer
from libs.eventbus.db import AsyncConn
from libs.eventbus.jetstream import ConsumerSpec
from libs.eventbus.rpc import RpcServer
from libs.runtime.service_host import ConsumerRpcService, ServiceContext, run_service
from services.workflow_engine.budget_handlers import BudgetHandlers
from services.workflow_engine.entrypoints import (
    APPLIED_TABLE,
    RPC_SERVICE,
    build_budget_rpc,
    build_definition_rpc,
    build_execution_rpc,
    build_live_rpc,
    build_rpc,
    cost_consumer_spec,
    dispatch_consumer_spec,
    execution_consumer_spec,
    violation_consumer_spec,
)
from services.workflow_engine.execution_handlers import ExecutionHandlers, publish_work
from services.workflow_engine.handlers import DefinitionHandlers, WorkflowHandlers
from services.workflow_engine.live import LiveUsage
from services.workflow_engine.promotion_handlers import PromotionHandlers, promotion_routes

log = structlog.get_logger("workflow_engine")

TICK_INTERVAL_S = 0.5
"""How often due deadlines and retries are looked for: the slack on a step's timeout."""


class WorkflowEngineService(ConsumerRpcService):
    """The run and execution aggregates' owner.

    It serves ``mc.rpc.workflow.*``, consumes policy violations (stopping runs), runs ending
    (moving executions on), its own dispatches (forwarding them to the agents' work queues),
    attempts' costs (settling their budget holds), and ticks deadlines and retries. Tests pass
    consumer specs with their own durable names and tenant filters.
    """

    name: str = "workflow-engine"

    def __init__(
        self,
        violation_spec: ConsumerSpec | None = None,
        execution_spec: ConsumerSpec | None = None,
        dispatch_spec: ConsumerSpec | None = None,
        cost_spec: ConsumerSpec | None = None,
    ) -> None:
        super().__init__()
        self.violation_spec = violation_spec or violation_consumer_spec()
        self.execution_spec = execution_spec or execution_consumer_spec()
        self.dispatch_spec = dispatch_spec or dispatch_consumer_spec()
        self.cost_spec = cost_spec or cost_consumer_spec()
        self.handlers: WorkflowHandlers | None = None
        self.executions: ExecutionHandlers | None = None
        self.promotions: PromotionHandlers | None = None
        self._extra: list[EventConsumer] = []
        self._extra_tasks: list[asyncio.Task[None]] = []

    def wire(self, ctx: ServiceContext) -> tuple[EventConsumer, RpcServer]:
        """The violation consumer and the routes; the execution consumers start beside them."""
        self.handlers = WorkflowHandlers(ctx.store)
        definitions = DefinitionHandlers(ctx.store)
        budgets = BudgetHandlers(ctx.store)
        self.executions = ExecutionHandlers(ctx.store, self.handlers, definitions, budgets)
        consumer = EventConsumer(
            ctx.js,
            ctx.pool,
            self.violation_spec,
            self.handlers.on_violation,
            applied_table=APPLIED_TABLE,
        )

        executions = self.executions

        async def forward(conn: AsyncConn, env: EventEnvelope) -> None:
            if not executions.sent_at_once(env):
                await publish_work(ctx.js, env)

        async def finished(env: EventEnvelope) -> None:
            # The next steps' work items go out as soon as their dispatch commits. The dispatch
            # consumer skips those this process sent; another replica's copy is a duplicate
            # MC_WORK drops.
            dispatched = await executions.on_run_finished(env)
            await asyncio.gather(*(publish_work(ctx.js, d) for d in dispatched))
            executions.note_sent(dispatched)

        self.handlers.after_finish = finished

        self._extra = [
            EventConsumer(
                ctx.js,
                ctx.pool,
                self.execution_spec,
                self.executions.on_run_event,
                applied_table=APPLIED_TABLE,
            ),
            EventConsumer(
                ctx.js, ctx.pool, self.dispatch_spec, forward, applied_table=APPLIED_TABLE
            ),
            EventConsumer(
                ctx.js, ctx.pool, self.cost_spec, budgets.on_cost, applied_table=APPLIED_TABLE
            ),
        ]
        server = build_rpc(RpcServer(ctx.nc, RPC_SERVICE), self.handlers)
        build_definition_rpc(server, definitions)
        build_execution_rpc(server, self.executions, ctx.pool)
        build_budget_rpc(server, budgets, ctx.store, ctx.pool)
        live = LiveUsage(ctx.store, self.handlers.runs, self.executions, ctx.pool, ctx.js)
        build_live_rpc(server, live)
        self.promotions = PromotionHandlers(ctx.store, self.executions.policies)
        promotion_routes(server, self.promotions, ctx.pool)
        return consumer, server

    async def start(self, ctx: ServiceContext) -> None:
        """Start the violation consumer and the routes, then the execution consumers and ticker."""
        await super().start(ctx)
        for extra in self._extra:
            task = asyncio.create_task(extra.run(), name=f"{self.name}-{extra.spec.durable}")
            self._extra_tasks.append(task)
            ctx.tasks.append(task)
        ticker = asyncio.create_task(self._tick_forever(ctx), name=f"{self.name}-ticker")
        self._extra_tasks.append(ticker)
        ctx.tasks.append(ticker)

    async def _tick_forever(self, ctx: ServiceContext) -> None:
        assert self.executions is not None
        assert self.promotions is not None
        while True:
            try:
                moved = await self.executions.tick(ctx.pool)
                # Promotion requests share the sweep: their SLAs escalate or expire them.
                moved += await self.promotions.tick(ctx.pool)
            except Exception as exc:
                # The index keeps what is due: the next tick picks it up again.
                log.warning("workflow.tick_failed", error=type(exc).__name__)
                moved = 0
            if not moved:
                await asyncio.sleep(TICK_INTERVAL_S)

    async def stop(self) -> None:
        """Stop the routes and every consumer; cancel the ticker."""
        await super().stop()
        for extra in self._extra:
            extra.stop()
        for task in self._extra_tasks:
            if task.get_name().endswith("-ticker"):
                task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait(set(self._extra_tasks), timeout=10)

    def ready(self) -> bool:
        """Ready once the routes and every consumer are running."""
        return super().ready() and all(c.running for c in self._extra)


def main() -> None:
    """Run the workflow-engine service until SIGTERM."""
    run_service(WorkflowEngineService())
