"""A step stopped mid-way on the usage its worker streamed, as pure functions: which window a
streamed cost does not fit, and the events and state of the stop."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from libs.contracts.events import ExecutionFailed, StepDispatched, StepStopped
from services.workflow_engine.budgets import HeldWindow, StreamedOverrun, streamed_overrun
from services.workflow_engine.definitions import document_from
from services.workflow_engine.executions import (
    AttemptEnded,
    Execution,
    StartExecution,
    StopStep,
    decide,
    empty_execution,
    fold,
    running_attempts,
    wake_at,
)

pytestmark = pytest.mark.unit

T0 = datetime(2026, 1, 1, tzinfo=UTC)
USAGE = {
    "input_tokens": 1000,
    "cached_input_tokens": 200,
    "cache_write_tokens": 0,
    "output_tokens": 400,
    "reasoning_tokens": 100,
}


def window(
    cap: str, reserved: str, spent: str, held: str, budget_id: str = "tenant:day"
) -> HeldWindow:
    return HeldWindow(
        budget_id, "2026-01-01", Decimal(cap), Decimal(reserved), Decimal(spent), Decimal(held)
    )


def test_a_streamed_cost_replaces_the_attempts_own_hold() -> None:
    # $1 cap: $0.30 spent, $0.50 reserved of which $0.20 is this attempt's own hold.
    w = window("1", "0.5", "0.3", "0.2")
    assert w.committed_by_others == Decimal("0.6")
    assert streamed_overrun([w], Decimal("0.4"), "s") is None  # 0.6 + 0.4 = cap: fits
    over = streamed_overrun([w], Decimal("0.41"), "s")
    assert over is not None and over.window is w and over.streamed_usd == Decimal("0.41")
    assert over.reason == (
        "budget tenant:day (2026-01-01): step 's' was stopped mid-way: its streamed cost $0.41 "
        "does not fit; $0.6 of the cap $1 is already spent or reserved"
    )


def test_the_first_window_that_does_not_fit_is_named_and_no_window_never_stops() -> None:
    roomy = window("10", "0", "0", "0", "agent:bot:day")
    tight = window("0.1", "0.05", "0", "0.05", "workflow:wf:execution")
    tighter = window("0.1", "0.1", "0", "0", "tenant:month")
    over = streamed_overrun([roomy, tight, tighter], Decimal("0.2"), "s")
    assert over is not None and over.window.budget_id == "tenant:month"  # by budget id
    assert streamed_overrun([], Decimal("1000"), "s") is None
    assert streamed_overrun([roomy], Decimal("10"), "s") is None


def _running() -> tuple[Execution, str]:
    doc = document_from(
        {"name": "wf", "steps": [{"id": "a", "agent": "bot"}, {"id": "b", "agent": "bot"}]}
    )
    state = empty_execution("acme", "ex1")
    state = fold(state, decide(state, StartExecution(doc, 1, "h", {}, T0)))
    return state, "ex1:a:1"


def _stop(run_id: str, t: float = 5) -> StopStep:
    over = StreamedOverrun(window("1", "0.5", "0.3", "0.2"), Decimal("0.45"), "a")
    return StopStep(run_id, 2, "gpt-4o", USAGE, over, T0 + timedelta(seconds=t))


def test_stopping_a_running_attempt_blocks_it_and_fails_the_execution_explained() -> None:
    state, run_id = _running()
    out = decide(state, _stop(run_id))
    stopped, failed = out
    assert isinstance(stopped, StepStopped) and isinstance(failed, ExecutionFailed)
    assert (stopped.step_id, stopped.attempt, stopped.run_id, stopped.step_index) == (
        "a", 1, run_id, 2,
    )  # fmt: skip
    assert stopped.model == "gpt-4o" and stopped.output_tokens == 400
    assert stopped.reasoning_tokens == 100 and stopped.cached_input_tokens == 200
    assert (stopped.streamed_cost_usd, stopped.cap_usd, stopped.committed_usd) == (
        Decimal("0.45"), Decimal("1"), Decimal("0.6"),
    )  # fmt: skip
    assert stopped.budget_id == "tenant:day" and stopped.window_key == "2026-01-01"
    assert failed.step_id == "a" and failed.reason == stopped.reason
    assert "was stopped mid-way" in stopped.reason

    after = fold(state, out)
    assert after.status == "failed" and after.reason == stopped.reason
    assert after.steps["a"].state == "blocked" and after.steps["a"].reason == stopped.reason
    # b is still out: the engine ends its run as the execution failed; nothing is due.
    assert running_attempts(after) == [("b", "ex1:b:1")]
    assert wake_at(after) is None
    view = after.to_dict()
    assert view["status"] == "failed" and view["steps"][0]["state"] == "blocked"


def test_a_stop_of_an_attempt_that_already_ended_or_is_unknown_changes_nothing() -> None:
    state, run_id = _running()
    stopped = fold(state, decide(state, _stop(run_id)))
    assert decide(stopped, _stop(run_id, 6)) == []  # a second report: stopped once
    done = fold(state, decide(state, AttemptEnded(run_id, "completed", None, T0)))
    assert decide(done, _stop(run_id)) == []
    assert decide(state, _stop("ex1:a:2")) == []  # not the running attempt
    assert decide(state, _stop("free-run")) == []
    assert decide(empty_execution("acme", "ex1"), _stop(run_id)) == []


def test_the_stop_event_is_replayed_to_the_same_state() -> None:
    state, run_id = _running()
    out = decide(state, _stop(run_id))
    again = empty_execution("acme", "ex1")
    assert state.document is not None
    doc_events = decide(again, StartExecution(state.document, 1, "h", {}, T0))
    assert any(isinstance(e, StepDispatched) for e in doc_events)
    replayed = fold(again, [*doc_events, *out])
    assert replayed == fold(state, out)
