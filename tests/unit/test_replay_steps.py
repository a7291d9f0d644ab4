"""Replaying a run "to step N": which of its events that point folds (a pure function)."""

from __future__ import annotations

from typing import Any

import pytest

from libs.contracts import envelope_for
from libs.contracts.envelope import DomainEvent, EventEnvelope
from libs.contracts.events import IncidentAcknowledged, RunCompleted
from services.audit_replay.domain import (
    ReplayState,
    events_through_step,
    evolve_replay,
    replay_answer,
)
from tests.unit.test_audit_domain import flow, stored

pytestmark = pytest.mark.unit

# flow("acme", "r1"), stored: 0 started · 1 allow d1 · 2 step 1 · 3 cost 1 · 4 allow d2 · 5 step 2
# · 6 cost 2 · 7 deny d3 · 8 violation 3 · 9 stopped at 3 · 10 incident opened at 3.


def _like(model: EventEnvelope, event: DomainEvent) -> EventEnvelope:
    """``event`` in the stream of ``model``, not yet stored."""
    return envelope_for(
        event, tenant_id="acme", stream_id=model.stream_id, correlation_id="c", actor="test"
    )


def _replay(envs: list[EventEnvelope]) -> dict[str, Any]:
    state = ReplayState()
    for env in envs:
        state = evolve_replay(state, env)
    return replay_answer(state)


def test_an_allowed_step_ends_after_its_cost_before_the_next_admission() -> None:
    envs = stored(flow("acme", "r1"))
    assert events_through_step(envs, 1) == 4
    assert events_through_step(envs, 2) == 7
    answer = _replay(envs[:4])
    assert answer["at_step"] == 1
    assert answer["at_version"] == 2  # started, step 1
    state = answer["state"]
    assert state["status"] == "running"
    assert state["tokens_used"] == 150
    assert state["cost_usd"] == "0.0007500000"  # step 1's cost is part of step 1


def test_the_denied_step_ends_after_its_stop_and_incident() -> None:
    base = flow("acme", "r1")
    # An acknowledgement later carries no step: it is not part of step 3.
    envs = stored([*base, _like(base[10], IncidentAcknowledged(incident_id="r1-i1", by="ann"))])
    assert events_through_step(envs, 3) == 11
    answer = _replay(envs[:11])
    assert answer["at_step"] == 3
    assert answer["at_version"] == 4  # started, step 1, step 2, stopped
    state = answer["state"]
    assert state["status"] == "stopped_by_policy"
    assert state["incident_ids"] == ["r1-i1"]
    assert answer["inflection_point"]["step_index"] == 3


def test_a_step_that_does_not_exist_is_none() -> None:
    envs = stored(flow("acme", "r1"))
    assert events_through_step(envs, 4) is None
    assert events_through_step(envs, 1_000_000) is None
    assert events_through_step([], 1) is None


def test_step_zero_is_the_run_before_its_first_step() -> None:
    envs = stored(flow("acme", "r1"))
    assert events_through_step(envs, 0) == 1
    answer = _replay(envs[:1])
    assert answer["at_step"] == 0
    assert answer["at_version"] == 1
    # A run with no step yet: all of it.
    assert events_through_step(envs[:1], 0) == 1


def test_what_follows_the_next_steps_start_or_the_last_step_is_left_out() -> None:
    base = flow("acme", "r1")
    # Step 1's cost stored after step 2 was admitted: replaying to step 1 stops before it.
    late_cost = stored([*base[:3], base[4], base[3], *base[5:7]])
    assert events_through_step(late_cost, 1) == 3
    assert events_through_step(late_cost, 2) == 7
    # The run's end after its last step is not part of that step.
    ended = stored([*base[:7], _like(base[0], RunCompleted(run_id="r1", status="completed"))])
    assert events_through_step(ended, 2) == 7
    assert _replay(ended[:7])["state"]["status"] == "running"
