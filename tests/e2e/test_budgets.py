"""Budgets through the public API: set and listed, bad ones refused naming the problem, an
execution over its cap halted before its first step, reservations at dispatch, a 100 % alert
opening an incident, and holds settled to the costs the worker SDK recorded."""

from __future__ import annotations

import asyncio
import threading
import uuid
from decimal import Decimal
from typing import Any

import httpx
import psycopg

from services.gateway.worker import Step, Worker
from services.incident.domain import incident_id_for
from tests.e2e.conftest import RunningSystem, wait_for

FAN = {
    "name": "fan",
    "steps": [
        {"id": "x", "agent": "writer", "estimate": {"cost_usd": "0.01"}, "timeout_s": 30},
        {"id": "y", "agent": "writer", "estimate": {"cost_usd": "0.01"}, "timeout_s": 30},
    ],
}


def test_budgets_through_the_api(whole_system: RunningSystem) -> None:
    tenant = f"bg{uuid.uuid4().hex[:8]}"
    key = whole_system.key_for(tenant)
    http = httpx.Client(
        base_url=whole_system.gateway_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
    )
    assert http.post("/v1/agents", json={"agent_id": "writer"}).status_code == 201
    assert http.post("/v1/workflows", json=FAN).status_code == 201

    # Bad budgets are refused naming the problem.
    for body, message in [
        ({"scope": "execution", "subject": "e1", "window": "day", "cap_usd": "1"},
         "an execution budget's window is the execution"),
        ({"scope": "agent", "window": "day", "cap_usd": "1"}, "needs a subject"),
        ({"scope": "tenant", "window": "week", "cap_usd": "1"}, "window"),
        ({"scope": "tenant", "window": "day", "cap_usd": "-1"}, "cap_usd"),
    ]:  # fmt: skip
        got = http.put("/v1/budgets", json=body)
        assert got.status_code == 422 and message in got.text, (body, got.text)
    bad_tz = http.put("/v1/budgets/timezone", json={"timezone": "Mars/Olympus"})
    assert bad_tz.status_code == 422 and "unknown time zone 'Mars/Olympus'" in bad_tz.text

    assert http.put("/v1/budgets/timezone", json={"timezone": "Europe/Paris"}).status_code == 200
    set_ = http.put("/v1/budgets", json={"scope": "tenant", "window": "day", "cap_usd": "0.02"})
    assert set_.json() == {"budget_id": "tenant:day", "changed": True}

    # An execution's own budget below its estimate: halted before its first step.
    halted = http.post("/v1/workflows/fan/executions", json={"budget_usd": "0.015"})
    assert halted.status_code == 201 and halted.json()["status"] == "failed"
    assert "estimate $0.02 exceeds the cap $0.015" in halted.json()["reason"]

    worker = Worker(whole_system.gateway_url, key, poll_s=2)

    @worker.agent("writer")
    async def write(step: Step) -> Any:
        await step.admit(model="gpt-4o-mini", input_tokens=1000, max_output_tokens=500)
        await step.record(model="gpt-4o-mini", input_tokens=1000, output_tokens=500, output="ok")
        return "ok"

    thread = threading.Thread(target=lambda: asyncio.run(worker.run()), daemon=True)
    thread.start()
    try:
        # Both steps reserve $0.01 of the $0.02 day: 100 % is committed, so an incident opens.
        started = http.post("/v1/workflows/fan/executions", json={}).json()
        eid = started["execution_id"]

        def budget() -> dict[str, Any]:
            listed = http.get("/v1/budgets").json()
            assert listed["timezone"] == "Europe/Paris"
            return next(b for b in listed["budgets"] if b["budget_id"] == "tenant:day")

        def settled() -> bool:
            ex, day = http.get(f"/v1/executions/{eid}").json(), budget()
            done = ex["status"] == "completed" and day["reserved_usd"] == "0" != day["spent_usd"]
            assert done, (ex, day)  # what the failure message shows
            return True

        wait_for(settled, 120, "execution completed and its holds settled", interval=0.5)
    finally:
        worker.stop()
        thread.join(30)

    day = budget()
    # gpt-4o-mini: 1,000 input tokens at $0.15/M and 500 output at $0.60/M, per step.
    assert Decimal(day["spent_usd"]) == 2 * Decimal("0.00045")
    assert Decimal(day["remaining_usd"]) == Decimal("0.02") - 2 * Decimal("0.00045")
    assert day["alerted_pct"] == 100
    incident_id = incident_id_for(f"budget:tenant:day:{day['window_key']}")

    def incident_open() -> bool:
        got = http.get(f"/v1/incidents/{incident_id}")
        return got.status_code == 200 and got.json()["status"] == "open"

    wait_for(incident_open, 60, "the budget's incident opened", interval=0.5)
    with psycopg.connect(whole_system.admin_url) as conn:
        alerts = conn.execute(
            "SELECT (payload->>'threshold_pct')::int FROM eventstore.events"
            " WHERE tenant_id = %s AND event_type = 'budget.threshold_crossed' ORDER BY 1",
            (tenant,),
        ).fetchall()
    assert [a[0] for a in alerts] == [80, 90, 100]
