"""The one fold of a run stream (``<tenant>/run/<run_id>``), shared by every service that reads it.

workflow-engine decides on it, admission builds its decision context from it (adding what only
admission knows: prices, reservations, its own violations), and any other reader of run streams
folds them here too, so "what a run is" has one definition. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from libs.contracts.envelope import DomainEvent
from libs.contracts.events import (
    AdmissionDecided,
    Irregularity,
    PolicyViolationDetected,
    RunCompleted,
    RunStarted,
    RunStoppedByPolicy,
    StepRecorded,
)

RUN_CATEGORY = "run"

Status = Literal["new", "running", "completed", "failed", "stopped_by_policy"]
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "stopped_by_policy"})


@dataclass(frozen=True)
class RunState:
    """A run as its events tell it; ``version`` is the stream version it reflects.

    ``status == "new"`` (``version == 0``) is the state of a run nobody has started.
    """

    tenant_id: str
    run_id: str
    agent_id: str = ""
    status: Status = "new"
    labels: Mapping[str, str] = field(default_factory=dict)
    version: int = 0
    steps: frozenset[int] = frozenset()
    last_step_index: int = 0
    tokens_used: int = 0
    stopped_at_step: int | None = None
    violation_policy_id: str | None = None
    end_reason: str | None = None
    admissions: Mapping[int, bool] = field(default_factory=dict)
    """Outstanding allowed admissions: step index → whether it was admitted while still ahead
    of every recorded step (``True`` for a step run in parallel with later ones). Only known to
    a reader that folds admission's decisions of the run as well (``<tenant>/decisions/<id>``);
    recording the step consumes its admission."""

    @property
    def exists(self) -> bool:
        """Whether the run was started."""
        return self.status != "new"

    @property
    def is_terminal(self) -> bool:
        """Whether the run has ended (nothing more may be recorded)."""
        return self.status in TERMINAL

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view (the ``get_run`` reply)."""
        return {
            "run_id": self.run_id,
            "tenant_id": self.tenant_id,
            "agent_id": self.agent_id,
            "status": self.status,
            "labels": dict(self.labels),
            "version": self.version,
            "steps": sorted(self.steps),
            "last_step_index": self.last_step_index,
            "tokens_used": self.tokens_used,
            "stopped_at_step": self.stopped_at_step,
            "violation_policy_id": self.violation_policy_id,
            "end_reason": self.end_reason,
        }


def irregularities(
    steps: frozenset[int] | set[int],
    last_step_index: int,
    admissions: Mapping[int, bool],
    step_index: int,
) -> list[Irregularity]:
    """How recording ``step_index`` now would break the rules (empty: it would not).

    * ``duplicate``: the index was recorded before;
    * ``unadmitted``: no allowed admission of the index is outstanding (never asked, denied, or
      already used by an earlier record of it);
    * ``out_of_order``: the index is below the highest recorded, and it was not admitted while
      it was still ahead of it (steps admitted together and run in parallel may finish in any
      order; a step admitted or recorded only after a later one is out of order).
    """
    out: list[Irregularity] = []
    if step_index not in admissions:
        out.append("unadmitted")
    if step_index in steps:
        out.append("duplicate")
    if step_index < last_step_index and not admissions.get(step_index, False):
        out.append("out_of_order")
    return out


def empty_run(tenant_id: str, run_id: str) -> RunState:
    """The state of a run before its first event."""
    return RunState(tenant_id=tenant_id, run_id=run_id)


def evolve(state: RunState, event: DomainEvent) -> RunState:
    """``state`` after ``event``."""
    return fold(state, (event,))


def fold(state: RunState, events: Iterable[DomainEvent]) -> RunState:
    """``state`` after every event of ``events``, in order.

    The step set is copied once per call rather than once per event, so catching a long run up
    by a batch of steps stays linear.
    """
    steps: set[int] | None = None
    for event in events:
        if isinstance(event, AdmissionDecided):
            # Admission's stream, not the run's: the run's version does not move.
            state = replace(state, admissions=_admitted(state, event))
            continue
        if isinstance(event, PolicyViolationDetected):
            continue
        changes: dict[str, Any] = {"version": state.version + 1}
        if isinstance(event, RunStarted):
            changes.update(status="running", agent_id=event.agent_id, labels=dict(event.labels))
        elif isinstance(event, StepRecorded):
            if steps is None:
                steps = set(state.steps)
            steps.add(event.step_index)
            changes.update(
                # A stream read from the middle (or a step without its start) still names its
                # agent: every step event carries it.
                agent_id=state.agent_id or event.agent_id,
                last_step_index=max(state.last_step_index, event.step_index),
                tokens_used=state.tokens_used + event.input_tokens + event.output_tokens,
            )
            if event.step_index in state.admissions:
                changes["admissions"] = {
                    k: v for k, v in state.admissions.items() if k != event.step_index
                }
        elif isinstance(event, RunCompleted):
            changes.update(status=event.status, end_reason=event.reason)
        elif isinstance(event, RunStoppedByPolicy):
            changes.update(
                status="stopped_by_policy",
                stopped_at_step=event.step_index,
                violation_policy_id=event.policy_id,
                end_reason=event.reason,
            )
        # Any other event on the stream only advances the version.
        state = replace(state, **changes)
    if steps is not None:
        state = replace(state, steps=frozenset(steps))
    return state


def _admitted(state: RunState, event: AdmissionDecided) -> dict[int, bool]:
    """The outstanding admissions after a decision: an allowed one (re)opens its index, a denied
    one closes it (the latest decision of an index is the one that counts)."""
    held = {k: v for k, v in state.admissions.items() if k != event.step_index}
    if event.outcome != "deny":
        held[event.step_index] = event.step_index > state.last_step_index
    return held
