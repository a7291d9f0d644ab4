"""The run aggregate: its state, the commands it accepts and the events it emits.

Pure functions only: ``decide(state, command)`` validates a command against the current state and
returns the events it causes (or raises a project error). The state and its fold
(``evolve``/``fold``) are the run stream's one fold in :mod:`libs.domain.run`, re-exported here.
No I/O happens here, so every rule is unit-testable and the same code rebuilds a run from its
stream.

Lifecycle: ``new`` (no event yet) → ``running`` → ``completed`` | ``failed`` |
``stopped_by_policy``. The last three are terminal: nothing is recorded on a run after it ended.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

from libs.contracts.envelope import DomainEvent
from libs.contracts.events import (
    RunCompleted,
    RunStarted,
    RunStoppedByPolicy,
    StepRecorded,
    StepStatus,
)
from libs.domain.run import (
    TERMINAL,
    RunState,
    Status,
    empty_run,
    evolve,
    fold,
    irregularities,
)
from libs.errors import Conflict, InvalidInput, NotFound

__all__ = [
    "TERMINAL",
    "Command",
    "FinishRun",
    "RecordStep",
    "RecordSteps",
    "RunState",
    "StartRun",
    "Status",
    "StopRunForViolation",
    "decide",
    "empty_run",
    "evolve",
    "fold",
]

# --- commands ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StartRun:
    """Begin a run."""

    run_id: str
    agent_id: str
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RecordStep:
    """Record the outcome of one step of a run."""

    run_id: str
    step_index: int
    kind: str = "llm_call"
    model: str | None = None
    tool: str | None = None
    status: StepStatus = "ok"
    input_tokens: int = 0
    output_tokens: int = 0
    duration_ms: float = 0.0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    provider_cost_usd: Decimal | None = None
    input: Any = None
    output: Any = None
    error: str | None = None


@dataclass(frozen=True)
class RecordSteps:
    """Record several steps of one run at once (all or none)."""

    run_id: str
    steps: tuple[RecordStep, ...]


@dataclass(frozen=True)
class FinishRun:
    """End a run on its own terms."""

    run_id: str
    status: Literal["completed", "failed"]
    reason: str | None = None


@dataclass(frozen=True)
class StopRunForViolation:
    """Stop a run because admission denied one of its steps."""

    run_id: str
    step_index: int
    policy_id: str
    decision_id: str
    reason: str


Command = StartRun | RecordStep | RecordSteps | FinishRun | StopRunForViolation


# --- decide --------------------------------------------------------------------------------------


def decide(state: RunState, command: Command) -> list[DomainEvent]:
    """The events ``command`` causes on a run in ``state``; raises when it is not allowed."""
    if command.run_id != state.run_id:
        raise InvalidInput(f"command for run {command.run_id!r} applied to run {state.run_id!r}")
    if isinstance(command, StartRun):
        return _start(state, command)
    if isinstance(command, RecordStep):
        return _record(state, (command,))
    if isinstance(command, RecordSteps):
        return _record(state, command.steps)
    if isinstance(command, FinishRun):
        return _finish(state, command)
    return _stop(state, command)


def _start(state: RunState, cmd: StartRun) -> list[DomainEvent]:
    if state.exists:
        raise Conflict(f"run {state.run_id} already exists ({_describe(state)})")
    if not cmd.agent_id.strip():
        raise InvalidInput("agent_id must not be empty")
    return [RunStarted(run_id=cmd.run_id, agent_id=cmd.agent_id, labels=dict(cmd.labels))]


def _record(state: RunState, steps: Iterable[RecordStep]) -> list[DomainEvent]:
    """Every step is kept: one recorded against the rules (without an allowed admission, a
    second time, or below the highest index) is marked with its irregularities for admission
    to judge, never refused, so what the agent did is never lost."""
    late_ok = _late_outcomes_allowed(state)
    if not late_ok:
        _require_running(state)
    recorded = set(state.steps)
    last = state.last_step_index
    admissions = dict(state.admissions)
    out: list[DomainEvent] = []
    for s in steps:
        if s.run_id != state.run_id:
            raise InvalidInput(f"step for run {s.run_id!r} applied to run {state.run_id!r}")
        if s.step_index < 1:
            raise InvalidInput(f"step_index must be >= 1, got {s.step_index}")
        if late_ok and s.step_index >= (state.stopped_at_step or 0):
            raise Conflict(f"run {state.run_id} is {_describe(state)}")
        marks = irregularities(recorded, last, admissions, s.step_index)
        recorded.add(s.step_index)
        last = max(last, s.step_index)
        admissions.pop(s.step_index, None)
        out.append(
            StepRecorded(
                run_id=state.run_id,
                agent_id=state.agent_id,
                step_index=s.step_index,
                kind=s.kind,
                model=s.model,
                tool=s.tool,
                status=s.status,
                input_tokens=s.input_tokens,
                cached_input_tokens=s.cached_input_tokens,
                cache_write_tokens=s.cache_write_tokens,
                output_tokens=s.output_tokens,
                reasoning_tokens=s.reasoning_tokens,
                provider_cost_usd=s.provider_cost_usd,
                duration_ms=s.duration_ms,
                input=s.input,
                output=s.output,
                error=s.error,
                irregularities=marks,
            )
        )
    return out


def _finish(state: RunState, cmd: FinishRun) -> list[DomainEvent]:
    _require_running(state)
    return [RunCompleted(run_id=state.run_id, status=cmd.status, reason=cmd.reason)]


def _stop(state: RunState, cmd: StopRunForViolation) -> list[DomainEvent]:
    if not state.exists:
        raise NotFound(f"run {state.run_id} not found")
    if state.is_terminal:
        # A redelivered or second violation for a run that already ended changes nothing.
        return []
    return [
        RunStoppedByPolicy(
            run_id=state.run_id,
            step_index=cmd.step_index,
            policy_id=cmd.policy_id,
            decision_id=cmd.decision_id,
            reason=cmd.reason,
        )
    ]


def _late_outcomes_allowed(state: RunState) -> bool:
    """A run stopped at step N still takes the outcomes of steps before N.

    Steps admitted in parallel with the violating one were allowed to run and did spend: their
    tokens and cost belong in the record, so they may still report after the stop.
    """
    return state.status == "stopped_by_policy" and state.stopped_at_step is not None


def _require_running(state: RunState) -> None:
    if not state.exists:
        raise NotFound(f"run {state.run_id} not found")
    if state.status != "running":
        raise Conflict(f"run {state.run_id} is {_describe(state)}")


def _describe(state: RunState) -> str:
    if state.status == "stopped_by_policy":
        return (
            f"stopped_by_policy at step {state.stopped_at_step} "
            f"(policy {state.violation_policy_id})"
        )
    return state.status
