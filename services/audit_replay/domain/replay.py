"""Replay: a run and everything attached to it folded from the store's events (no I/O)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from libs.contracts.envelope import EventEnvelope
from libs.contracts.events import AdmissionDecided, CostRecorded, StepRecorded
from services.audit_replay.domain.folds import (
    INCIDENT_EVENTS,
    evolve_incident,
    evolve_run,
    safe_decode,
)
from services.audit_replay.domain.rows import (
    IncidentRow,
    RunRow,
    cost_row,
    decision_row,
    step_row,
)
from services.audit_replay.domain.views import inflection_point, run_totals, run_view


@dataclass
class ReplayState:
    """A run and everything attached to it, folded from the store's events."""

    run: RunRow | None = None
    steps: dict[int, dict[str, Any]] = field(default_factory=dict)
    decisions: dict[str, dict[str, Any]] = field(default_factory=dict)
    costs: dict[str, dict[str, Any]] = field(default_factory=dict)
    incidents: dict[str, IncidentRow] = field(default_factory=dict)
    events_applied: int = 0
    position: int = 0


def evolve_replay(state: ReplayState, env: EventEnvelope) -> ReplayState:
    """Fold one event of a run's history into ``state`` (the same folds as the projector)."""
    event = safe_decode(env)
    state.events_applied += 1
    state.position = max(state.position, env.position or 0)
    if event is None:
        return state
    state.run = evolve_run(state.run, env, event)
    if isinstance(event, StepRecorded):
        state.steps[event.step_index] = step_row(env, event)
    elif isinstance(event, AdmissionDecided):
        state.decisions[event.decision_id] = decision_row(env, event)
    elif isinstance(event, CostRecorded):
        state.costs[event.cost_id] = cost_row(env, event)
    elif env.event_type in INCIDENT_EVENTS:
        iid = getattr(event, "incident_id", "")
        folded = evolve_incident(state.incidents.get(iid), env, event)
        if folded is not None:
            state.incidents[iid] = folded
    return state


def replay_answer(state: ReplayState) -> dict[str, Any]:
    """The ``replay`` result: the run as the ``run`` query would show it, at that point."""
    inflection = inflection_point(state.run, state.decisions.values())
    if state.run is None:
        view: dict[str, Any] | None = None
    else:
        tokens, cost, unpriced = run_totals(state.steps.values(), state.costs.values())
        view = run_view(state.run, tokens_used=tokens, cost_usd=cost, unpriced_steps=unpriced)
        view["incident_ids"] = sorted(state.incidents)
    return {
        "state": view,
        "events_applied": state.events_applied,
        "inflection_point": inflection,
        "at_position": state.position,
    }
