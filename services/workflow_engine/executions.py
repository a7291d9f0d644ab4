"""Workflow executions: an event-sourced process manager over a workflow's DAG.

An execution runs one version of a workflow definition. Its stream
(``<tenant>/execution/<execution_id>``) records every decision the engine takes:

* ``execution.started`` carries the definition document itself, so an execution replays without
  the catalogue and a later revision never changes a running execution;
* ``execution.step_dispatched`` starts one *attempt* of a step. Each attempt is its own governed
  run, ``<execution_id>:<step_id>:<attempt>``, acted by the step's agent: the agent worker asks
  admission before every call it makes inside the step, exactly as a free-standing agent does;
* the attempt's run ending (``run.completed``, or ``run.stopped_by_policy``) completes, fails or
  blocks the step; a timeout fails it too. A failed attempt is tried again after a backoff while
  the step has retries left;
* ``execution.step_stopped``: a budget stopped a running attempt on the usage its worker
  streamed (the step is blocked and the execution fails, as when a budget refuses a dispatch);
* ``execution.completed``, ``execution.failed`` or ``execution.aborted`` end it.

Execution states: pending → running → completed | failed | aborted. Step states: waiting →
running → completed | failed | blocked (a failed attempt with retries left goes back to waiting).

Nothing here does I/O. ``decide(state, command)`` returns the events a command causes,
including the follow-ups (dispatching the steps that became ready, ending the execution), and
:func:`wake_at` says when the engine must look at the execution again (the earliest deadline or
retry), which is all a restarted engine needs to resume.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from libs.contracts.envelope import DomainEvent
from libs.contracts.events import (
    ApprovalEscalated,
    ApprovalRequested,
    ExecutionAborted,
    ExecutionBudgetExceeded,
    ExecutionCompleted,
    ExecutionFailed,
    ExecutionStarted,
    StepApproved,
    StepAttemptBlocked,
    StepAttemptCompleted,
    StepAttemptFailed,
    StepDispatched,
    StepRejected,
    StepStopped,
)
from libs.errors import Conflict, Forbidden, InvalidInput
from services.workflow_engine.approvals import ApprovalRules, role_satisfies
from services.workflow_engine.budgets import BudgetRefusal, StreamedOverrun
from services.workflow_engine.definitions import StepSpec, WorkflowDocument
from services.workflow_engine.timing import StepTimes, critical_path

EXECUTION_CATEGORY = "execution"

ExecutionStatus = Literal["new", "pending", "running", "completed", "failed", "aborted"]
StepState = Literal["waiting", "running", "completed", "failed", "blocked"]
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "aborted"})
ENDED_STEP: frozenset[str] = frozenset({"completed", "failed", "blocked"})
MAX_BACKOFF_S = 3_600.0


def attempt_run_id(execution_id: str, step_id: str, attempt: int) -> str:
    """The governed run of one attempt of a step."""
    return f"{execution_id}:{step_id}:{attempt}"


def parse_attempt_run_id(run_id: str) -> tuple[str, str, int] | None:
    """``(execution_id, step_id, attempt)`` of an attempt's run; None for any other run."""
    parts = run_id.split(":")
    if len(parts) != 3 or not parts[2].isdigit():
        return None
    return parts[0], parts[1], int(parts[2])


# --- state ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepRun:
    """Where one step of an execution is."""

    state: StepState = "waiting"
    attempt: int = 0
    run_id: str | None = None
    dispatched_at: datetime | None = None
    """When the current (latest) attempt was dispatched."""
    first_dispatched_at: datetime | None = None
    """When the first attempt was dispatched: the step's work began."""
    deadline_at: datetime | None = None
    not_before: datetime | None = None
    finished_at: datetime | None = None
    reason: str | None = None
    approval_required: int = 0
    """Distinct approvals the step needs before dispatch (0: none asked for)."""
    approval_role: str | None = None
    approvers: tuple[str, ...] = ()
    approval_requested_at: datetime | None = None
    approval_expires_at: datetime | None = None
    escalated: bool = False

    @property
    def awaiting_approval(self) -> bool:
        """Waiting for approvals it asked for and has not got yet."""
        return (
            self.state == "waiting"
            and self.approval_required > 0
            and len(self.approvers) < self.approval_required
        )


@dataclass(frozen=True)
class Execution:
    """An execution as its stream folds."""

    tenant_id: str
    execution_id: str
    status: ExecutionStatus = "new"
    workflow_id: str = ""
    workflow_version: int = 0
    document: WorkflowDocument | None = None
    inputs: Mapping[str, Any] = field(default_factory=dict)
    approval_rules: ApprovalRules = field(default_factory=ApprovalRules)
    steps: Mapping[str, StepRun] = field(default_factory=dict)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    reason: str | None = None

    @property
    def exists(self) -> bool:
        """Whether the execution was started."""
        return self.status != "new"

    def spec(self, step_id: str) -> StepSpec:
        """The definition of ``step_id``."""
        assert self.document is not None
        return self.document.step(step_id)

    def times(self, step_id: str) -> StepTimes:
        """The instants that bound ``step_id``'s waits and work."""
        run = self.steps.get(step_id, StepRun())
        return StepTimes(
            requested_at=run.approval_requested_at,
            started_at=run.first_dispatched_at,
            finished_at=run.finished_at if run.state in ENDED_STEP else None,
        )

    def to_dict(self, now: datetime | None = None) -> dict[str, Any]:
        """The execution as the API shows it: the DAG with each step's state and timing, and
        its critical path (see :mod:`.timing`). Steps not ended are timed up to the
        execution's end, or else ``now`` (default: the latest instant the execution records)."""
        doc = self.document
        clock = self.finished_at or now or self._last_instant()
        specs = doc.steps if doc else ()
        times = {spec.id: self.times(spec.id) for spec in specs}
        path, path_ms = critical_path(
            {spec.id: spec.depends_on for spec in specs},
            {sid: t.span_ms(clock) for sid, t in times.items()},
        )
        on_path = set(path)
        steps = []
        for spec in specs:
            run = self.steps.get(spec.id, StepRun())
            t = times[spec.id]
            duration = (
                (run.finished_at - run.dispatched_at).total_seconds() * 1000
                if run.finished_at and run.dispatched_at
                else None
            )
            steps.append(
                {
                    "step_id": spec.id,
                    "agent_id": spec.agent,
                    "depends_on": list(spec.depends_on),
                    "risk_tier": spec.risk_tier,
                    "state": run.state,
                    "attempt": run.attempt,
                    "run_id": run.run_id,
                    "duration_ms": duration,
                    "ready_at": _iso(t.ready_at),
                    "started_at": _iso(t.started_at),
                    "finished_at": _iso(t.finished_at),
                    "queued_ms": _round(t.queued_ms(clock)),
                    "running_ms": _round(t.running_ms(clock)),
                    "on_critical_path": spec.id in on_path,
                    "reason": run.reason,
                    "approval": _approval_view(run),
                }
            )
        return {
            "execution_id": self.execution_id,
            "workflow_id": self.workflow_id,
            "workflow_version": self.workflow_version,
            "status": self.status,
            "reason": self.reason,
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "steps": steps,
            "critical_path": path,
            "critical_path_ms": round(path_ms, 3),
        }

    def _last_instant(self) -> datetime:
        """The latest instant the folded events record (a stand-in for "now" in pure code)."""
        instants = [self.started_at] + [
            t
            for r in self.steps.values()
            for t in (r.dispatched_at, r.finished_at, r.approval_requested_at)
        ]
        known = [t for t in instants if t is not None]
        return max(known) if known else datetime.fromtimestamp(0, UTC)


def _approval_view(run: StepRun) -> dict[str, Any] | None:
    if run.approval_required == 0:
        return None
    return {
        "required": run.approval_required,
        "role": run.approval_role,
        "approvers": list(run.approvers),
        "pending": run.awaiting_approval,
        "requested_at": _iso(run.approval_requested_at),
        "expires_at": _iso(run.approval_expires_at),
        "escalated": run.escalated,
    }


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t else None


def _round(ms: float | None) -> float | None:
    return None if ms is None else round(ms, 3)


def empty_execution(tenant_id: str, execution_id: str) -> Execution:
    """An execution that was never started."""
    return Execution(tenant_id=tenant_id, execution_id=execution_id)


def _step(execution: Execution, step_id: str, **changes: Any) -> Execution:
    current = execution.steps.get(step_id, StepRun())
    return replace(execution, steps={**execution.steps, step_id: replace(current, **changes)})


def evolve(state: Execution, event: DomainEvent) -> Execution:
    """Apply one event."""
    match event:
        case ExecutionStarted():
            doc = WorkflowDocument.model_validate(event.document)
            return replace(
                state,
                status="pending",
                workflow_id=event.workflow_id,
                workflow_version=event.workflow_version,
                document=doc,
                inputs=dict(event.inputs),
                approval_rules=ApprovalRules.model_validate(event.approvals),
                steps={s.id: StepRun() for s in doc.steps},
                started_at=event.started_at,
            )
        case StepDispatched():
            running = replace(state, status="running")
            before = state.steps.get(event.step_id, StepRun())
            return _step(
                running,
                event.step_id,
                state="running",
                attempt=event.attempt,
                run_id=event.run_id,
                dispatched_at=event.dispatched_at,
                first_dispatched_at=before.first_dispatched_at or event.dispatched_at,
                deadline_at=event.deadline_at,
                not_before=None,
                finished_at=None,
                reason=None,
            )
        case ApprovalRequested():
            return _step(
                state, event.step_id, approval_required=event.required, approval_role=event.role,
                approval_requested_at=event.requested_at, approval_expires_at=event.expires_at,
            )  # fmt: skip
        case StepApproved():
            approvers = (*state.steps[event.step_id].approvers, event.approver)
            return _step(state, event.step_id, approvers=approvers)
        case ApprovalEscalated():
            return _step(
                state, event.step_id, approval_role=event.role,
                approval_expires_at=event.expires_at, escalated=True,
            )  # fmt: skip
        case StepRejected():
            return _step(
                state, event.step_id, state="blocked", reason=event.reason,
                finished_at=event.rejected_at,
            )  # fmt: skip
        case StepAttemptCompleted():
            return _step(state, event.step_id, state="completed", finished_at=event.finished_at)
        case StepAttemptFailed():
            if event.retry_at is not None:
                return _step(
                    state, event.step_id, state="waiting", not_before=event.retry_at,
                    reason=event.reason, finished_at=event.finished_at,
                )  # fmt: skip
            return _step(
                state, event.step_id, state="failed", reason=event.reason,
                finished_at=event.finished_at,
            )  # fmt: skip
        case StepAttemptBlocked():
            return _step(
                state, event.step_id, state="blocked", reason=event.reason,
                finished_at=event.finished_at,
            )  # fmt: skip
        case StepStopped():
            return _step(
                state, event.step_id, state="blocked", reason=event.reason,
                finished_at=event.stopped_at,
            )  # fmt: skip
        case ExecutionCompleted():
            return replace(state, status="completed", finished_at=event.finished_at)
        case ExecutionFailed():
            return replace(
                state, status="failed", finished_at=event.finished_at, reason=event.reason
            )
        case ExecutionAborted():
            return replace(
                state, status="aborted", finished_at=event.finished_at, reason=event.reason
            )
        case ExecutionBudgetExceeded():
            failed = replace(
                state, status="failed", finished_at=event.finished_at, reason=event.reason
            )
            if event.step_id is None:
                return failed
            return _step(
                failed, event.step_id, state="blocked", reason=event.reason,
                finished_at=event.finished_at,
            )  # fmt: skip
    return state


def fold(state: Execution, events: Iterable[DomainEvent]) -> Execution:
    """Apply events in order."""
    for event in events:
        state = evolve(state, event)
    return state


# --- commands ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StartExecution:
    """Run ``document`` (version ``workflow_version`` of its workflow) with ``inputs``."""

    document: WorkflowDocument
    workflow_version: int
    document_hash: str
    inputs: Mapping[str, Any]
    now: datetime
    approvals: ApprovalRules = field(default_factory=ApprovalRules)
    halt: BudgetRefusal | None = None
    """A budget the whole estimate exceeds: the execution is halted before its first step."""


@dataclass(frozen=True)
class AttemptEnded:
    """The run of an attempt ended: ``completed``, ``failed`` or ``stopped`` by policy."""

    run_id: str
    outcome: Literal["completed", "failed", "stopped"]
    reason: str | None
    now: datetime


@dataclass(frozen=True)
class Tick:
    """Time passed: fail attempts past their deadline, dispatch retries that are due."""

    now: datetime


@dataclass(frozen=True)
class Abort:
    """Stop the execution: nothing more is dispatched, running attempts' runs are ended."""

    reason: str
    now: datetime


@dataclass(frozen=True)
class Approve:
    """``approver``, holding ``role`` in the tenant, approves a step waiting for approval."""

    step_id: str
    approver: str
    role: str
    reason: str
    now: datetime


@dataclass(frozen=True)
class Reject:
    """``approver``, holding ``role``, rejects a step waiting for approval: the execution fails."""

    step_id: str
    approver: str
    role: str
    reason: str
    now: datetime


@dataclass(frozen=True)
class StopStep:
    """A budget cannot take what a running attempt's worker streamed: stop it mid-way."""

    run_id: str
    step_index: int
    model: str | None
    usage: Mapping[str, int]
    """The call's cumulative counts: ``input_tokens``, ``cached_input_tokens``, ...."""
    overrun: StreamedOverrun
    now: datetime


Command = StartExecution | AttemptEnded | Tick | Abort | Approve | Reject | StopStep


def decide(
    state: Execution,
    command: Command,
    refused: Mapping[str, BudgetRefusal] | None = None,
) -> list[DomainEvent]:
    """The events ``command`` causes, follow-ups included.

    ``refused`` names the steps whose dispatch a budget refused (the engine learns it by trying
    to reserve): the first of them that becomes ready fails the execution instead.
    """
    match command:
        case StartExecution():
            if state.exists:
                raise Conflict(f"execution {state.execution_id} already exists")
            first: list[DomainEvent] = [
                ExecutionStarted(
                    execution_id=state.execution_id,
                    workflow_id=command.document.name,
                    workflow_version=command.workflow_version,
                    document_hash=command.document_hash,
                    document=command.document.content(),
                    inputs=dict(command.inputs),
                    approvals=command.approvals.content(),
                    started_at=command.now,
                )
            ]
            if command.halt is not None:
                first.append(_exceeded(state.execution_id, command.halt, command.now))
        case AttemptEnded():
            first = _attempt_ended(state, command)
        case Tick():
            first = _timeouts(state, command.now)
            if not any(isinstance(e, ExecutionFailed) for e in first):
                first += _approval_expiries(fold(state, first), command.now)
        case Approve() | Reject():
            first = _approval_decision(state, command)
        case StopStep():
            first = _stop(state, command)
        case Abort():
            if not state.exists:
                raise InvalidInput(f"execution {state.execution_id} does not exist")
            if state.status in TERMINAL:
                raise Conflict(f"execution {state.execution_id} already ended ({state.status})")
            first = [
                ExecutionAborted(
                    execution_id=state.execution_id, reason=command.reason, finished_at=command.now
                )
            ]
    return first + advance(fold(state, first), command.now, refused or {})


def _running_attempt(state: Execution, run_id: str) -> tuple[str, int] | None:
    """``(step_id, attempt)`` when ``run_id`` is the running attempt of a step of a live
    execution. A late word about an attempt the engine already gave up on (timed out, retried,
    stopped) concerns none."""
    parsed = parse_attempt_run_id(run_id)
    if parsed is None or state.status in TERMINAL or not state.exists:
        return None
    _, step_id, attempt = parsed
    run = state.steps.get(step_id)
    if run is None or run.state != "running" or run.run_id != run_id:
        return None
    return step_id, attempt


def _attempt_ended(state: Execution, cmd: AttemptEnded) -> list[DomainEvent]:
    found = _running_attempt(state, cmd.run_id)
    if found is None:
        return []
    step_id, attempt = found
    eid = state.execution_id
    if cmd.outcome == "completed":
        return [
            StepAttemptCompleted(
                execution_id=eid, step_id=step_id, attempt=attempt, run_id=cmd.run_id,
                finished_at=cmd.now,
            )
        ]  # fmt: skip
    if cmd.outcome == "stopped":
        reason = f"step {step_id!r} was stopped by policy: {cmd.reason or 'denied'}"
        return [
            StepAttemptBlocked(
                execution_id=eid, step_id=step_id, attempt=attempt, run_id=cmd.run_id,
                reason=reason, finished_at=cmd.now,
            ),
            ExecutionFailed(
                execution_id=eid, step_id=step_id, reason=reason, finished_at=cmd.now
            ),
        ]  # fmt: skip
    return _failed(state, step_id, cmd.reason or "the agent reported failure", cmd.now)


def _stop(state: Execution, cmd: StopStep) -> list[DomainEvent]:
    found = _running_attempt(state, cmd.run_id)
    if found is None:  # it ended already: an attempt is stopped once
        return []
    step_id, attempt = found
    w = cmd.overrun.window
    reason = cmd.overrun.reason
    return [
        StepStopped(
            execution_id=state.execution_id, step_id=step_id, attempt=attempt,
            run_id=cmd.run_id, step_index=cmd.step_index, model=cmd.model, **cmd.usage,
            streamed_cost_usd=cmd.overrun.streamed_usd, budget_id=w.budget_id,
            window_key=w.window_key, cap_usd=w.cap_usd, committed_usd=w.committed_by_others,
            reason=reason, stopped_at=cmd.now,
        ),
        ExecutionFailed(
            execution_id=state.execution_id, step_id=step_id, reason=reason, finished_at=cmd.now
        ),
    ]  # fmt: skip


def _failed(state: Execution, step_id: str, reason: str, now: datetime) -> list[DomainEvent]:
    run = state.steps[step_id]
    spec = state.spec(step_id)
    retry_at = None
    if run.attempt <= spec.retries:
        delay = min(spec.retry_backoff_s * 2 ** (run.attempt - 1), MAX_BACKOFF_S)
        retry_at = now + timedelta(seconds=delay)
    out: list[DomainEvent] = [
        StepAttemptFailed(
            execution_id=state.execution_id, step_id=step_id, attempt=run.attempt,
            run_id=run.run_id or "", reason=reason, retry_at=retry_at, finished_at=now,
        )
    ]  # fmt: skip
    if retry_at is None and spec.on_failure == "fail":
        out.append(
            ExecutionFailed(
                execution_id=state.execution_id,
                step_id=step_id,
                reason=f"step {step_id!r} failed after {run.attempt} attempt(s): {reason}",
                finished_at=now,
            )
        )
    return out


def _timeouts(state: Execution, now: datetime) -> list[DomainEvent]:
    if state.status in TERMINAL or not state.exists:
        return []
    out: list[DomainEvent] = []
    for step_id, run in sorted(state.steps.items()):
        if run.state == "running" and run.deadline_at is not None and run.deadline_at <= now:
            timeout = state.spec(step_id).timeout_s
            out += _failed(fold(state, out), step_id, f"timed out after {timeout:g} s", now)
            if any(isinstance(e, ExecutionFailed) for e in out):
                break
    return out


def _awaiting(state: Execution, step_id: str) -> StepRun:
    if not state.exists:
        raise InvalidInput(f"execution {state.execution_id} does not exist")
    if state.status in TERMINAL:
        raise Conflict(f"execution {state.execution_id} already ended ({state.status})")
    run = state.steps.get(step_id)
    if run is None:
        raise InvalidInput(f"execution {state.execution_id} has no step {step_id!r}")
    if not run.awaiting_approval:
        raise Conflict(f"step {step_id!r} is not waiting for approval (it is {run.state})")
    return run


def _approval_decision(state: Execution, cmd: Approve | Reject) -> list[DomainEvent]:
    run = _awaiting(state, cmd.step_id)
    needed = run.approval_role or "approver"
    if not role_satisfies(cmd.role, needed):
        raise Forbidden(
            f"approving step {cmd.step_id!r} needs the role {needed}; {cmd.approver} is {cmd.role}"
        )
    eid = state.execution_id
    if isinstance(cmd, Reject):
        reason = f"step {cmd.step_id!r} was rejected by {cmd.approver}: {cmd.reason}"
        return [
            StepRejected(
                execution_id=eid, step_id=cmd.step_id, rejected_by=cmd.approver,
                reason=cmd.reason, rejected_at=cmd.now,
            ),
            ExecutionFailed(
                execution_id=eid, step_id=cmd.step_id, reason=reason, finished_at=cmd.now
            ),
        ]  # fmt: skip
    if cmd.approver in run.approvers:
        missing = run.approval_required - len(run.approvers)
        raise Conflict(
            f"{cmd.approver} already approved step {cmd.step_id!r}; "
            f"{missing} more distinct approver(s) needed"
        )
    return [
        StepApproved(
            execution_id=eid, step_id=cmd.step_id, approver=cmd.approver, role=cmd.role,
            reason=cmd.reason, approved_at=cmd.now,
        )
    ]  # fmt: skip


def _approval_expiries(state: Execution, now: datetime) -> list[DomainEvent]:
    if state.status in TERMINAL or not state.exists:
        return []
    out: list[DomainEvent] = []
    for step_id, run in sorted(state.steps.items()):
        expires = run.approval_expires_at
        if not run.awaiting_approval or expires is None or expires > now:
            continue
        rule = state.approval_rules.for_tier(state.spec(step_id).risk_tier)
        if rule is not None and rule.on_expiry == "escalate" and not run.escalated:
            out.append(
                ApprovalEscalated(
                    execution_id=state.execution_id, step_id=step_id, role="admin",
                    escalated_at=now, expires_at=now + timedelta(seconds=rule.sla_s),
                )
            )  # fmt: skip
            continue
        reason = f"no approval within the SLA ({len(run.approvers)}/{run.approval_required})"
        out += [
            StepRejected(
                execution_id=state.execution_id, step_id=step_id, rejected_by="system:sla",
                reason=reason, rejected_at=now,
            ),
            ExecutionFailed(
                execution_id=state.execution_id, step_id=step_id,
                reason=f"step {step_id!r} was rejected: {reason}", finished_at=now,
            ),
        ]  # fmt: skip
        break
    return out


def _satisfied(state: Execution, dep: str) -> bool:
    run = state.steps.get(dep, StepRun())
    return run.state == "completed" or (
        run.state == "failed" and state.spec(dep).on_failure == "continue"
    )


def _exceeded(execution_id: str, r: BudgetRefusal, now: datetime) -> ExecutionBudgetExceeded:
    b = r.budget
    return ExecutionBudgetExceeded(
        execution_id=execution_id, step_id=r.step_id, budget_id=b.budget_id, scope=b.scope,
        subject=b.subject, window=b.window, window_key=r.window_key, cap_usd=b.cap_usd,
        committed_usd=r.committed_usd, estimate_usd=r.estimate_usd, reason=r.reason,
        finished_at=now,
    )  # fmt: skip


def advance(
    state: Execution, now: datetime, refused: Mapping[str, BudgetRefusal] | None = None
) -> list[DomainEvent]:
    """Dispatch every step that is ready now; end the execution when every step has ended.

    A ready step in ``refused`` fails the execution (a budget cannot take its estimate), and
    nothing else is dispatched.
    """
    if state.status in TERMINAL or state.document is None:
        return []
    out: list[DomainEvent] = []
    for spec in state.document.steps:
        run = state.steps.get(spec.id, StepRun())
        if run.state != "waiting" or (run.not_before is not None and run.not_before > now):
            continue
        if all(_satisfied(state, d) for d in spec.depends_on):
            rule = state.approval_rules.for_tier(spec.risk_tier)
            if rule is not None and len(run.approvers) < rule.required:
                if run.approval_requested_at is None:
                    out.append(
                        ApprovalRequested(
                            execution_id=state.execution_id, step_id=spec.id,
                            risk_tier=spec.risk_tier, required=rule.required, role=rule.role,
                            requested_at=now, expires_at=now + timedelta(seconds=rule.sla_s),
                        )
                    )  # fmt: skip
                continue
            if refused and spec.id in refused:
                return [_exceeded(state.execution_id, refused[spec.id], now)]
            attempt = run.attempt + 1
            out.append(
                StepDispatched(
                    execution_id=state.execution_id,
                    step_id=spec.id,
                    attempt=attempt,
                    run_id=attempt_run_id(state.execution_id, spec.id, attempt),
                    agent_id=spec.agent,
                    workflow_id=state.workflow_id,
                    inputs={**state.inputs, **spec.inputs},
                    risk_tier=spec.risk_tier,
                    dispatched_at=now,
                    deadline_at=now + timedelta(seconds=spec.timeout_s),
                )
            )
    if any(isinstance(e, StepDispatched) for e in out):
        return out
    if out:  # approvals asked for: the execution waits for people
        return out
    ended = all(
        r.state == "completed" or (r.state == "failed" and _satisfied(state, sid))
        for sid, r in state.steps.items()
    )
    if ended:
        return [ExecutionCompleted(execution_id=state.execution_id, finished_at=now)]
    return []


def wake_at(state: Execution) -> datetime | None:
    """When the engine must next look at this execution (None: only an event can move it)."""
    if state.status in TERMINAL or not state.exists:
        return None
    times: list[datetime] = []
    for r in state.steps.values():
        if r.state == "running" and r.deadline_at is not None:
            times.append(r.deadline_at)
        elif r.state == "waiting" and r.not_before is not None:
            times.append(r.not_before)
        if r.awaiting_approval and r.approval_expires_at is not None:
            times.append(r.approval_expires_at)
    return min(times) if times else None


def running_attempts(state: Execution) -> list[tuple[str, str]]:
    """``(step_id, run_id)`` of every attempt still running."""
    return [
        (sid, r.run_id)
        for sid, r in sorted(state.steps.items())
        if r.state == "running" and r.run_id
    ]
