"""The execution process manager as pure functions: dispatch order, retries, timeouts, ends."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from libs.contracts.envelope import DomainEvent
from libs.contracts.events import (
    ApprovalEscalated,
    ApprovalRequested,
    ExecutionAborted,
    ExecutionCompleted,
    ExecutionFailed,
    StepApproved,
    StepAttemptBlocked,
    StepAttemptCompleted,
    StepAttemptFailed,
    StepDispatched,
    StepRejected,
)
from libs.errors import Conflict, Forbidden
from services.workflow_engine.approvals import ApprovalRule, ApprovalRules
from services.workflow_engine.definitions import document_from
from services.workflow_engine.executions import (
    Abort,
    Approve,
    AttemptEnded,
    Execution,
    Reject,
    StartExecution,
    Tick,
    decide,
    empty_execution,
    fold,
    wake_at,
)

pytestmark = pytest.mark.unit

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def step(sid: str, *deps: str, **extra: Any) -> dict[str, Any]:
    return {"id": sid, "agent": "worker", "depends_on": list(deps), **extra}


class Sim:
    """Drives one execution through decide/fold, keeping every event."""

    def __init__(self, *steps: dict[str, Any]) -> None:
        self.state: Execution = empty_execution("acme", "ex1")
        self.events: list[DomainEvent] = []
        doc = document_from({"name": "wf", "steps": list(steps)})
        self.apply(StartExecution(doc, 1, "h", {"q": 1}, at(0)))

    def apply(self, cmd: Any) -> list[DomainEvent]:
        out = decide(self.state, cmd)
        self.state = fold(self.state, out)
        self.events += out
        return out

    def dispatched(self, out: list[DomainEvent]) -> list[str]:
        return [e.step_id for e in out if isinstance(e, StepDispatched)]

    def run_of(self, sid: str) -> str:
        run = self.state.steps[sid].run_id
        assert run is not None
        return run

    def end(self, sid: str, outcome: str = "completed", t: float = 1) -> list[DomainEvent]:
        return self.apply(AttemptEnded(self.run_of(sid), outcome, "why", at(t)))  # type: ignore[arg-type]


def test_fan_out_and_fan_in_dispatch_each_step_once_when_ready() -> None:
    sim = Sim(step("a"), step("b", "a"), step("c", "a"), step("d", "b", "c"))
    assert sim.dispatched(sim.events) == ["a"]
    assert sim.state.status == "running"
    assert sim.dispatched(sim.end("a")) == ["b", "c"]
    assert sim.dispatched(sim.end("b")) == []
    assert sim.dispatched(sim.end("c")) == ["d"]
    out = sim.end("d")
    assert isinstance(out[-1], ExecutionCompleted) and sim.state.status == "completed"
    assert [e.run_id for e in sim.events if isinstance(e, StepDispatched)] == [
        "ex1:a:1", "ex1:b:1", "ex1:c:1", "ex1:d:1",
    ]  # fmt: skip


def test_a_failed_attempt_is_retried_with_backoff_then_fails_the_execution() -> None:
    sim = Sim(step("a", retries=1, retry_backoff_s=2))
    out = sim.end("a", "failed", t=1)
    assert isinstance(out[0], StepAttemptFailed) and out[0].retry_at == at(3)
    assert sim.state.steps["a"].state == "waiting" and wake_at(sim.state) == at(3)
    assert sim.apply(Tick(at(2))) == []
    assert sim.dispatched(sim.apply(Tick(at(3)))) == ["a"]
    assert sim.state.steps["a"].run_id == "ex1:a:2"
    out = sim.end("a", "failed", t=4)
    assert isinstance(out[-1], ExecutionFailed) and "after 2 attempt(s)" in out[-1].reason
    assert sim.state.status == "failed" and wake_at(sim.state) is None


def test_a_timed_out_attempt_fails_and_its_late_end_changes_nothing() -> None:
    sim = Sim(step("a", timeout_s=10, retries=1, retry_backoff_s=0))
    assert wake_at(sim.state) == at(10)
    late_run = sim.run_of("a")
    out = sim.apply(Tick(at(10)))
    assert isinstance(out[0], StepAttemptFailed) and "timed out after 10 s" in out[0].reason
    assert sim.dispatched(out) == ["a"]  # no backoff: the retry goes at once
    assert sim.apply(AttemptEnded(late_run, "completed", None, at(11))) == []


def test_continue_on_failure_lets_dependents_run_and_the_execution_complete() -> None:
    sim = Sim(step("a", on_failure="continue"), step("b", "a"))
    assert sim.dispatched(sim.end("a", "failed")) == ["b"]
    assert isinstance(sim.end("b")[-1], ExecutionCompleted)


def test_a_step_stopped_by_policy_is_blocked_and_fails_the_execution() -> None:
    sim = Sim(step("a"), step("b", "a"))
    out = sim.end("a", "stopped")
    assert isinstance(out[0], StepAttemptBlocked) and isinstance(out[1], ExecutionFailed)
    assert sim.state.steps["a"].state == "blocked" and sim.state.steps["b"].state == "waiting"


def test_abort_ends_the_execution_once() -> None:
    sim = Sim(step("a"))
    out = sim.apply(Abort("operator said so", at(1)))
    assert isinstance(out[0], ExecutionAborted) and sim.state.status == "aborted"
    with pytest.raises(Conflict):
        sim.apply(Abort("again", at(2)))
    assert sim.end("a") == []


def test_replaying_the_events_gives_the_same_state() -> None:
    sim = Sim(step("a", retries=2), step("b", "a"))
    sim.end("a", "failed")
    sim.apply(Tick(at(5)))
    sim.end("a")
    assert fold(empty_execution("acme", "ex1"), sim.events) == sim.state


# --- approval gates ------------------------------------------------------------------------------


def gated(*steps: dict[str, Any], **rule: Any) -> Sim:
    rules = ApprovalRules(irreversible=ApprovalRule(required=2, sla_s=60, **rule))
    sim = Sim.__new__(Sim)
    sim.state, sim.events = empty_execution("acme", "ex1"), []
    doc = document_from({"name": "wf", "steps": list(steps)})
    sim.apply(StartExecution(doc, 1, "h", {}, at(0), approvals=rules))
    return sim


def test_an_irreversible_step_waits_for_two_distinct_approvers() -> None:
    sim = gated(step("a"), step("b", "a", risk_tier="irreversible"))
    out = sim.end("a")
    assert [type(e) for e in out] == [StepAttemptCompleted, ApprovalRequested]
    assert sim.state.steps["b"].awaiting_approval and wake_at(sim.state) == at(61)
    out = sim.apply(Approve("b", "user:ann", "approver", "looks right", at(2)))
    assert [type(e) for e in out] == [StepApproved]  # one of two: still waiting
    with pytest.raises(Conflict, match="already approved"):
        sim.apply(Approve("b", "user:ann", "admin", "again", at(3)))
    with pytest.raises(Forbidden, match="needs the role approver"):
        sim.apply(Approve("b", "user:op", "operator", "me too", at(3)))
    out = sim.apply(Approve("b", "user:bob", "admin", "ok", at(4)))
    assert sim.dispatched(out) == ["b"]
    assert sim.state.steps["b"].approvers == ("user:ann", "user:bob")


def test_a_rejection_fails_the_execution_with_who_and_why() -> None:
    sim = gated(step("a", risk_tier="irreversible"))
    out = sim.apply(Reject("a", "user:ann", "approver", "wrong account", at(5)))
    assert isinstance(out[0], StepRejected) and isinstance(out[1], ExecutionFailed)
    assert "rejected by user:ann: wrong account" in out[1].reason
    assert sim.state.steps["a"].state == "blocked"


def test_an_expired_request_is_rejected_or_escalated_once() -> None:
    sim = gated(step("a", risk_tier="irreversible"))
    out = sim.apply(Tick(at(60)))
    assert isinstance(out[0], StepRejected) and out[0].rejected_by == "system:sla"
    assert sim.state.status == "failed"

    sim = gated(step("a", risk_tier="irreversible"), on_expiry="escalate")
    out = sim.apply(Tick(at(60)))
    assert isinstance(out[0], ApprovalEscalated) and out[0].role == "admin"
    with pytest.raises(Forbidden):
        sim.apply(Approve("a", "user:ann", "approver", "ok", at(61)))
    out = sim.apply(Tick(at(120)))
    assert isinstance(out[0], StepRejected) and sim.state.status == "failed"


def test_read_only_and_ungated_tiers_never_wait() -> None:
    sim = gated(step("a"), step("b", "a", risk_tier="write"))
    assert sim.dispatched(sim.end("a")) == ["b"]
