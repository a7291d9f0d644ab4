"""The demo against the whole system: its workflow completes, each step once, with the approval
of a person holding the approver role in the log, a budget alert, and live token counts printed.

What is asserted is read back from the API and the event store, not from what the demo says.
"""

from __future__ import annotations

from collections import Counter

import httpx
import psycopg

from services.gateway.demo import DEMO_TENANT
from services.gateway.demo_workflow import APPROVAL_REASON, BUDGET_ID
from services.gateway.example_worker import WORKFLOW
from tests.e2e.conftest import DemoRun, RunningSystem

STEPS = [s["id"] for s in WORKFLOW["steps"]]


def test_the_demo_runs_its_workflow_with_an_approval_and_a_budget_alert(
    whole_system: RunningSystem, demo_run: DemoRun
) -> None:
    outcome, text = demo_run.outcome, demo_run.text
    eid = outcome.execution_id

    # The execution, as the API shows it: completed, every step completed at its first attempt.
    key = whole_system.key_for(DEMO_TENANT)
    http = httpx.Client(
        base_url=whole_system.gateway_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
    )
    view = http.get(f"/v1/executions/{eid}").json()
    assert view["status"] == "completed", view
    assert [(s["step_id"], s["state"], s["attempt"]) for s in view["steps"]] == [
        (step, "completed", 1) for step in STEPS
    ]
    budget = next(
        b
        for b in http.get("/v1/budgets", params={"execution_id": eid}).json()["budgets"]
        if b["budget_id"] == BUDGET_ID
    )
    assert budget["alerted_pct"] >= 80 and budget["reserved_usd"] == "0"

    with psycopg.connect(whole_system.admin_url) as conn:
        events = conn.execute(
            "SELECT event_type, actor, payload FROM eventstore.events"
            " WHERE tenant_id = %s AND stream_id = %s ORDER BY stream_version",
            (DEMO_TENANT, f"{DEMO_TENANT}/execution/{eid}"),
        ).fetchall()
        alerts = conn.execute(
            "SELECT (payload->>'threshold_pct')::int FROM eventstore.events"
            " WHERE tenant_id = %s AND stream_id = %s AND event_type = 'budget.threshold_crossed'"
            " AND payload->>'window_key' = %s ORDER BY 1",
            (DEMO_TENANT, f"{DEMO_TENANT}/budget/{BUDGET_ID}", eid),
        ).fetchall()
        approver_id = outcome.approver.removeprefix("user:")
        roles = conn.execute(
            "SELECT role FROM gateway.role_grants"
            " WHERE user_id = %s AND tenant_id = %s AND revoked_at IS NULL",
            (approver_id, DEMO_TENANT),
        ).fetchall()

    # The approval of the irreversible step names the person, their role and their reason.
    [approval] = [p for t, _, p in events if t == "execution.step_approved"]
    [actor] = [a for t, a, _ in events if t == "execution.step_approved"]
    assert approval["step_id"] == "publish"
    assert approval["approver"] == actor == f"user:{approver_id}"
    assert approver_id.startswith("demo-approver")
    assert approval["role"] == "approver" and [r[0] for r in roles] == ["approver"]
    assert approval["reason"] == APPROVAL_REASON
    # It waited for that approval before it was dispatched.
    kinds = [(t, p.get("step_id")) for t, _, p in events]
    assert (
        kinds.index(("execution.approval_requested", "publish"))
        < kinds.index(("execution.step_approved", "publish"))
        < kinds.index(("execution.step_dispatched", "publish"))
    )

    # Each step was dispatched once and completed once.
    dispatched = Counter(p["step_id"] for t, _, p in events if t == "execution.step_dispatched")
    completed = Counter(p["step_id"] for t, _, p in events if t == "execution.step_completed")
    assert dispatched == completed == Counter(STEPS)

    # The budget alerted at 80 % and the execution was never stopped by it.
    assert [a[0] for a in alerts][:1] == [80] and 100 not in [a[0] for a in alerts]

    # What the demo printed: progress, the wait, the approval, the alert, live tokens, the DAG.
    for expected in (
        "gather            dispatched to researcher",
        "summarise-code    tokens so far",
        "publish           waits for approval",
        f"publish           approved by user:{approver_id}",
        f"budget alert: {BUDGET_ID} reached 80 %",
        f"execution {eid} completed",
        f"execution.step_approved: publish approved by user:{approver_id} (approver)",
        "cost by model",
        "claude-sonnet-4",
    ):
        assert expected in text, expected
    assert outcome.live_updates >= len(STEPS)
