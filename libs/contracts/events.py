"""Every event type Mission Control publishes, at its current schema version.

Naming: ``<aggregate>.<past-tense fact>``. The NATS subject of an event is
``mc.evt.<tenant>.<event_type>`` (see ``libs.contracts.subjects``).
"""

from __future__ import annotations

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


# --- the event store's anchors (written by the relay's host, libs/eventbus/anchor.py) ------------


@register
class AnchorCheckpointed(DomainEvent):
    """A signed Merkle root over every stream head of the event store was taken.

    ``horizon_xid``: the heads are each stream's last event with ``log_xid`` below it.
    ``merkle_root``: RFC 6962 root (hex) over the heads sorted by stream id. ``signature``:
    ed25519 (hex) over the RFC 8785 JSON of the other fields, by the key ``key_id`` names.
    """

    event_type = "anchor.checkpointed"
    schema_version = 1

    seq: int = Field(ge=1)
    horizon_xid: str = Field(pattern=r"^[0-9]{1,20}$")
    streams: int = Field(ge=0)
    events: int = Field(ge=0)
    merkle_root: str = Field(pattern=r"^[0-9a-f]{64}$")
    key_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    signature: str = Field(pattern=r"^([0-9a-f]{128})?$")
