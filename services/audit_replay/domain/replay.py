"""Replay: a run and everything attached to it folded from the store's events (no I/O)."""

from __future__ import annotations

from collections.abc import Sequence
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
    step: int = 0
    """The highest step index among the events folded in (0: before the run's first step)."""


def step_of(env: EventEnvelope) -> int | None:
    """The step index an event of a run belongs to, or ``None`` for an event of no one step.

    Admission decisions, recorded steps, costs, violations, a policy stop and an incident's
    opening each carry the ``step_index`` they are about; the run's start and end, and an
    incident's later events, carry none.
    """
    value = env.payload.get("step_index")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def events_through_step(history: Sequence[EventEnvelope], step: int) -> int | None:
    """How many of a run's events (in store order) replaying "to step ``step``" folds.

    The point is the last event of that step that comes before the next step begins: its
    admission decision, its record, its cost, and for a denied step the violation, the stop
    and the incident opened, but not the run's end or a later step's admission. Step 0 is the
    run before its first step (every event before the first that carries a step index).
    ``None`` when no event of the history belongs to ``step``.
    """
    if step == 0:
        return next((i for i, env in enumerate(history) if step_of(env) is not None), len(history))
    end: int | None = None
    for i, env in enumerate(history):
        of = step_of(env)
        if of == step:
            end = i + 1
        elif of is not None and of > step and end is not None:
            break  # the next step has begun: anything of this step after it is left out
    return end


def evolve_replay(state: ReplayState, env: EventEnvelope) -> ReplayState:
    """Fold one event of a run's history into ``state`` (the same folds as the projector)."""
    event = safe_decode(env)
    state.events_applied += 1
    state.position = max(state.position, env.position or 0)
    state.step = max(state.step, step_of(env) or 0)
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
    """The ``replay`` result: the run as the ``run`` query would show it, at that point.

    ``at_version`` is the run stream's version folded in (the scrubber's axis), ``at_step`` the
    step the point is in (:attr:`ReplayState.step`).
    """
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
        "at_version": state.run.stream_version if state.run is not None else 0,
        "at_step": state.step,
    }


# --- workflow executions --------------------------------------------------------------------

# Where an execution went wrong: the first of these in its stream is its inflection point.
EXECUTION_TURNS = {
    "execution.step_failed": "failed",
    "execution.step_blocked": "blocked",
    "execution.step_stopped": "stopped",
    "execution.step_rejected": "rejected",
    "execution.budget_exceeded": "budget_exceeded",
    "execution.failed": "failed",
    "execution.aborted": "aborted",
}
_STEP_STATUS = {
    "execution.step_dispatched": "dispatched",
    "execution.step_completed": "completed",
    "execution.step_failed": "failed",
    "execution.step_blocked": "blocked",
    "execution.step_stopped": "stopped",
    "execution.approval_requested": "awaiting_approval",
    "execution.step_approved": "approved",
    "execution.step_rejected": "rejected",
}
_END_STATUS = {
    "execution.completed": "completed",
    "execution.failed": "failed",
    "execution.aborted": "aborted",
}


@dataclass
class ExecutionReplay:
    """A workflow execution folded from its stream's events up to a point."""

    execution_id: str = ""
    workflow_id: str | None = None
    workflow_version: int | None = None
    status: str | None = None
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)
    inflection: dict[str, Any] | None = None
    events_applied: int = 0
    position: int = 0
    stream_version: int = 0


def evolve_execution(state: ExecutionReplay, env: EventEnvelope) -> ExecutionReplay:
    """Fold one event of an execution's stream into ``state``."""
    p = env.payload
    state.events_applied += 1
    state.position = max(state.position, env.position or 0)
    state.stream_version = max(state.stream_version, env.stream_version)
    kind = env.event_type
    if kind == "execution.started":
        state.execution_id = str(p.get("execution_id", ""))
        state.workflow_id = p.get("workflow_id")
        state.workflow_version = p.get("workflow_version")
        state.status = "running"
    elif kind in _END_STATUS:
        state.status = _END_STATUS[kind]
    step_id = p.get("step_id")
    if kind in _STEP_STATUS and isinstance(step_id, str):
        step = state.steps.setdefault(
            step_id, {"step_id": step_id, "status": None, "attempts": 0, "run_ids": []}
        )
        step["status"] = _STEP_STATUS[kind]
        if kind == "execution.step_dispatched":
            step["attempts"] = max(step["attempts"], int(p.get("attempt") or 0))
            if p.get("run_id") and p["run_id"] not in step["run_ids"]:
                step["run_ids"].append(p["run_id"])
    if state.inflection is None and kind in EXECUTION_TURNS:
        state.inflection = {
            "kind": EXECUTION_TURNS[kind],
            "event_type": kind,
            "step_id": step_id if isinstance(step_id, str) else None,
            "position": env.position,
            "stream_version": env.stream_version,
            "occurred_at": env.occurred_at.isoformat(),
            "reason": p.get("reason") or p.get("error"),
        }
    return state


def execution_replay_answer(state: ExecutionReplay) -> dict[str, Any]:
    """The ``replay_execution`` result: the execution as it stood at that point."""
    return {
        "state": {
            "execution_id": state.execution_id,
            "workflow_id": state.workflow_id,
            "workflow_version": state.workflow_version,
            "status": state.status,
            "steps": [state.steps[k] for k in sorted(state.steps)],
        },
        "events_applied": state.events_applied,
        "inflection_point": state.inflection,
        "at_position": state.position,
        "at_version": state.stream_version,
    }
