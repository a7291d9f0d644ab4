"""Request shapes of the gateway's agent, workflow and execution routes (in ``entrypoints``).

The routes forward to the workflow-engine (``mc.rpc.workflow.*``) with the caller's tenant. A
workflow document may be sent as JSON or, with ``Content-Type: application/yaml``, as YAML.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any, Literal

import orjson
import yaml
from fastapi import Path, Query, Request
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from libs import errors
from libs.contracts.limits import WORKFLOW_NAME_PATTERN
from services.gateway.schemas import NoNul, Reason, json_without_nul

NAME_PATTERN = WORKFLOW_NAME_PATTERN
MAX_DOCUMENT_BYTES = 256 * 1024

MAX_VERSION = 1_000_000
"""Far above any real count of versions; keeps numbers inside what every encoder takes."""
MAX_WAIT_S = 30.0
"""The longest long poll for work: below common proxies' idle timeouts."""

AgentNamePath = Annotated[str, Path(pattern=NAME_PATTERN, description="The agent's name.")]
WorkflowIdPath = Annotated[str, Path(pattern=NAME_PATTERN, description="The workflow's name.")]
EXECUTION_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
ExecutionIdPath = Annotated[
    str, Path(pattern=EXECUTION_ID_PATTERN, description="The execution's id.")
]
StepIdPath = Annotated[str, Path(pattern=NAME_PATTERN, description="The step's id.")]
ExecutionStatus = Literal["pending", "running", "completed", "failed", "aborted"]
MAX_CURSOR = 300
CursorQuery = Annotated[
    str | None,
    Query(
        min_length=1,
        max_length=MAX_CURSOR,
        pattern=r"^[A-Za-z0-9_-]+$",
        description="The previous page's next_cursor.",
    ),
]


class RegisterAgentRequest(BaseModel):
    """An agent for the tenant's catalogue: workflow steps may name only registered agents."""

    model_config = ConfigDict(extra="forbid")

    agent_id: str = Field(pattern=NAME_PATTERN)
    description: Annotated[str, Field(max_length=2000), NoNul] = ""


class StartExecutionRequest(BaseModel):
    """Which version to run (default: the newest) and the inputs every step receives."""

    model_config = ConfigDict(extra="forbid")

    version: int | None = Field(default=None, ge=1, le=MAX_VERSION)
    inputs: Annotated[dict[str, Any], AfterValidator(json_without_nul)] = Field(
        default_factory=dict
    )
    budget_usd: Decimal | None = Field(
        default=None,
        ge=0,
        le=1_000_000_000,
        decimal_places=10,
        description="A budget of this execution's own (USD), checked before its first step.",
    )


class AbortExecutionRequest(BaseModel):
    """Why the execution is aborted (recorded)."""

    model_config = ConfigDict(extra="forbid")

    reason: Reason


BudgetScope = Literal["tenant", "agent", "workflow", "execution"]


class SetBudgetRequest(BaseModel):
    """A budget's cap: per tenant, agent, workflow or execution, over a day, a month (in the
    tenant's time zone) or each execution."""

    model_config = ConfigDict(extra="forbid")

    scope: BudgetScope
    subject: str = Field(
        default="",
        pattern=r"^$|^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$",
        description="The agent, workflow or execution id; empty for the tenant.",
    )
    window: Literal["day", "month", "execution"]
    cap_usd: Decimal = Field(ge=0, le=1_000_000_000, decimal_places=10)


class SetBudgetTimezoneRequest(BaseModel):
    """The IANA time zone of the tenant's day and month budget windows (default UTC)."""

    model_config = ConfigDict(extra="forbid")

    timezone: str = Field(min_length=1, max_length=64, examples=["Europe/Paris"])


DOCUMENT_BODY = {
    "requestBody": {
        "required": True,
        "description": "A workflow document (see docs/workflows.md), as JSON or YAML.",
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "application/yaml": {"schema": {"type": "object"}},
        },
    }
}


async def read_document(request: Request) -> dict[str, Any]:
    """The request's workflow document, parsed as YAML or JSON by its content type."""
    raw = await request.body()
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise errors.InvalidInput(f"workflow document is over {MAX_DOCUMENT_BYTES} bytes")
    media = request.headers.get("content-type", "application/json")
    data: Any
    try:
        data = yaml.safe_load(raw) if "yaml" in media else orjson.loads(raw)
    except (yaml.YAMLError, orjson.JSONDecodeError, UnicodeDecodeError) as exc:
        kind = "YAML" if "yaml" in media else "JSON"
        first = (str(exc).splitlines() or ["unreadable"])[0]
        raise errors.InvalidInput(f"workflow document is not valid {kind}: {first}") from None
    if not isinstance(data, dict):
        raise errors.InvalidInput("workflow document must be a mapping with 'name' and 'steps'")
    try:
        return dict(json_without_nul(data))
    except ValueError as exc:
        raise errors.InvalidInput(f"workflow document {exc}") from None


class ApprovalDecision(BaseModel):
    """Why you approve or reject (recorded with your identity)."""

    model_config = ConfigDict(extra="forbid")

    reason: Reason


class ApprovalRuleIn(BaseModel):
    """One risk tier's approval rule."""

    model_config = ConfigDict(extra="forbid")

    required: int = Field(default=0, ge=0, le=10)
    role: Literal["viewer", "operator", "approver", "admin"] = "approver"
    sla_s: float = Field(default=3600, gt=0, le=30 * 86_400)
    on_expiry: Literal["reject", "escalate"] = "reject"


class ApprovalRulesIn(BaseModel):
    """The approval rules of the gated tiers (``read_only`` never waits)."""

    model_config = ConfigDict(extra="forbid")

    write: ApprovalRuleIn | None = None
    irreversible: ApprovalRuleIn | None = None


def approval_payload(
    principal: Any, execution_id: str, step_id: str, reason: str
) -> dict[str, Any]:
    """The engine's request for a person's approval decision: who they are and their highest
    role in the tenant (the engine checks it against the tier's rule)."""
    return {
        "execution_id": execution_id,
        "step_id": step_id,
        "approver": principal.actor,
        "role": highest_role(principal),
        "reason": reason,
    }


def highest_role(principal: Any) -> str:
    """The highest role a person holds in the tenant (``viewer`` for an API key)."""
    roles: frozenset[str] = getattr(principal, "roles", frozenset())
    ranked = [r for r in ROLE_ORDER if r in roles]
    return ranked[-1] if ranked else "viewer"


ROLE_ORDER = ("viewer", "operator", "approver", "admin")


# --- answers ---------------------------------------------------------------------------------


class _Answer(BaseModel):
    """Answers keep fields a newer server adds, so old clients keep working."""

    model_config = ConfigDict(extra="allow")


class AgentRegisteredResponse(_Answer):
    """``registered`` is False when the agent was registered already, as described."""

    agent_id: str
    registered: bool


class AgentListing(_Answer):
    """The tenant's registered agents."""

    agents: list[dict[str, Any]]


class WorkItem(_Answer):
    """A dispatched attempt of a step: its run is started; admit, record and finish it."""

    tenant_id: str
    execution_id: str
    workflow_id: str
    step_id: str
    attempt: int
    run_id: str
    agent_id: str
    inputs: dict[str, Any]
    risk_tier: str
    deadline_at: str


class WorkflowSaved(_Answer):
    """The version saved (``created`` False: the document equals the newest version)."""

    workflow_id: str
    version: int
    document_hash: str
    created: bool


class WorkflowListing(_Answer):
    """Every workflow, newest version of each."""

    workflows: list[dict[str, Any]]


class WorkflowVersion(_Answer):
    """One version of a workflow with its document and every version number."""

    workflow_id: str
    version: int
    versions: list[int]
    document_hash: str
    document: dict[str, Any]


class WorkflowDiff(_Answer):
    """Steps added and removed, and each changed field by dotted path."""

    workflow_id: str
    from_version: int
    to_version: int
    steps_added: list[str]
    steps_removed: list[str]
    changes: list[dict[str, Any]]


class StepApprovalView(_Answer):
    """A gated step's approvals: how many are needed, by whom so far, and its SLA."""

    required: int
    role: str | None = None
    approvers: list[str]
    pending: bool
    requested_at: str | None = None
    expires_at: str | None = None
    escalated: bool = False


class ExecutionStepView(_Answer):
    """One step of an execution: where it is and where its time went.

    ``queued_ms`` runs from the step becoming ready to its first dispatch (the approval wait; 0
    for an ungated step), ``running_ms`` from its first dispatch to its end (every attempt and
    backoff), up to now while it has not ended. ``duration_ms`` is its latest attempt's.
    """

    step_id: str
    agent_id: str
    depends_on: list[str]
    risk_tier: str
    state: str
    attempt: int
    run_id: str | None = None
    duration_ms: float | None = None
    ready_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    queued_ms: float | None = None
    running_ms: float | None = None
    on_critical_path: bool = False
    reason: str | None = None
    approval: StepApprovalView | None = None


class ExecutionView(_Answer):
    """An execution: its status, its DAG with each step's state, attempt, run and timing, and
    its critical path (the chain of steps that decided how long it took, and that time)."""

    execution_id: str
    workflow_id: str
    workflow_version: int
    status: str
    reason: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    steps: list[ExecutionStepView]
    critical_path: list[str] = Field(default_factory=list)
    critical_path_ms: float = 0.0


class ExecutionSummary(_Answer):
    """One execution in a listing."""

    execution_id: str
    workflow_id: str
    workflow_version: int
    status: str
    started_at: str
    finished_at: str | None = None


class ExecutionListing(_Answer):
    """A page of executions, newest first; pass ``next_cursor`` as ``cursor`` for the next
    (null: this is the last page)."""

    executions: list[ExecutionSummary]
    next_cursor: str | None = None


class ApprovalQueueEntry(_Answer):
    """A step waiting for approval: how long it has waited and how long its SLA has left
    (negative once it ran out, until the engine rejects or escalates it)."""

    execution_id: str
    step_id: str
    workflow_id: str
    risk_tier: str
    required: int
    approvals: int
    role: str
    requested_at: str
    expires_at: str
    age_s: float
    sla_left_s: float


class ApprovalQueue(_Answer):
    """Steps waiting for approval, oldest first, with their age and the SLA left."""

    approvals: list[ApprovalQueueEntry]


class ApprovalRulesView(_Answer):
    """The approval rules in force and how many times they were set."""

    version: int
    rules: dict[str, Any]


class BudgetSetResponse(_Answer):
    """The budget set (``changed`` False: it already had that cap)."""

    budget_id: str
    changed: bool


class BudgetView(_Answer):
    """A budget and its current window: spent, reserved by attempts still out, and what is left
    of the cap (USD as decimal strings; null for a per-execution window without
    ``execution_id``)."""

    budget_id: str
    scope: BudgetScope
    subject: str
    window: Literal["day", "month", "execution"]
    window_key: str | None = None
    cap_usd: str
    spent_usd: str | None = None
    reserved_usd: str | None = None
    remaining_usd: str | None = None
    alerted_pct: int = 0


class BudgetListing(_Answer):
    """The tenant's budget time zone and each budget's current window."""

    timezone: str
    budgets: list[BudgetView]


class BudgetTimezoneResponse(_Answer):
    """The time zone of the tenant's day and month windows."""

    timezone: str
