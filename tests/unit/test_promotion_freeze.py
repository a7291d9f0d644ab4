"""The promotion freeze (pure): which incidents freeze an environment, what lifts it, and what an
override covers."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from libs.contracts.envelope import DomainEvent
from libs.contracts.events import PolicyFreezeOverridden, PolicyFreezeStarted
from libs.errors import Conflict
from services.policy_admission.freeze import (
    Freeze,
    blockers,
    evolve,
    incident_opened,
    incident_resolved,
    override,
    view,
)

AT = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def _apply(state: Freeze, events: list[DomainEvent]) -> Freeze:
    for event in events:
        state = evolve(state, event, AT)
    return state


def _open(
    state: Freeze, incident_id: str, severity: str = "high", threshold: str = "high"
) -> Freeze:
    return _apply(
        state,
        incident_opened(
            state,
            environment="production",
            incident_id=incident_id,
            severity=severity,  # type: ignore[arg-type]
            title=f"{incident_id} title",
            threshold=threshold,  # type: ignore[arg-type]
        ),
    )


@pytest.mark.parametrize(
    ("severity", "threshold", "frozen"),
    [
        ("low", "high", False),
        ("medium", "high", False),
        ("high", "high", True),
        ("critical", "high", True),
        ("medium", "medium", True),
        ("low", "medium", False),
        ("high", "critical", False),
        ("critical", "critical", True),
        ("low", "low", True),
    ],
)
def test_an_incident_freezes_exactly_at_or_above_the_threshold(
    severity: str, threshold: str, frozen: bool
) -> None:
    state = _open(Freeze(), "inc-1", severity, threshold)
    assert bool(blockers(state, "production")) is frozen


def test_the_freeze_holds_until_every_freezing_incident_is_resolved() -> None:
    state = _open(_open(Freeze(), "inc-1"), "inc-2", "critical")
    lines = blockers(state, "production")
    assert len(lines) == 2 and all(line.startswith("promotion_frozen: ") for line in lines)
    assert "inc-2 (critical)" in lines[1]
    state = _apply(
        state, incident_resolved(state, environment="production", incident_id="inc-1", by="u")
    )
    assert [i.incident_id for i in state.frozen_by] == ["inc-2"]
    state = _apply(
        state, incident_resolved(state, environment="production", incident_id="inc-2", by="u")
    )
    assert blockers(state, "production") == []


def test_redelivered_and_unknown_incidents_decide_nothing() -> None:
    state = _open(Freeze(), "inc-1")
    assert (
        incident_opened(
            state,
            environment="production",
            incident_id="inc-1",
            severity="high",
            title="again",
            threshold="high",
        )
        == []
    )
    state = _apply(
        state, incident_resolved(state, environment="production", incident_id="inc-1", by="u")
    )
    # Resolved, then its opening delivered again: it does not freeze a second time.
    assert _open(state, "inc-1").frozen_by == ()
    assert incident_resolved(state, environment="production", incident_id="other", by="u") == []


def test_an_override_covers_the_open_incidents_only_and_is_recorded() -> None:
    state = _open(Freeze(), "inc-1")
    events = override(state, environment="production", by="user:ann", reason="hotfix")
    assert events == [
        PolicyFreezeOverridden(
            environment="production", incident_ids=["inc-1"], by="user:ann", reason="hotfix"
        )
    ]
    state = _apply(state, events)
    assert blockers(state, "production") == []
    shown = view(state, "production", "high")
    assert shown["frozen"] is False
    assert shown["incidents"][0]["overridden_by"] == "user:ann"
    assert shown["overrides"][0] == {
        "by": "user:ann",
        "reason": "hotfix",
        "at": AT.isoformat(),
        "incident_ids": ["inc-1"],
    }
    # An incident opened after the override freezes again.
    state = _open(state, "inc-2")
    assert [i.incident_id for i in state.frozen_by] == ["inc-2"]


def test_overriding_nothing_is_a_conflict_naming_why() -> None:
    with pytest.raises(Conflict, match="freeze_not_active"):
        override(Freeze(), environment="sandbox", by="user:ann", reason="nothing")


def test_started_events_carry_the_threshold_that_froze() -> None:
    events = incident_opened(
        Freeze(),
        environment="sandbox",
        incident_id="i",
        severity="critical",
        title="t",
        threshold="medium",
    )
    assert events == [
        PolicyFreezeStarted(
            environment="sandbox",
            incident_id="i",
            severity="critical",
            threshold="medium",
            title="t",
        )
    ]
