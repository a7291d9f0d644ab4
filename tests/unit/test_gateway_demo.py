"""The demo's script reproduces seed 000, its workflow's budget alerts without stopping it, and
its summaries and progress say what happened."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from libs.contracts.envelope import EventEnvelope
from libs.pricing import builtin_price_table, price_step
from libs.usage import Usage, from_provider
from services.gateway.demo import SCRIPTS, summary
from services.gateway.demo_workflow import (
    BUDGET_CAP,
    BUDGET_ID,
    LiveTokens,
    Progress,
    WorkflowOutcome,
    levels,
)
from services.gateway.demo_workflow import summary as workflow_summary
from services.gateway.example_worker import CALLS, WORKFLOW, _usage_payload, simulated_call

pytestmark = pytest.mark.unit

TOKEN_LIMIT = 10_000


def _tokens(steps: tuple[object, ...]) -> int:
    return sum(s.input_tokens + s.output_tokens for s in steps)  # type: ignore[attr-defined]


def test_the_script_is_seed_000() -> None:
    a, b, c = SCRIPTS
    assert (len(a.steps), _tokens(a.steps), a.finish) == (3, 8000, True)
    assert (len(b.steps), _tokens(b.steps), b.finish) == (2, 5000, False)
    assert [_tokens((s,)) for s in c.steps] == [500, 5000]
    assert c.denied_step is not None
    assert _tokens((c.denied_step,)) == 9500
    # Only run C's third step crosses the limit; every admitted step stays under it.
    for script in SCRIPTS:
        used = 0
        for step in script.steps:
            used += _tokens((step,))
            assert used <= TOKEN_LIMIT
    assert _tokens(c.steps) + _tokens((c.denied_step,)) > TOKEN_LIMIT


def test_summary_names_status_denial_incident_inflection_and_urls() -> None:
    run_ids = {"A": "demo-a-1", "B": "demo-b-1", "C": "demo-c-1"}
    runs = {
        "A": {"status": "completed", "last_step_index": 3, "tokens_used": 8000, "cost_usd": "0.03"},
        "B": {"status": "running", "last_step_index": 2, "tokens_used": 5000, "cost_usd": "0.02"},
        "C": {
            "status": "stopped_by_policy",
            "last_step_index": 2,
            "tokens_used": 5500,
            "cost_usd": None,
        },
    }
    denial = {
        "outcome": "deny",
        "reasons": [{"policy_id": "token_limit", "severity": "high", "message": "15000 > 10000"}],
    }
    incident = {"incident_id": "inc-1", "severity": "high", "status": "open",
                "policy_id": "token_limit"}  # fmt: skip
    trace = {"inflection_point": {"step_index": 3, "policy_id": "token_limit", "reason": "r"}}
    text = summary("http://gw", "mc_key", run_ids, runs, denial, incident, trace)
    assert "stopped_by_policy" in text and "completed" in text and "running" in text
    assert "token_limit (high): 15000 > 10000" in text
    assert "Incident inc-1: severity high" in text
    assert "Inflection point of run C: step 3 (token_limit" in text
    assert "unpriced" in text
    assert "curl -H 'Authorization: Bearer mc_key' http://gw/v1/runs" in text


# --- the workflow part ---------------------------------------------------------------------


def _cost(task: str) -> Decimal:
    call = CALLS[task]
    usage = from_provider(call.provider, _usage_payload(call))
    price = price_step(
        builtin_price_table(), call.model, usage.input_tokens, usage.output_tokens,
        datetime.now(UTC), cached_input_tokens=usage.cached_input_tokens,
        cache_write_tokens=usage.cache_write_tokens, reasoning_tokens=usage.reasoning_tokens,
    )  # fmt: skip
    assert price.total_cost_usd is not None, f"{call.model} has no built-in price"
    return price.total_cost_usd


def test_the_budget_alerts_at_80_percent_and_never_stops_the_execution() -> None:
    estimates = {s["id"]: Decimal(s["estimate"]["cost_usd"]) for s in WORKFLOW["steps"]}
    costs = {task: _cost(task) for task in estimates}
    # Every step's estimate covers what its call costs at the built-in prices, and the steps'
    # whole estimate fits the cap: the execution is neither halted nor refused a dispatch.
    assert all(costs[t] <= estimates[t] for t in estimates), (costs, estimates)
    assert sum(estimates.values()) <= BUDGET_CAP
    # What is committed (spent + reserved) at each dispatch, level by level of the DAG.
    committed = []
    spent = Decimal(0)
    for level in levels(WORKFLOW["steps"]):
        committed.append(spent + sum(estimates[s["id"]] for s in level))
        spent += sum(costs[s["id"]] for s in level)
    committed.append(spent)
    assert max(committed) >= BUDGET_CAP * Decimal("0.8")
    assert max(committed) < BUDGET_CAP


def test_a_streamed_call_reports_growing_usage_and_ends_at_the_providers_usage() -> None:
    for task, call in CALLS.items():
        reported: list[Usage] = []

        async def report(usage: Usage, into: list[Usage] = reported) -> None:
            into.append(usage)

        final = asyncio.run(simulated_call(call, report, latency_s=0))
        assert final == from_provider(call.provider, _usage_payload(call)), task
        assert reported[-1] == final, task
        # A streamed call reports as it goes; another once, at its end.
        assert len(reported) > 1 if call.chunks else len(reported) == 1, task
        outs = [u.output_tokens for u in reported]
        assert outs == sorted(outs), task


def test_levels_put_parallel_steps_together() -> None:
    got = [[s["id"] for s in level] for level in levels(WORKFLOW["steps"])]
    assert got == [["gather"], ["summarise-code", "summarise-issues"], ["review"], ["publish"]]
    with pytest.raises(ValueError, match="DAG"):
        levels([{"id": "a", "depends_on": ["b"]}, {"id": "b", "depends_on": ["a"]}])


def _view(states: dict[str, tuple[str, int]], approval: dict[str, Any] | None = None) -> Any:
    return {
        "execution_id": "e1",
        "workflow_id": "release-notes-demo",
        "workflow_version": 1,
        "status": "running",
        "steps": [
            {"step_id": s["id"], "agent_id": s["agent"], "depends_on": s["depends_on"],
             "risk_tier": s.get("risk_tier", "read_only"), "state": states[s["id"]][0],
             "attempt": states[s["id"]][1], "run_id": f"e1:{s['id']}:{states[s['id']][1]}",
             "duration_ms": 500.0 if states[s["id"]][0] == "completed" else None,
             "reason": None, "approval": approval if s["id"] == "publish" else None}
            for s in WORKFLOW["steps"]
        ],
    }  # fmt: skip


def test_progress_prints_each_change_once() -> None:
    lines: list[str] = []
    progress = Progress(lines.append)
    waiting = {s["id"]: ("waiting", 0) for s in WORKFLOW["steps"]}
    running = {**waiting, "gather": ("running", 1)}
    done = {**running, "gather": ("completed", 1)}
    gate = {"required": 1, "role": "approver", "approvers": [], "pending": True,
            "expires_at": "2026-11-30T16:00:00+00:00"}  # fmt: skip
    for view in (_view(waiting), _view(running), _view(running), _view(done), _view(done, gate),
                 _view(done, {**gate, "pending": False, "approvers": ["user:ann"]})):  # fmt: skip
        progress.execution(view)
    budget = {"budget_id": BUDGET_ID, "alerted_pct": 80, "cap_usd": "0.055",
              "spent_usd": "0.007", "reserved_usd": "0.039"}  # fmt: skip
    progress.budget({"budgets": [budget]})
    progress.budget({"budgets": [budget]})
    said = [line.split("] ", 1)[1] for line in lines]
    assert said == [
        "gather            dispatched to researcher (attempt 1, run e1:gather:1)",
        "gather            completed in 0.50 s",
        "publish           waits for approval: 1 × approver (irreversible), "
        "until 2026-11-30T16:00:00+00:00",
        "publish           approved by user:ann",
        f"budget alert: {BUDGET_ID} reached 80 % of its $0.055 cap (spent $0.007, reserved $0.039)",
    ]


def test_live_tokens_print_each_new_count_once() -> None:
    lines: list[str] = []
    live = LiveTokens(lines.append)
    for out in (1, 1, 140, 140, 280):
        live.show("summarise-code", "claude-sonnet-4", Usage(4500, 0, 3000, out, 0))
    assert len(lines) == live.updates == 3
    assert "summarise-code    tokens so far  4,500 in (0 cached, 3,000 cache write)" in lines[0]
    assert lines[2].endswith("280 out (0 reasoning)  claude-sonnet-4")


def test_the_workflow_summary_shows_the_dag_cost_approval_and_alert() -> None:
    view = _view({s["id"]: ("completed", 1) for s in WORKFLOW["steps"]},
                 {"approvers": ["user:demo-approver"], "pending": False})  # fmt: skip
    view["status"] = "completed"

    def row(model: str, usd: str, tokens: int) -> dict[str, Any]:
        return {"key": model, "steps": 1, "priced_steps": 1, "input_tokens": tokens,
                "output_tokens": 100, "total_cost_usd": usd}  # fmt: skip

    costs = {f"e1:{s['id']}:1": [row(CALLS[s["id"]].model, "0.01", 1000)]
             for s in WORKFLOW["steps"]}  # fmt: skip
    log = [
        EventEnvelope(
            event_type="execution.step_approved", schema_version=1, tenant_id="demo",
            stream_id="demo/execution/e1", stream_version=11, position=146, correlation_id="c",
            actor="user:demo-approver",
            payload={"step_id": "publish", "approver": "user:demo-approver", "role": "approver",
                     "reason": "looks right"},
        ),
        EventEnvelope(
            event_type="budget.threshold_crossed", schema_version=1, tenant_id="demo",
            stream_id=f"demo/budget/{BUDGET_ID}", stream_version=2, position=57,
            correlation_id="c", actor="workflow-engine",
            payload={"budget_id": BUDGET_ID, "threshold_pct": 80, "cap_usd": "0.055",
                     "spent_usd": "0.007", "reserved_usd": "0.039"},
        ),
    ]  # fmt: skip
    budget = {"budget_id": BUDGET_ID, "spent_usd": "0.05", "cap_usd": "0.055",
              "reserved_usd": "0", "alerted_pct": 80}  # fmt: skip
    outcome = WorkflowOutcome("e1", view, "user:demo-approver", budget, costs, 9, log)
    text = workflow_summary(outcome, "http://gw", "mc_key")
    assert "Execution e1 of release-notes-demo v1: completed" in text
    assert "   1  gather            completed  attempt 1" in text
    assert "      summarise-issues  completed  attempt 1" in text  # beside summarise-code
    assert "after summarise-code, summarise-issues" in text
    assert "after review  approved by user:demo-approver" in text
    # Two steps of the writer and two of claude-sonnet-4; five steps in all.
    assert "  writer                 2    2,200     0.020000" in text
    assert "  claude-sonnet-4        2    2,200     0.020000" in text
    assert "  total                                 0.050000" in text
    assert ("#146 demo/execution/e1 v11 execution.step_approved: publish approved by "
            "user:demo-approver (approver): 'looks right'") in text  # fmt: skip
    assert f"budget.threshold_crossed: {BUDGET_ID} crossed 80 % of $0.055" in text
    assert "curl -H 'Authorization: Bearer mc_key' http://gw/v1/executions/e1" in text
