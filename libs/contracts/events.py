"""Every event type Mission Control publishes, at its current schema version.

Naming: ``<aggregate>.<past-tense fact>``. The NATS subject of an event is
``mc.evt.<tenant>.<event_type>`` (see ``libs.contracts.subjects``).
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import Field, PlainSerializer

from libs.contracts.envelope import DomainEvent
from libs.contracts.registry import register, upcaster

Severity = Literal["low", "medium", "high", "critical"]
Outcome = Literal["allow", "warn", "deny"]
RunStatus = Literal["running", "completed", "failed", "stopped_by_policy"]

# Money travels as a plain decimal string ("0.0000001500", never "1.5E-7"), so every consumer,
# whatever its JSON library, reads the exact amount.
Usd = Annotated[
    Decimal, PlainSerializer(lambda d: format(d, "f"), return_type=str, when_used="json")
]
StepStatus = Literal["ok", "error"]


# --- runs (owned by workflow-engine) -------------------------------------------------------------


@register
class RunStartedV1(DomainEvent):
    """Version 1 named the agent ``agent``; kept only so stored v1 events stay readable."""

    event_type = "run.started"
    schema_version = 1

    run_id: str
    agent: str


@register
class RunStarted(DomainEvent):
    """An agent run began."""

    event_type = "run.started"
    schema_version = 2

    run_id: str
    agent_id: str
    labels: dict[str, str] = Field(default_factory=dict)


@upcaster("run.started", 1)
def upcast_run_started_v1_v2(payload: dict[str, Any]) -> dict[str, Any]:
    """v1 → v2: ``agent`` was renamed ``agent_id`` and ``labels`` was added."""
    data = dict(payload)
    data["agent_id"] = data.pop("agent")
    data.setdefault("labels", {})
    return data


@register
class StepRecorded(DomainEvent):
    """A step of a run finished (successfully or not) and reported its outcome."""

    event_type = "run.step_recorded"
    schema_version = 1

    run_id: str
    agent_id: str
    step_index: int = Field(ge=1)
    kind: str = "llm_call"
    model: str | None = None
    tool: str | None = None
    status: StepStatus = "ok"
    input_tokens: int = Field(default=0, ge=0)
    output_tokens: int = Field(default=0, ge=0)
    duration_ms: float = Field(default=0, ge=0)
    input: Any = None
    output: Any = None
    error: str | None = None


@register
class RunCompleted(DomainEvent):
    """A run ended on its own: ``completed`` or ``failed``."""

    event_type = "run.completed"
    schema_version = 1

    run_id: str
    status: Literal["completed", "failed"]
    reason: str | None = None


@register
class RunStoppedByPolicy(DomainEvent):
    """A run was stopped because admission denied one of its steps."""

    event_type = "run.stopped_by_policy"
    schema_version = 1

    run_id: str
    step_index: int
    policy_id: str
    decision_id: str
    reason: str


# --- admission (owned by policy-admission) -------------------------------------------------------


class Reason(DomainEvent):
    """Why a policy said what it said."""

    event_type = "_reason"
    schema_version = 1

    policy_id: str
    severity: Severity
    message: str
    runbook_url: str | None = None


@register
class AdmissionDecided(DomainEvent):
    """Admission answered a before-step request."""

    event_type = "admission.decided"
    schema_version = 1

    decision_id: str
    run_id: str
    agent_id: str
    step_index: int
    outcome: Outcome
    reasons: list[Reason] = Field(default_factory=list)
    bundle_digest: str
    context: dict[str, Any] = Field(default_factory=dict)


@register
class PolicyViolationDetected(DomainEvent):
    """A step was denied: the policy named would have been broken had the step run."""

    event_type = "policy.violation_detected"
    schema_version = 1

    violation_id: str
    decision_id: str
    run_id: str
    agent_id: str
    step_index: int
    policy_id: str
    severity: Severity
    message: str
    runbook_url: str | None = None
    bundle_digest: str
    trace_id: str | None = None


class PolicyInfo(DomainEvent):
    """Metadata of one policy in a bundle."""

    event_type = "_policy_info"
    schema_version = 1

    policy_id: str
    title: str
    severity: Severity
    runbook_url: str | None = None
    description: str | None = None


@register
class PolicyBundleActivated(DomainEvent):
    """A compiled policy bundle became the one admission decides with, for a tenant."""

    event_type = "policy.bundle_activated"
    schema_version = 1

    bundle_digest: str
    policies: list[PolicyInfo]
    data: dict[str, Any] = Field(default_factory=dict)


# --- incidents (owned by incident) ---------------------------------------------------------------


@register
class IncidentOpened(DomainEvent):
    """An incident was opened for a policy violation."""

    event_type = "incident.opened"
    schema_version = 1

    incident_id: str
    violation_id: str
    run_id: str
    agent_id: str
    policy_id: str
    step_index: int
    severity: Severity
    title: str
    trace_id: str | None = None


@register
class IncidentAcknowledged(DomainEvent):
    """Somebody took ownership of an incident."""

    event_type = "incident.acknowledged"
    schema_version = 1

    incident_id: str
    by: str


@register
class IncidentResolved(DomainEvent):
    """An incident was closed, with the resolution recorded."""

    event_type = "incident.resolved"
    schema_version = 1

    incident_id: str
    by: str
    resolution: str


# --- cost (owned by cost) ------------------------------------------------------------------------


class ModelPrice(DomainEvent):
    """USD price per token of one model, valid from ``effective_from``."""

    event_type = "_model_price"
    schema_version = 1

    model: str
    input_per_token: Usd
    output_per_token: Usd
    effective_from: str = "1970-01-01T00:00:00+00:00"


@register
class PriceTablePublished(DomainEvent):
    """A tenant's custom prices changed; ``version`` is the new price-table version."""

    event_type = "cost.price_table_published"
    schema_version = 1

    version: int
    prices: list[ModelPrice]


@register
class CostRecorded(DomainEvent):
    """The cost of one recorded step, with the price-table version used to compute it."""

    event_type = "cost.recorded"
    schema_version = 1

    cost_id: str
    run_id: str
    agent_id: str
    step_index: int
    model: str | None
    input_tokens: int
    output_tokens: int
    pricing_status: Literal["priced", "unpriced", "no_model"]
    input_cost_usd: Usd | None
    output_cost_usd: Usd | None
    total_cost_usd: Usd | None
    price_table_version: str


# --- tenants (owned by gateway) ------------------------------------------------------------------


@register
class TenantCreated(DomainEvent):
    """A tenant was created."""

    event_type = "tenant.created"
    schema_version = 1

    tenant_id: str
    name: str


# --- workflow definitions and the agent catalogue (owned by workflow-engine) ---------------------


@register
class AgentRegistered(DomainEvent):
    """An agent was added to the tenant's catalogue, so workflow steps may name it."""

    event_type = "agent.registered"
    schema_version = 1

    agent_id: str
    description: str = ""


@register
class WorkflowDefinitionCreated(DomainEvent):
    """Version 1 of a workflow definition was saved (``document`` is the validated document)."""

    event_type = "workflow.definition_created"
    schema_version = 1

    workflow_id: str
    version: int = Field(ge=1)
    document: dict[str, Any]
    document_hash: str


@register
class WorkflowDefinitionRevised(DomainEvent):
    """A later version of a workflow definition was saved."""

    event_type = "workflow.definition_revised"
    schema_version = 1

    workflow_id: str
    version: int = Field(ge=2)
    document: dict[str, Any]
    document_hash: str
    previous_hash: str


# --- workflow executions (owned by workflow-engine) ----------------------------------------------


@register
class ExecutionStarted(DomainEvent):
    """An execution of a workflow version began; ``document`` is that version's definition."""

    event_type = "execution.started"
    schema_version = 1

    execution_id: str
    workflow_id: str
    workflow_version: int = Field(ge=1)
    document_hash: str
    document: dict[str, Any]
    inputs: dict[str, Any] = Field(default_factory=dict)
    approvals: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """The tenant's approval rule of each risk tier when the execution started (fixed for it)."""
    started_at: datetime


@register
class StepDispatched(DomainEvent):
    """An attempt of a step was handed to its agent's work queue, as the governed run ``run_id``."""

    event_type = "execution.step_dispatched"
    schema_version = 1

    execution_id: str
    step_id: str
    attempt: int = Field(ge=1)
    run_id: str
    agent_id: str
    workflow_id: str
    inputs: dict[str, Any] = Field(default_factory=dict)
    risk_tier: Literal["read_only", "write", "irreversible"]
    dispatched_at: datetime
    deadline_at: datetime


@register
class StepAttemptCompleted(DomainEvent):
    """An attempt's run completed: the step is done."""

    event_type = "execution.step_completed"
    schema_version = 1

    execution_id: str
    step_id: str
    attempt: int = Field(ge=1)
    run_id: str
    finished_at: datetime


@register
class StepAttemptFailed(DomainEvent):
    """An attempt failed or timed out; it is tried again at ``retry_at`` (None: no retry left)."""

    event_type = "execution.step_failed"
    schema_version = 1

    execution_id: str
    step_id: str
    attempt: int = Field(ge=1)
    run_id: str
    reason: str
    retry_at: datetime | None = None
    finished_at: datetime


@register
class StepAttemptBlocked(DomainEvent):
    """Admission stopped an attempt's run: the step is blocked by policy."""

    event_type = "execution.step_blocked"
    schema_version = 1

    execution_id: str
    step_id: str
    attempt: int = Field(ge=1)
    run_id: str
    reason: str
    finished_at: datetime


@register
class ExecutionCompleted(DomainEvent):
    """Every step of an execution ended (completed, or failed where failure may continue)."""

    event_type = "execution.completed"
    schema_version = 1

    execution_id: str
    finished_at: datetime


@register
class ExecutionFailed(DomainEvent):
    """An execution failed because of ``step_id``: its attempts were used up, or it was blocked."""

    event_type = "execution.failed"
    schema_version = 1

    execution_id: str
    step_id: str
    reason: str
    finished_at: datetime


@register
class ExecutionAborted(DomainEvent):
    """An operator aborted an execution."""

    event_type = "execution.aborted"
    schema_version = 1

    execution_id: str
    reason: str
    finished_at: datetime


# --- budgets (owned by workflow-engine) ----------------------------------------------------------

BudgetScope = Literal["tenant", "agent", "workflow", "execution"]
BudgetWindow = Literal["day", "month", "execution"]


@register
class BudgetSet(DomainEvent):
    """A budget was set (or its cap changed): ``cap_usd`` per ``window`` for ``scope/subject``.

    ``subject`` is the agent, workflow or execution id (empty for the tenant scope). A ``day`` or
    ``month`` window is a calendar window in the tenant's time zone; an ``execution`` window is
    each execution on its own.
    """

    event_type = "budget.set"
    schema_version = 1

    budget_id: str
    scope: BudgetScope
    subject: str = ""
    window: BudgetWindow
    cap_usd: Usd


@register
class BudgetTimezoneSet(DomainEvent):
    """The time zone the tenant's day and month budget windows follow (IANA name)."""

    event_type = "budget.timezone_set"
    schema_version = 1

    timezone: str


@register
class BudgetThresholdCrossed(DomainEvent):
    """A budget's committed spend (spent + reserved) reached ``threshold_pct`` of its cap in one
    window: once per threshold (80, 90, 100) per window."""

    event_type = "budget.threshold_crossed"
    schema_version = 1

    budget_id: str
    scope: BudgetScope
    subject: str = ""
    window: BudgetWindow
    window_key: str
    threshold_pct: int = Field(ge=1, le=100)
    cap_usd: Usd
    spent_usd: Usd
    reserved_usd: Usd
    run_id: str | None = None


@register
class ExecutionBudgetExceeded(DomainEvent):
    """A budget halted an execution: before its first step (its whole estimate is over a cap),
    or at ``step_id``'s dispatch (reserving its estimate would take the window over the cap)."""

    event_type = "execution.budget_exceeded"
    schema_version = 1

    execution_id: str
    step_id: str | None = None
    budget_id: str
    scope: BudgetScope
    subject: str = ""
    window: BudgetWindow
    window_key: str
    cap_usd: Usd
    committed_usd: Usd
    estimate_usd: Usd
    reason: str
    finished_at: datetime


@register
class ApprovalRequested(DomainEvent):
    """A ready step's risk tier needs approval before it is dispatched."""

    event_type = "execution.approval_requested"
    schema_version = 1

    execution_id: str
    step_id: str
    risk_tier: str
    required: int = Field(ge=1)
    role: str
    requested_at: datetime
    expires_at: datetime


@register
class StepApproved(DomainEvent):
    """A person approved a step waiting for approval (``approver`` is their identity)."""

    event_type = "execution.step_approved"
    schema_version = 1

    execution_id: str
    step_id: str
    approver: str
    role: str
    reason: str
    approved_at: datetime


@register
class StepRejected(DomainEvent):
    """A step waiting for approval was rejected, by a person or by its SLA running out."""

    event_type = "execution.step_rejected"
    schema_version = 1

    execution_id: str
    step_id: str
    rejected_by: str
    reason: str
    rejected_at: datetime


@register
class ApprovalEscalated(DomainEvent):
    """A step's approval SLA ran out and the request now needs ``role``, with a new deadline."""

    event_type = "execution.approval_escalated"
    schema_version = 1

    execution_id: str
    step_id: str
    role: str
    escalated_at: datetime
    expires_at: datetime


@register
class ApprovalPolicySet(DomainEvent):
    """A tenant set the approvals each risk tier needs (``rules``: tier → rule)."""

    event_type = "approval_policy.set"
    schema_version = 1

    rules: dict[str, dict[str, Any]]
