"""The workflow-engine's request routes (``mc.rpc.workflow.<method>``) and its consumer spec."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from libs.contracts import new_uuid7
from libs.contracts.envelope import TenantId
from libs.contracts.events import BudgetScope, BudgetWindow, StepStatus
from libs.contracts.limits import (
    MAX_AGENT_ID,
    MAX_KIND,
    MAX_LABELS,
    MAX_NAME,
    MAX_REASON,
    MAX_STEP_INDEX,
    MAX_TOKENS,
    RUN_ID_PATTERN,
)
from libs.contracts.subjects import events_filter
from libs.eventbus.jetstream import ConsumerSpec
from libs.eventbus.repository import Store
from libs.eventbus.rpc import Meta, RequestMeta, RpcServer
from libs.eventbus.uow import begin
from libs.usage import require_consistent
from services.workflow_engine.approvals import rules_from
from services.workflow_engine.budget_handlers import BudgetHandlers
from services.workflow_engine.budgets import Budget
from services.workflow_engine.definitions import NAME_PATTERN, document_from
from services.workflow_engine.domain import RecordStep
from services.workflow_engine.execution_handlers import (
    MAX_CURSOR,
    ExecutionHandlers,
    ExecutionQuery,
    decode_cursor,
)
from services.workflow_engine.handlers import DefinitionHandlers, WorkflowHandlers
from services.workflow_engine.live import USAGE_FIELDS, LiveUsage, UsageReport

RPC_SERVICE = "workflow"
VIOLATIONS_DURABLE = "workflow-violations"
EXECUTIONS_DURABLE = "workflow-executions"
DISPATCH_DURABLE = "workflow-dispatch"
COSTS_DURABLE = "workflow-budget-costs"
APPLIED_TABLE = "workflow.applied_events"
MAX_BATCH = 1000


def violation_consumer_spec(
    durable: str = VIOLATIONS_DURABLE, tenant_id: str = "*"
) -> ConsumerSpec:
    """The durable consumer of ``policy.violation_detected`` (tests narrow durable and tenant)."""
    return ConsumerSpec(
        durable=durable,
        filter_subjects=(events_filter("policy.violation_detected", tenant_id),),
    )


def execution_consumer_spec(
    durable: str = EXECUTIONS_DURABLE, tenant_id: str = "*"
) -> ConsumerSpec:
    """The durable consumer of runs ending (the attempts of workflow steps among them)."""
    return ConsumerSpec(
        durable=durable,
        filter_subjects=(
            events_filter("run.completed", tenant_id),
            events_filter("run.stopped_by_policy", tenant_id),
        ),
    )


def dispatch_consumer_spec(durable: str = DISPATCH_DURABLE, tenant_id: str = "*") -> ConsumerSpec:
    """The durable consumer that forwards dispatched attempts to the agents' work queues."""
    return ConsumerSpec(
        durable=durable,
        filter_subjects=(events_filter("execution.step_dispatched", tenant_id),),
    )


def cost_consumer_spec(durable: str = COSTS_DURABLE, tenant_id: str = "*") -> ConsumerSpec:
    """The durable consumer of ``cost.recorded``: attempts' costs settle their budget holds."""
    return ConsumerSpec(
        durable=durable,
        filter_subjects=(events_filter("cost.recorded", tenant_id),),
    )


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    tenant_id: TenantId


class StartRunRequest(_Request):
    """``start_run``: a run id is generated (UUIDv7) when the caller gives none."""

    run_id: str | None = Field(default=None, pattern=RUN_ID_PATTERN)
    agent_id: str = Field(min_length=1, max_length=MAX_AGENT_ID)
    labels: dict[str, str] = Field(default_factory=dict, max_length=MAX_LABELS)


class StepItem(BaseModel):
    """One step outcome in ``record_steps``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_id: str = Field(pattern=RUN_ID_PATTERN)
    step_index: int = Field(ge=1)
    kind: str = Field(default="llm_call", min_length=1, max_length=MAX_KIND)
    model: str | None = Field(default=None, max_length=MAX_NAME)
    tool: str | None = Field(default=None, max_length=MAX_NAME)
    status: StepStatus = "ok"
    input_tokens: int = Field(default=0, ge=0)
    cached_input_tokens: int = Field(default=0, ge=0)
    cache_write_tokens: int = Field(default=0, ge=0)
    output_tokens: int = Field(default=0, ge=0)
    reasoning_tokens: int = Field(default=0, ge=0)
    provider_cost_usd: Decimal | None = Field(default=None, ge=0, allow_inf_nan=False)
    duration_ms: float = Field(default=0, ge=0)
    input: Any = None
    output: Any = None
    error: str | None = None

    @model_validator(mode="after")
    def _usage_adds_up(self) -> StepItem:
        return require_consistent(self)

    def command(self) -> RecordStep:
        """The domain command."""
        return RecordStep(**self.model_dump())


class ReportUsageRequest(_Request):
    """``report_usage``: the cumulative usage so far of call ``step_index`` of a running run."""

    run_id: str = Field(pattern=RUN_ID_PATTERN)
    step_index: int = Field(ge=1, le=MAX_STEP_INDEX)
    model: str | None = Field(default=None, max_length=MAX_NAME)
    input_tokens: int = Field(default=0, ge=0, le=MAX_TOKENS)
    cached_input_tokens: int = Field(default=0, ge=0, le=MAX_TOKENS)
    cache_write_tokens: int = Field(default=0, ge=0, le=MAX_TOKENS)
    output_tokens: int = Field(default=0, ge=0, le=MAX_TOKENS)
    reasoning_tokens: int = Field(default=0, ge=0, le=MAX_TOKENS)

    @model_validator(mode="after")
    def _usage_adds_up(self) -> ReportUsageRequest:
        return require_consistent(self)

    def report(self) -> UsageReport:
        """The handler's view of the request."""
        usage = {f: int(getattr(self, f)) for f in USAGE_FIELDS}
        return UsageReport(self.run_id, self.step_index, self.model, usage)


class RecordStepsRequest(_Request):
    """``record_steps``: a batch of step outcomes, possibly of many runs."""

    items: list[StepItem] = Field(min_length=1, max_length=MAX_BATCH)


class FinishRunRequest(_Request):
    """``finish_run``."""

    run_id: str = Field(pattern=RUN_ID_PATTERN)
    status: Literal["completed", "failed"]
    reason: str | None = Field(default=None, max_length=MAX_REASON)


class GetRunRequest(_Request):
    """``get_run``."""

    run_id: str = Field(pattern=RUN_ID_PATTERN)


class SaveWorkflowRequest(_Request):
    """``save_workflow``: a workflow document (its ``name`` is the workflow id)."""

    document: dict[str, Any]
    base_version: int | None = Field(default=None, ge=0)


class WorkflowRequest(_Request):
    """``get_workflow``: one version (default: the newest)."""

    workflow_id: str = Field(pattern=NAME_PATTERN)
    version: int | None = Field(default=None, ge=1)


class DiffWorkflowRequest(_Request):
    """``diff_workflow``: from one version to another (default: the newest)."""

    workflow_id: str = Field(pattern=NAME_PATTERN)
    from_version: int = Field(ge=1)
    to_version: int | None = Field(default=None, ge=1)


class RegisterAgentRequest(_Request):
    """``register_agent``."""

    agent_id: str = Field(pattern=NAME_PATTERN)
    description: str = Field(default="", max_length=2000)


def build_definition_rpc(server: RpcServer, handlers: DefinitionHandlers) -> RpcServer:
    """Register the workflow-definition and agent-catalogue routes on ``server``."""

    @server.handler("save_workflow")
    async def save_workflow(req: SaveWorkflowRequest, meta: Meta) -> Any:
        """Validate a workflow document and save it as its next version."""
        doc = document_from(req.document)
        return await handlers.save(req.tenant_id, doc, req.base_version, meta)

    @server.handler("list_workflows")
    async def list_workflows(req: _Request) -> Any:
        """The tenant's workflows, newest version of each."""
        return {"workflows": await handlers.list_workflows(req.tenant_id)}

    @server.handler("get_workflow")
    async def get_workflow(req: WorkflowRequest) -> Any:
        """One version of a workflow with its document."""
        return await handlers.get(req.tenant_id, req.workflow_id, req.version)

    @server.handler("diff_workflow")
    async def diff_workflow(req: DiffWorkflowRequest) -> Any:
        """What changed between two versions of a workflow."""
        return await handlers.diff(req.tenant_id, req.workflow_id, req.from_version, req.to_version)

    @server.handler("register_agent")
    async def register_agent(req: RegisterAgentRequest, meta: Meta) -> Any:
        """Add an agent to the tenant's catalogue."""
        return await handlers.register_agent(req.tenant_id, req.agent_id, req.description, meta)

    @server.handler("list_agents")
    async def list_agents(req: _Request) -> Any:
        """The tenant's registered agents."""
        return {"agents": await handlers.list_agents(req.tenant_id)}

    return server


class StartExecutionRequest(_Request):
    """``start_execution``: run a workflow version (default: the newest) with inputs."""

    workflow_id: str = Field(pattern=NAME_PATTERN)
    version: int | None = Field(default=None, ge=1)
    inputs: dict[str, Any] = Field(default_factory=dict)
    budget_usd: Decimal | None = Field(default=None, ge=0, le=1_000_000_000, decimal_places=10)


class ExecutionRequest(_Request):
    """``get_execution``."""

    execution_id: str = Field(pattern=RUN_ID_PATTERN)


class AbortExecutionRequest(ExecutionRequest):
    """``abort_execution``: the reason is recorded."""

    reason: str = Field(min_length=1, max_length=2000)


class ListExecutionsRequest(_Request):
    """``list_executions``: newest first, filtered, a page at a time (``cursor``: the previous
    page's ``next_cursor``)."""

    status: Literal["pending", "running", "completed", "failed", "aborted"] | None = None
    workflow_id: str | None = Field(default=None, pattern=NAME_PATTERN)
    started_after: datetime | None = None
    started_before: datetime | None = None
    cursor: str | None = Field(default=None, min_length=1, max_length=MAX_CURSOR)
    limit: int = Field(default=100, ge=1, le=1000)

    @model_validator(mode="after")
    def _aware(self) -> ListExecutionsRequest:
        for name in ("started_after", "started_before"):
            value = getattr(self, name)
            if value is not None and value.tzinfo is None:
                raise ValueError(f"{name} needs a time zone (e.g. 2026-11-30T12:00:00Z)")
        return self

    def query(self) -> ExecutionQuery:
        """The domain query (a bad cursor is a 422 naming it)."""
        return ExecutionQuery(
            status=self.status,
            workflow_id=self.workflow_id,
            started_after=self.started_after,
            started_before=self.started_before,
            after=decode_cursor(self.cursor) if self.cursor else None,
            limit=self.limit,
        )


class ApprovalRequest(ExecutionRequest):
    """``approve_step`` / ``reject_step``: the gateway names the person and their role."""

    step_id: str = Field(pattern=NAME_PATTERN)
    approver: str = Field(min_length=1, max_length=200)
    role: Literal["viewer", "operator", "approver", "admin"]
    reason: str = Field(min_length=1, max_length=2000)


class SetApprovalRulesRequest(_Request):
    """``set_approval_rules``: the rule of each gated tier (``write``, ``irreversible``)."""

    rules: dict[str, Any]


def build_execution_rpc(server: RpcServer, handlers: ExecutionHandlers, pool: Any) -> RpcServer:
    """Register the workflow-execution routes on ``server``."""

    @server.handler("start_execution")
    async def start_execution(req: StartExecutionRequest, meta: Meta) -> Any:
        """Start an execution; its first steps are dispatched at once."""
        return await handlers.start(
            req.tenant_id, req.workflow_id, req.version, req.inputs, meta, req.budget_usd
        )

    @server.handler("get_execution")
    async def get_execution(req: ExecutionRequest) -> Any:
        """An execution with its steps' states."""
        return await handlers.get(req.tenant_id, req.execution_id)

    @server.handler("list_executions")
    async def list_executions(req: ListExecutionsRequest) -> Any:
        """The tenant's executions, newest first."""
        return await handlers.list_executions(req.tenant_id, req.query(), pool)

    @server.handler("abort_execution")
    async def abort_execution(req: AbortExecutionRequest, meta: Meta) -> Any:
        """Abort an execution: nothing more is dispatched and its running attempts end."""
        return await handlers.abort(req.tenant_id, req.execution_id, req.reason, meta)

    async def decide(req: ApprovalRequest, meta: RequestMeta, approve: bool) -> Any:
        return await handlers.decide_approval(
            req.tenant_id, req.execution_id, req.step_id, approve=approve,
            approver=req.approver, role=req.role, reason=req.reason, meta=meta,
        )  # fmt: skip

    @server.handler("approve_step")
    async def approve_step(req: ApprovalRequest, meta: Meta) -> Any:
        """Approve a step waiting for approval; it is dispatched once enough people have."""
        return await decide(req, meta, approve=True)

    @server.handler("reject_step")
    async def reject_step(req: ApprovalRequest, meta: Meta) -> Any:
        """Reject a step waiting for approval: the execution fails with the reason."""
        return await decide(req, meta, approve=False)

    @server.handler("approval_queue")
    async def approval_queue(req: _Request) -> Any:
        """Steps waiting for approval, oldest first, with age and SLA."""
        return {"approvals": await handlers.approval_queue(req.tenant_id, pool)}

    @server.handler("approval_rules")
    async def approval_rules(req: _Request) -> Any:
        """The tenant's approval rules."""
        return await handlers.approval_rules(req.tenant_id)

    @server.handler("set_approval_rules")
    async def set_approval_rules(req: SetApprovalRulesRequest, meta: Meta) -> Any:
        """Set the tenant's approval rules for executions started from now on."""
        return await handlers.set_approval_rules(req.tenant_id, rules_from(req.rules), meta)

    return server


class SetBudgetRequest(_Request):
    """``set_budget``: the cap of one scope and window (``subject``: the agent, workflow or
    execution id; empty for the tenant)."""

    scope: BudgetScope
    subject: str = Field(default="", pattern=r"^$|" + RUN_ID_PATTERN)
    window: BudgetWindow
    cap_usd: Decimal = Field(ge=0, le=1_000_000_000, decimal_places=10)


class ListBudgetsRequest(_Request):
    """``list_budgets``: optionally one scope; per-execution windows of ``execution_id``."""

    scope: BudgetScope | None = None
    execution_id: str | None = Field(default=None, pattern=RUN_ID_PATTERN)


class SetTimezoneRequest(_Request):
    """``set_budget_timezone``: the IANA time zone of the tenant's day and month windows."""

    timezone: str = Field(min_length=1, max_length=64)


def build_budget_rpc(
    server: RpcServer, handlers: BudgetHandlers, store: Store, pool: Any
) -> RpcServer:
    """Register the budget routes on ``server``."""
    from services.workflow_engine.handlers import caller_meta

    @server.handler("set_budget")
    async def set_budget(req: SetBudgetRequest, meta: Meta) -> Any:
        """Set a budget's cap; a new cap applies to its current window at once."""
        budget = Budget.of(req.scope, req.subject, req.window, req.cap_usd)
        async with begin(store) as uow:  # type: ignore[arg-type]
            return await handlers.set_budget(uow, req.tenant_id, budget, caller_meta(meta))

    @server.handler("list_budgets")
    async def list_budgets(req: ListBudgetsRequest) -> Any:
        """Each budget with its current window's spent, reserved and remaining."""
        return await handlers.list_budgets(pool, req.tenant_id, req.scope, req.execution_id)

    @server.handler("set_budget_timezone")
    async def set_budget_timezone(req: SetTimezoneRequest, meta: Meta) -> Any:
        """Set the time zone of the tenant's day and month windows (default UTC)."""
        async with begin(store) as uow:  # type: ignore[arg-type]
            return await handlers.set_timezone(uow, req.tenant_id, req.timezone, caller_meta(meta))

    return server


def build_live_rpc(server: RpcServer, live: LiveUsage) -> RpcServer:
    """Register the live-usage route on ``server``."""

    @server.handler("report_usage")
    async def report_usage(req: ReportUsageRequest, meta: Meta) -> Any:
        """Price a running call's usage so far; stop the step when a budget cannot take it."""
        return await live.report(req.tenant_id, req.report(), meta)

    return server


def build_rpc(server: RpcServer, handlers: WorkflowHandlers) -> RpcServer:
    """Register the workflow routes on ``server``."""

    @server.handler("start_run")
    async def start_run(req: StartRunRequest, meta: Meta) -> Any:
        """Start a run (its id generated when the caller gives none)."""
        return await handlers.start_run(
            req.tenant_id, req.run_id or str(new_uuid7()), req.agent_id, req.labels, meta
        )

    @server.handler("record_steps")
    async def record_steps(req: RecordStepsRequest, meta: Meta) -> Any:
        """Record a batch of step outcomes, possibly of many runs."""
        return await handlers.record_steps(req.tenant_id, [i.command() for i in req.items], meta)

    @server.handler("finish_run")
    async def finish_run(req: FinishRunRequest, meta: Meta) -> Any:
        """Finish a run as completed or failed."""
        return await handlers.finish_run(req.tenant_id, req.run_id, req.status, req.reason, meta)

    @server.handler("get_run")
    async def get_run(req: GetRunRequest) -> Any:
        """A run's state."""
        state = await handlers.get_run(req.tenant_id, req.run_id)
        return state.to_dict()

    return server
