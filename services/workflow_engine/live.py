"""Live tokens: the usage a worker streams while a step runs, priced, checked against the
budgets, and published for viewers.

A worker reports the cumulative usage of the call it is making (``report_usage``), every few
hundred milliseconds while the provider streams. The engine:

1. answers ``abort`` at once for a run that has ended (timed out, aborted, stopped), with the
   reason it ended;
2. prices the usage with the tenant's price table, as the cost service prices a recorded step
   (:func:`libs.pricing.price_step`, the same table from the ``prices`` stream);
3. for an attempt of a workflow step, checks the cost so far against every window the attempt
   holds a reservation in (:func:`~services.workflow_engine.budgets.streamed_overrun`): when
   spent + what others reserved + streamed would pass a cap, the attempt is stopped
   (``execution.step_stopped``, the step blocked, its run ended, the execution failed, all in one
   transaction) and the answer is ``abort``;
4. publishes the report on ``MC_LIVE`` (``mc.live.<tenant>.<execution>.<run>``) for the SSE
   endpoints. A report that cannot be published is still answered: progress is for viewers, and
   the recorded step stays the system of record.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import structlog
from nats.js import JetStreamContext
from pydantic import BaseModel, ConfigDict

from libs.contracts.envelope import utcnow
from libs.contracts.subjects import live_subject
from libs.domain.prices import PRICE_TABLE_ID, PRICES, TenantPrices
from libs.domain.run import RunState
from libs.errors import NotFound
from libs.eventbus.db import transaction
from libs.eventbus.repository import EventMeta, Repository, Store
from libs.eventbus.rpc import RequestMeta
from libs.pricing import price_step
from services.workflow_engine.budget_ledger import BudgetLedger
from services.workflow_engine.budgets import streamed_overrun
from services.workflow_engine.execution_handlers import ENGINE_ACTOR, ExecutionHandlers
from services.workflow_engine.executions import StopStep, parse_attempt_run_id

log = structlog.get_logger("workflow_engine.live")

PUBLISH_TIMEOUT_S = 1.0
USAGE_FIELDS = (
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
)


class LiveReport(BaseModel):
    """One report as published on ``MC_LIVE`` (``mc.live.<tenant>.<execution or _>.<run>``): the
    cumulative usage so far of call ``step_index``, its cost, and what the worker was told."""

    model_config = ConfigDict(frozen=True)

    run_id: str
    execution_id: str | None
    step_id: str | None
    agent_id: str
    step_index: int
    model: str | None
    input_tokens: int
    cached_input_tokens: int
    cache_write_tokens: int
    output_tokens: int
    reasoning_tokens: int
    abort: bool
    reason: str | None
    cost_usd: str | None
    pricing_status: str
    reported_at: str


@dataclass(frozen=True)
class UsageReport:
    """What a worker reports: the cumulative usage so far of call ``step_index`` of a run."""

    run_id: str
    step_index: int
    model: str | None
    usage: dict[str, int]


class LiveUsage:
    """The ``report_usage`` handler."""

    def __init__(
        self,
        store: Store,
        runs: Repository[RunState],
        executions: ExecutionHandlers,
        pool: Any,
        js: JetStreamContext | None,
        ledger: BudgetLedger | None = None,
    ) -> None:
        self.runs = runs
        self.executions = executions
        self.pool = pool
        self.js = js
        self.ledger = ledger or BudgetLedger()
        self.prices = Repository(store, PRICES, cache_size=1_000)

    async def report(
        self, tenant_id: str, report: UsageReport, meta: RequestMeta
    ) -> dict[str, Any]:
        """Price the report, stop the step if a budget cannot take it, publish it; answer
        ``{"abort", "reason", "cost_usd", "pricing_status"}``."""
        run = await self.runs.load(tenant_id, report.run_id)
        if not run.exists:
            raise NotFound(f"run {report.run_id} not found")
        now = utcnow()
        prices: TenantPrices = await self.prices.load(tenant_id, PRICE_TABLE_ID)
        price = price_step(
            prices.table, report.model, report.usage["input_tokens"],
            report.usage["output_tokens"], now,
            cached_input_tokens=report.usage["cached_input_tokens"],
            cache_write_tokens=report.usage["cache_write_tokens"],
            reasoning_tokens=report.usage["reasoning_tokens"],
        )  # fmt: skip
        cost = price.total_cost_usd
        abort, reason = run.is_terminal, _ended(run)
        attempt = parse_attempt_run_id(report.run_id)
        if not abort and attempt is not None and cost:
            abort, reason = await self._check_budgets(tenant_id, report, attempt, cost, meta)
        answer = {
            "abort": abort,
            "reason": reason,
            "cost_usd": _usd(cost),
            "pricing_status": price.pricing_status,
        }
        execution_id = run.labels.get("execution_id") or (attempt[0] if attempt else None)
        await self._publish(tenant_id, execution_id, run, report, answer, now.isoformat())
        return answer

    async def _check_budgets(
        self,
        tenant_id: str,
        report: UsageReport,
        attempt: tuple[str, str, int],
        cost: Decimal,
        meta: RequestMeta,
    ) -> tuple[bool, str | None]:
        execution_id, step_id, _ = attempt
        async with transaction(self.pool) as conn:
            windows = await self.ledger.held_windows(conn, tenant_id, report.run_id)
        overrun = streamed_overrun(windows, cost, step_id)
        if overrun is None:
            return False, None
        cmd = StopStep(
            run_id=report.run_id, step_index=report.step_index, model=report.model,
            usage=report.usage, overrun=overrun, now=utcnow(),
        )  # fmt: skip
        event_meta = EventMeta(
            correlation_id=meta.correlation_id, actor=ENGINE_ACTOR, trace_context=meta.trace_context
        )
        state = await self.executions.stop_step(tenant_id, execution_id, cmd, event_meta)
        step = state.steps.get(step_id)
        # Stopped now, or ended meanwhile for another reason: either way the worker must stop.
        if step is not None and step.run_id == report.run_id and step.reason:
            return True, step.reason
        return True, overrun.reason

    async def _publish(
        self,
        tenant_id: str,
        execution_id: str | None,
        run: RunState,
        report: UsageReport,
        answer: dict[str, Any],
        at: str,
    ) -> None:
        if self.js is None:
            return
        body = LiveReport(
            run_id=report.run_id, execution_id=execution_id, step_id=run.labels.get("step_id"),
            agent_id=run.agent_id, step_index=report.step_index, model=report.model,
            **report.usage, **answer, reported_at=at,
        )  # fmt: skip
        subject = live_subject(tenant_id, execution_id, report.run_id)
        with contextlib.suppress(Exception):
            await self.js.publish(
                subject, body.model_dump_json().encode(), timeout=PUBLISH_TIMEOUT_S
            )
            return
        log.warning("live.publish_failed", run_id=report.run_id)


def _ended(run: RunState) -> str | None:
    if not run.is_terminal:
        return None
    return run.end_reason or f"run {run.run_id} has ended ({run.status})"


def _usd(d: Decimal | None) -> str | None:
    return None if d is None else format(d.normalize(), "f")
