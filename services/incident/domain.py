"""The incident aggregate: one incident per policy violation, acknowledged and resolved by people.

Pure functions only (no I/O). Lifecycle: ``new`` (no event yet) → ``open`` → ``acknowledged`` →
``resolved``; an open incident may also be resolved directly. ``resolved`` is final.

The incident id is derived from the violation id (UUIDv5), so however often a violation is
delivered it can only ever name one incident.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal

from libs.contracts.envelope import DomainEvent
from libs.contracts.events import (
    BudgetThresholdCrossed,
    IncidentAcknowledged,
    IncidentOpened,
    IncidentResolved,
    PolicyViolationDetected,
    Severity,
)
from libs.contracts.limits import MAX_BY, MAX_REASON
from libs.errors import Conflict, InvalidInput, NotFound

Status = Literal["new", "open", "acknowledged", "resolved"]

# Fixed forever: changing it would give a redelivered old violation a second incident.
INCIDENT_NAMESPACE = uuid.UUID("6f1c1b9e-2f7a-5d3e-9c41-7a0e4b8d2c15")
MAX_RESOLUTION = MAX_REASON
# The policy a step recorded without an allowed admission (or twice, or out of order) breaks.
ADMISSION_REQUIRED = "admission_required"


def incident_id_for(violation_id: str) -> str:
    """The one incident id a violation can have."""
    return str(uuid.uuid5(INCIDENT_NAMESPACE, violation_id))


def title_for(violation: PolicyViolationDetected) -> str:
    """A one-line summary, e.g. ``token_limit denied step 3 of run r-42``."""
    if violation.policy_id == ADMISSION_REQUIRED:
        return (
            f"{violation.policy_id}: step {violation.step_index} of run {violation.run_id} "
            "was recorded against the rules"
        )
    return f"{violation.policy_id} denied step {violation.step_index} of run {violation.run_id}"


@dataclass(frozen=True)
class Incident:
    """An incident as its events tell it; ``version`` is the stream version it reflects."""

    tenant_id: str
    incident_id: str
    violation_id: str = ""
    run_id: str = ""
    agent_id: str = ""
    policy_id: str = ""
    step_index: int = 0
    severity: Severity = "low"
    status: Status = "new"
    title: str = ""
    trace_id: str | None = None
    opened_at: datetime | None = None
    acknowledged_by: str | None = None
    acknowledged_at: datetime | None = None
    resolved_by: str | None = None
    resolved_at: datetime | None = None
    resolution: str | None = None
    version: int = 0

    @property
    def exists(self) -> bool:
        """Whether the incident was opened."""
        return self.status != "new"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view (the RPC reply)."""

        def iso(t: datetime | None) -> str | None:
            # The same form the query API uses: UTC, microseconds, "Z".
            return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ") if t else None

        return {
            "incident_id": self.incident_id,
            "tenant_id": self.tenant_id,
            "violation_id": self.violation_id,
            "run_id": self.run_id,
            "agent_id": self.agent_id,
            "policy_id": self.policy_id,
            "step_index": self.step_index,
            "severity": self.severity,
            "status": self.status,
            "title": self.title,
            "trace_id": self.trace_id,
            "opened_at": iso(self.opened_at),
            "acknowledged_by": self.acknowledged_by,
            "acknowledged_at": iso(self.acknowledged_at),
            "resolved_by": self.resolved_by,
            "resolved_at": iso(self.resolved_at),
            "resolution": self.resolution,
            "version": self.version,
        }


def empty_incident(tenant_id: str, incident_id: str) -> Incident:
    """The state of an incident before its first event."""
    return Incident(tenant_id=tenant_id, incident_id=incident_id)


# --- commands ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpenIncident:
    """Open the incident of a policy violation."""

    violation: PolicyViolationDetected

    @property
    def incident_id(self) -> str:
        return incident_id_for(self.violation.violation_id)


BUDGET_POLICY_ID = "budget"


def budget_violation_id(alert: BudgetThresholdCrossed) -> str:
    """What a budget incident stands in for: the budget's window reaching its cap (one incident
    per budget per window, however often the alert is delivered)."""
    return f"budget:{alert.budget_id}:{alert.window_key}"


@dataclass(frozen=True)
class OpenBudgetIncident:
    """Open the incident of a budget whose committed spend reached its cap in one window."""

    alert: BudgetThresholdCrossed

    @property
    def incident_id(self) -> str:
        return incident_id_for(budget_violation_id(self.alert))


@dataclass(frozen=True)
class Acknowledge:
    """Somebody takes ownership of an open incident."""

    incident_id: str
    by: str


@dataclass(frozen=True)
class Resolve:
    """Close an incident with a written resolution."""

    incident_id: str
    by: str
    resolution: str


Command = OpenIncident | OpenBudgetIncident | Acknowledge | Resolve


# --- decide --------------------------------------------------------------------------------------


def decide(state: Incident, command: Command) -> list[DomainEvent]:
    """The events ``command`` causes on an incident in ``state``; raises when not allowed."""
    if command.incident_id != state.incident_id:
        raise InvalidInput(
            f"command for incident {command.incident_id} applied to {state.incident_id}"
        )
    if isinstance(command, OpenIncident):
        return _open(state, command)
    if isinstance(command, OpenBudgetIncident):
        return _open_budget(state, command)
    if isinstance(command, Acknowledge):
        return _acknowledge(state, command)
    return _resolve(state, command)


def _open(state: Incident, cmd: OpenIncident) -> list[DomainEvent]:
    if state.exists:
        return []  # the violation was delivered again: its incident is already open
    v = cmd.violation
    if v.enforcement != "enforce":
        return []  # a warning is recorded by its violation event; it opens no incident
    return [
        IncidentOpened(
            incident_id=state.incident_id,
            violation_id=v.violation_id,
            run_id=v.run_id,
            agent_id=v.agent_id,
            policy_id=v.policy_id,
            step_index=v.step_index,
            severity=v.severity,
            title=title_for(v),
            trace_id=v.trace_id,
            environment=v.environment,
        )
    ]


def _open_budget(state: Incident, cmd: OpenBudgetIncident) -> list[DomainEvent]:
    if state.exists:
        return []
    a = cmd.alert
    window = "each execution" if a.window == "execution" else a.window
    return [
        IncidentOpened(
            incident_id=state.incident_id,
            violation_id=budget_violation_id(a),
            run_id=a.run_id or "",
            agent_id=a.subject if a.scope == "agent" else "",
            policy_id=BUDGET_POLICY_ID,
            step_index=0,
            severity="high",
            title=(
                f"budget {a.budget_id} reached {a.threshold_pct} % of its ${a.cap_usd} cap "
                f"({window} {a.window_key})"
            ),
        )
    ]


def _acknowledge(state: Incident, cmd: Acknowledge) -> list[DomainEvent]:
    by = _check_by(cmd.by)
    _require_exists(state)
    if state.status == "acknowledged":
        return []
    if state.status == "resolved":
        raise Conflict(f"incident {state.incident_id} is resolved and cannot be acknowledged")
    return [IncidentAcknowledged(incident_id=state.incident_id, by=by)]


def _resolve(state: Incident, cmd: Resolve) -> list[DomainEvent]:
    by = _check_by(cmd.by)
    if not cmd.resolution.strip() or len(cmd.resolution) > MAX_RESOLUTION:
        raise InvalidInput(f"resolution must be 1 to {MAX_RESOLUTION} characters of text")
    _require_exists(state)
    if state.status == "resolved":
        raise Conflict(f"incident {state.incident_id} is already resolved")
    return [IncidentResolved(incident_id=state.incident_id, by=by, resolution=cmd.resolution)]


def _check_by(by: str) -> str:
    by = by.strip()
    if not by or len(by) > MAX_BY:
        raise InvalidInput(f"by must be 1 to {MAX_BY} characters")
    return by


def _require_exists(state: Incident) -> None:
    if not state.exists:
        raise NotFound(f"incident {state.incident_id} not found")


# --- evolve --------------------------------------------------------------------------------------


def evolve(state: Incident, event: DomainEvent, at: datetime | None = None) -> Incident:
    """``state`` after ``event``; ``at`` is when it occurred (the envelope's ``occurred_at``)."""
    changes: dict[str, Any] = {"version": state.version + 1}
    if isinstance(event, IncidentOpened):
        changes.update(
            status="open",
            violation_id=event.violation_id,
            run_id=event.run_id,
            agent_id=event.agent_id,
            policy_id=event.policy_id,
            step_index=event.step_index,
            severity=event.severity,
            title=event.title,
            trace_id=event.trace_id,
            opened_at=at,
        )
    elif isinstance(event, IncidentAcknowledged):
        changes.update(status="acknowledged", acknowledged_by=event.by, acknowledged_at=at)
    elif isinstance(event, IncidentResolved):
        changes.update(
            status="resolved", resolved_by=event.by, resolved_at=at, resolution=event.resolution
        )
    return replace(state, **changes)


def fold(
    state: Incident, events: Iterable[DomainEvent | tuple[DomainEvent, datetime | None]]
) -> Incident:
    """``state`` after every event, in order; items may be ``(event, occurred_at)`` pairs."""
    for item in events:
        event, at = item if isinstance(item, tuple) else (item, None)
        state = evolve(state, event, at)
    return state
