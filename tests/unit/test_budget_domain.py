"""Budgets as pure rules: ids, validation, calendar windows in the tenant's time zone,
thresholds, and what a refusal does to an execution."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from libs.contracts.events import ExecutionBudgetExceeded, StepDispatched
from libs.errors import InvalidInput
from services.workflow_engine.budgets import (
    Budget,
    BudgetRefusal,
    applicable,
    check_timezone,
    crossed,
    estimate_under,
)
from services.workflow_engine.definitions import document_from
from services.workflow_engine.executions import (
    AttemptEnded,
    StartExecution,
    decide,
    empty_execution,
    fold,
)

pytestmark = pytest.mark.unit

NOW = datetime(2026, 11, 30, 23, 30, tzinfo=UTC)
DOC = document_from(
    {
        "name": "wf",
        "steps": [
            {"id": "a", "agent": "fetcher", "estimate": {"cost_usd": "0.25"}},
            {"id": "b", "agent": "writer", "depends_on": ["a"], "estimate": {"cost_usd": "0.5"}},
            {"id": "c", "agent": "writer", "depends_on": ["a"], "estimate": {"cost_usd": "0.5"}},
        ],
    }
)


def test_budget_ids_name_scope_subject_and_window() -> None:
    assert Budget.of("tenant", "", "month", Decimal(5)).budget_id == "tenant:month"
    assert Budget.of("agent", "writer", "day", Decimal(1)).budget_id == "agent:writer:day"
    assert (
        Budget.of("execution", "e1", "execution", Decimal(1)).budget_id == "execution:e1:execution"
    )


@pytest.mark.parametrize(
    ("scope", "subject", "window", "message"),
    [
        ("tenant", "x", "day", "takes no subject"),
        ("agent", "", "day", "needs a subject"),
        ("execution", "e1", "day", "window is the execution"),
        ("team", "", "day", "scope must be one of"),
        ("tenant", "", "week", "window must be one of"),
    ],
)
def test_bad_budgets_are_refused_naming_the_problem(
    scope: str, subject: str, window: str, message: str
) -> None:
    with pytest.raises(InvalidInput, match=message):
        Budget.of(scope, subject, window, Decimal(1))


def test_calendar_windows_follow_the_tenant_time_zone() -> None:
    day = Budget.of("tenant", "", "day", Decimal(1))
    month = Budget.of("tenant", "", "month", Decimal(1))
    # 23:30 UTC on 30 November is already 1 December in Paris.
    assert day.window_key(NOW, "UTC", "e1") == "2026-11-30"
    assert day.window_key(NOW, "Europe/Paris", "e1") == "2026-12-01"
    assert month.window_key(NOW, "Europe/Paris", "e1") == "2026-12"
    assert month.window_key(NOW, "America/New_York", "e1") == "2026-11"
    per_run = Budget.of("workflow", "wf", "execution", Decimal(1))
    assert per_run.window_key(NOW, "UTC", "e1") == "e1"


def test_unknown_time_zones_are_named() -> None:
    assert check_timezone("Asia/Tokyo") == "Asia/Tokyo"
    for bad in ("Mars/Olympus", "America", "../../etc/passwd", "zone.tab", "Europe/Paris\x00"):
        with pytest.raises(InvalidInput, match="unknown time zone"):
            check_timezone(bad)


def test_which_budgets_apply_and_what_they_count() -> None:
    budgets = [
        Budget.of("tenant", "", "day", Decimal(10)),
        Budget.of("agent", "writer", "day", Decimal(10)),
        Budget.of("workflow", "wf", "execution", Decimal(10)),
        Budget.of("workflow", "other", "month", Decimal(10)),
        Budget.of("execution", "e2", "execution", Decimal(10)),
    ]
    found = [b.budget_id for b in applicable(budgets, "wf", "e1")]
    assert found == ["tenant:day", "agent:writer:day", "workflow:wf:execution"]
    assert estimate_under(budgets[0], DOC) == Decimal("1.25")
    assert estimate_under(budgets[1], DOC) == Decimal("1.0")  # only the writer's steps


def test_thresholds_are_announced_once_each() -> None:
    cap = Decimal(10)
    assert crossed(cap, Decimal("7.99"), 0) == []
    assert crossed(cap, Decimal(8), 0) == [80]
    assert crossed(cap, Decimal("9.5"), 80) == [90]
    assert crossed(cap, Decimal(10), 0) == [80, 90, 100]
    assert crossed(cap, Decimal(12), 100) == []


def test_an_execution_over_a_cap_is_halted_before_its_first_step() -> None:
    budget = Budget.of("workflow", "wf", "execution", Decimal(1))
    halt = BudgetRefusal(budget, "e1", Decimal(0), Decimal("1.25"))
    state = empty_execution("acme", "e1")
    events = decide(state, StartExecution(DOC, 1, "h", {}, NOW, halt=halt))
    assert [type(e) for e in events][1:] == [ExecutionBudgetExceeded]
    state = fold(state, events)
    assert state.status == "failed"
    assert state.reason == (
        "budget workflow:wf:execution (each execution): the execution's estimate $1.25 exceeds "
        "the cap $1"
    )
    assert all(r.state == "waiting" and r.attempt == 0 for r in state.steps.values())


def test_a_refused_step_fails_the_execution_and_nothing_else_is_dispatched() -> None:
    state = empty_execution("acme", "e1")
    state = fold(state, decide(state, StartExecution(DOC, 1, "h", {}, NOW)))
    budget = Budget.of("tenant", "", "day", Decimal("0.8"))
    refusal = BudgetRefusal(budget, "2026-11-30", Decimal("0.5"), Decimal("0.5"), step_id="b")
    events = decide(state, AttemptEnded("e1:a:1", "completed", None, NOW), {"b": refusal})
    assert not any(isinstance(e, StepDispatched) for e in events)
    (exceeded,) = [e for e in events if isinstance(e, ExecutionBudgetExceeded)]
    assert (exceeded.step_id, exceeded.window_key, exceeded.cap_usd) == (
        "b",
        "2026-11-30",
        Decimal("0.8"),
    )
    state = fold(state, events)
    assert state.status == "failed"
    assert state.steps["b"].state == "blocked"
    assert "step 'b' estimate $0.5 does not fit; $0.5 of the cap $0.8" in (state.reason or "")
