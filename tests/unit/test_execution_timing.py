"""Where an execution's time went: step waits and running time, and the critical path."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from libs.errors import InvalidInput
from services.workflow_engine.approvals import ApprovalRule, ApprovalRules
from services.workflow_engine.definitions import document_from
from services.workflow_engine.execution_handlers import decode_cursor, encode_cursor
from services.workflow_engine.executions import Approve, StartExecution, Tick, empty_execution
from services.workflow_engine.timing import critical_path
from tests.unit.test_execution_domain import Sim, at, step

pytestmark = pytest.mark.unit


# --- the pure function ---------------------------------------------------------------------------


def test_a_sequence_is_its_own_critical_path() -> None:
    dag = {"a": (), "b": ("a",), "c": ("b",)}
    assert critical_path(dag, {"a": 10, "b": 20, "c": 5}) == (["a", "b", "c"], 35)


def test_fan_out_fan_in_takes_the_slower_branch() -> None:
    dag = {"a": (), "b": ("a",), "c": ("a",), "d": ("b", "c")}
    assert critical_path(dag, {"a": 1, "b": 5, "c": 9, "d": 2}) == (["a", "c", "d"], 12)
    assert critical_path(dag, {"a": 1, "b": 9, "c": 5, "d": 2}) == (["a", "b", "d"], 12)


def test_the_heaviest_chain_wins_even_when_it_has_fewer_steps() -> None:
    dag = {"x": (), "y": ("x",), "z": ("y",), "long": ()}
    assert critical_path(dag, {"x": 1, "y": 1, "z": 1, "long": 10}) == (["long"], 10)


def test_ties_go_to_the_dependency_listed_first_and_the_first_ending_step() -> None:
    fan = {"a": (), "b": ("a",), "c": ("a",), "d": ("c", "b")}
    assert critical_path(fan, {"a": 1, "b": 4, "c": 4, "d": 1}) == (["a", "c", "d"], 6)
    two_ends = {"p": (), "q": ()}
    assert critical_path(two_ends, {"p": 3, "q": 3}) == (["p"], 3)
    # The answer does not depend on the order graphlib happens to visit the steps in.
    assert all(critical_path(fan, {"a": 1, "b": 4, "c": 4, "d": 1})[0] == ["a", "c", "d"]
               for _ in range(20))  # fmt: skip


def test_unstarted_steps_weigh_nothing_and_nothing_run_is_an_empty_path() -> None:
    dag = {"a": (), "b": ("a",), "c": ("b",)}
    assert critical_path(dag, {"a": 7}) == (["a"], 7)  # b and c never started
    assert critical_path(dag, {}) == ([], 0.0)


# --- an execution's view -------------------------------------------------------------------------


def _view(sim: Sim, now: float | None = None) -> dict[str, Any]:
    return sim.state.to_dict(at(now) if now is not None else None)


def _steps(view: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["step_id"]: s for s in view["steps"]}


def test_a_finished_fan_out_shows_each_steps_times_and_the_slow_branch_as_critical() -> None:
    sim = Sim(step("a"), step("b", "a"), step("c", "a"), step("d", "b", "c"))
    sim.end("a", t=2)  # b and c dispatched at 2
    sim.end("b", t=3)
    sim.end("c", t=7)  # d dispatched at 7
    sim.end("d", t=8)
    view = _view(sim)
    assert view["critical_path"] == ["a", "c", "d"]
    assert view["critical_path_ms"] == 8000  # the execution's whole wall time
    steps = _steps(view)
    assert [steps[s]["on_critical_path"] for s in "abcd"] == [True, False, True, True]
    assert steps["b"]["started_at"] == at(2).isoformat()
    assert steps["b"]["finished_at"] == at(3).isoformat()
    assert (steps["b"]["queued_ms"], steps["b"]["running_ms"]) == (0.0, 1000)
    assert steps["c"]["running_ms"] == 5000


def test_an_unfinished_execution_times_running_steps_up_to_now() -> None:
    sim = Sim(step("a"), step("b", "a"), step("c", "a"), step("d", "b", "c"))
    sim.end("a", t=1)
    sim.end("b", t=2)  # c still running, d not started
    view = _view(sim, now=10)
    steps = _steps(view)
    assert steps["c"]["running_ms"] == 9000 and steps["c"]["finished_at"] is None
    assert steps["d"]["started_at"] is None and steps["d"]["running_ms"] is None
    assert view["critical_path"] == ["a", "c"] and view["critical_path_ms"] == 10_000
    # Without a clock, the latest instant the events record stands for now.
    assert _view(sim)["critical_path"] == ["a", "b"]


def test_retries_count_from_the_first_attempt_and_a_wait_for_approval_is_queued_time() -> None:
    sim = Sim(step("a", retries=1, retry_backoff_s=2), step("pay", "a", risk_tier="irreversible"))
    sim.end("a", "failed", t=1)  # retried at 3
    sim.apply(Tick(at(3)))
    sim.end("a", t=4)  # pay asks for approval at 4
    assert _steps(_view(sim, now=6))["pay"]["queued_ms"] == 2000
    sim.apply(Approve("pay", "user:ann", "approver", "ok", at(9)))
    sim.end("pay", t=10)
    steps = _steps(_view(sim))
    assert steps["a"]["running_ms"] == 4000 and steps["a"]["duration_ms"] == 1000
    assert steps["a"]["attempt"] == 2
    assert steps["pay"]["ready_at"] == at(4).isoformat()
    assert (steps["pay"]["queued_ms"], steps["pay"]["running_ms"]) == (5000, 1000)
    assert _view(sim)["critical_path"] == ["a", "pay"]
    assert _view(sim)["critical_path_ms"] == 10_000


def test_a_step_running_when_the_execution_ended_is_timed_up_to_the_end() -> None:
    sim = Sim(step("a"), step("b"))
    sim.end("a", t=2)
    sim.end("b", "stopped", t=5)  # fails the execution at 5
    view = _view(sim, now=100)
    assert view["critical_path"] == ["b"] and view["critical_path_ms"] == 5000


def test_a_gated_step_uses_the_rules_copied_at_start() -> None:
    rules = ApprovalRules(irreversible=ApprovalRule(required=1, sla_s=60))
    sim = Sim(step("a"))
    doc = document_from({"name": "wf", "steps": [step("a", risk_tier="irreversible")]})
    sim.state = empty_execution("acme", "ex2")
    sim.apply(StartExecution(doc, 1, "h", {}, at(0), approvals=rules))
    steps = _steps(_view(sim, now=30))
    assert steps["a"]["queued_ms"] == 30_000 and steps["a"]["started_at"] is None
    assert _view(sim, now=30)["critical_path"] == ["a"]


# --- the listing's cursor ------------------------------------------------------------------------


def test_a_cursor_resumes_after_its_execution_and_a_forged_one_is_refused() -> None:
    started = at(12.5)
    cursor = encode_cursor(started, "01a2:ex")
    assert set(cursor) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert decode_cursor(cursor) == (started, "01a2:ex")

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    forged = [
        "A",  # not base64 of anything
        b64(b"\xff\xfe"),  # not text
        b64(b"no-separator"),
        b64(b"2026-01-01T00:00:00|ex"),  # a time without a zone
        b64(b"2026-01-01T00:00:00+00:00|ex\x00"),  # an id no execution can have
        b64(b"2026-01-01T00:00:00+00:00|"),
    ]
    for cursor in forged:
        with pytest.raises(InvalidInput, match="cursor"):
            decode_cursor(cursor)
