"""The incident aggregate: opening from a violation, acknowledge, resolve, and folding."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from libs.contracts.events import (
    IncidentAcknowledged,
    IncidentOpened,
    IncidentResolved,
    PolicyViolationDetected,
)
from libs.errors import Conflict, InvalidInput, NotFound
from services.incident.domain import (
    Acknowledge,
    Incident,
    OpenIncident,
    Resolve,
    decide,
    empty_incident,
    evolve,
    fold,
    incident_id_for,
)

pytestmark = pytest.mark.unit

T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
T1 = datetime(2025, 1, 1, 12, 5, tzinfo=UTC)
T2 = datetime(2025, 1, 1, 13, 0, tzinfo=UTC)


def _violation(vid: str = "v-1", severity: str = "high") -> PolicyViolationDetected:
    return PolicyViolationDetected(
        violation_id=vid,
        decision_id="d-1",
        run_id="run-9",
        agent_id="agent-1",
        step_index=3,
        policy_id="token_limit",
        severity=severity,
        message="would exceed 1000 tokens",
        bundle_digest="sha256:abc",
        trace_id="0af7651916cd43dd8448eb211c80319c",
    )


IID = incident_id_for("v-1")


def _open() -> Incident:
    state = empty_incident("acme", IID)
    return fold(state, [(e, T0) for e in decide(state, OpenIncident(_violation()))])


def _acked() -> Incident:
    return fold(_open(), [(e, T1) for e in decide(_open(), Acknowledge(IID, "ops@acme"))])


def _resolved() -> Incident:
    return fold(_open(), [(e, T2) for e in decide(_open(), Resolve(IID, "ops", "raised limit"))])


# --- ids -----------------------------------------------------------------------------------------


def test_incident_id_is_a_pure_function_of_the_violation_id() -> None:
    assert incident_id_for("v-1") == incident_id_for("v-1")
    assert incident_id_for("v-1") != incident_id_for("v-2")


# --- open ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("severity", ["low", "critical"])
def test_open_from_a_violation_carries_its_facts_and_severity(severity: str) -> None:
    state = empty_incident("acme", IID)
    (event,) = decide(state, OpenIncident(_violation(severity=severity)))
    assert isinstance(event, IncidentOpened)
    assert event.incident_id == IID
    assert event.title == "token_limit denied step 3 of run run-9"
    assert event.severity == severity
    assert (event.run_id, event.step_index, event.policy_id) == ("run-9", 3, "token_limit")
    assert event.trace_id == "0af7651916cd43dd8448eb211c80319c"
    opened = evolve(state, event, T0)
    assert opened.status == "open"
    assert opened.opened_at == T0
    assert opened.violation_id == "v-1"
    assert opened.version == 1


def test_opening_an_incident_that_exists_emits_nothing() -> None:
    assert decide(_open(), OpenIncident(_violation())) == []


def test_open_against_the_wrong_incident_id_is_invalid() -> None:
    with pytest.raises(InvalidInput):
        decide(empty_incident("acme", incident_id_for("other")), OpenIncident(_violation()))


# --- acknowledge ---------------------------------------------------------------------------------


def test_acknowledge_an_open_incident() -> None:
    events = decide(_open(), Acknowledge(IID, " ops@acme "))
    assert events == [IncidentAcknowledged(incident_id=IID, by="ops@acme")]
    after = evolve(_open(), events[0], T1)
    assert after.status == "acknowledged"
    assert (after.acknowledged_by, after.acknowledged_at) == ("ops@acme", T1)
    assert after.version == 2


def test_acknowledging_twice_is_idempotent() -> None:
    assert decide(_acked(), Acknowledge(IID, "someone-else")) == []


def test_acknowledging_a_resolved_incident_is_a_conflict() -> None:
    with pytest.raises(Conflict, match="resolved"):
        decide(_resolved(), Acknowledge(IID, "ops"))


def test_acknowledging_an_unknown_incident_is_not_found() -> None:
    with pytest.raises(NotFound):
        decide(empty_incident("acme", IID), Acknowledge(IID, "ops"))


def test_acknowledge_needs_somebody() -> None:
    with pytest.raises(InvalidInput, match="by"):
        decide(_open(), Acknowledge(IID, "  "))


# --- resolve -------------------------------------------------------------------------------------


def test_resolve_an_open_incident_directly() -> None:
    events = decide(_open(), Resolve(IID, "ops", "raised the limit"))
    assert events == [IncidentResolved(incident_id=IID, by="ops", resolution="raised the limit")]
    after = evolve(_open(), events[0], T2)
    assert after.status == "resolved"
    assert (after.resolved_by, after.resolved_at, after.resolution) == (
        "ops",
        T2,
        "raised the limit",
    )


def test_resolve_an_acknowledged_incident() -> None:
    after = fold(_acked(), decide(_acked(), Resolve(IID, "ops", "fixed")))
    assert after.status == "resolved"
    assert after.acknowledged_by == "ops@acme"  # the acknowledgement is kept
    assert after.version == 3


def test_resolving_a_resolved_incident_is_a_conflict() -> None:
    with pytest.raises(Conflict, match="already resolved"):
        decide(_resolved(), Resolve(IID, "ops", "again"))


def test_resolving_an_unknown_incident_is_not_found() -> None:
    with pytest.raises(NotFound):
        decide(empty_incident("acme", IID), Resolve(IID, "ops", "x"))


@pytest.mark.parametrize("resolution", ["", "   ", "x" * 2001])
def test_resolution_text_must_be_1_to_2000_characters(resolution: str) -> None:
    with pytest.raises(InvalidInput, match="resolution"):
        decide(_open(), Resolve(IID, "ops", resolution))


def test_a_resolution_of_exactly_2000_characters_is_accepted() -> None:
    assert len(decide(_open(), Resolve(IID, "ops", "x" * 2000))) == 1


def test_resolve_needs_somebody() -> None:
    with pytest.raises(InvalidInput, match="by"):
        decide(_open(), Resolve(IID, "", "fixed"))


# --- fold ----------------------------------------------------------------------------------------


def test_fold_rebuilds_the_incident_with_timestamps() -> None:
    opened = IncidentOpened(
        incident_id=IID,
        violation_id="v-1",
        run_id="run-9",
        agent_id="a",
        policy_id="p",
        step_index=3,
        severity="medium",
        title="p denied step 3 of run run-9",
    )
    state = fold(
        empty_incident("acme", IID),
        [
            (opened, T0),
            (IncidentAcknowledged(incident_id=IID, by="x"), T1),
            (IncidentResolved(incident_id=IID, by="y", resolution="ok"), T2),
        ],
    )
    assert state.version == 3
    assert (state.status, state.severity, state.opened_at) == ("resolved", "medium", T0)
    assert (state.acknowledged_by, state.acknowledged_at) == ("x", T1)
    assert (state.resolved_by, state.resolved_at, state.resolution) == ("y", T2, "ok")
    view = state.to_dict()
    assert view["resolved_at"] == T2.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert view["tenant_id"] == "acme"
    # Bare events (no timestamps) fold too.
    assert fold(empty_incident("acme", IID), [opened]).status == "open"
