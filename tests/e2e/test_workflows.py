"""Workflows through the public API with the worker SDK, and the engine killed mid-flight.

The whole system runs (``mctl up``); agents are served by :class:`services.gateway.worker.Worker`
in a thread of this process. The workflow-engine is killed with SIGKILL at several moments while
executions are in flight; the supervisor restarts it and every execution still completes, with
every attempt dispatched once and taken once.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import threading
import time
import uuid
from collections import Counter
from typing import Any

import httpx
import psycopg

from services.gateway.worker import Step, Worker
from tests.e2e.conftest import RunningSystem, wait_for

WORKFLOW_YAML = """
name: release-notes
description: gather, summarise in parallel, review, publish
steps:
  - id: gather
    agent: fetcher
    timeout_s: 20
    retries: 2
  - id: summarise-code
    agent: writer
    depends_on: [gather]
    retries: 3
    retry_backoff_s: 0
    timeout_s: 20
  - id: summarise-issues
    agent: writer
    depends_on: [gather]
    retries: 2
    timeout_s: 20
  - id: review
    agent: writer
    depends_on: [summarise-code, summarise-issues]
    risk_tier: write
    retries: 2
    timeout_s: 20
  - id: publish
    agent: fetcher
    depends_on: [review]
    retries: 2
    timeout_s: 20
"""


def _worker_thread(worker: Worker) -> threading.Thread:
    thread = threading.Thread(target=lambda: asyncio.run(worker.run()), daemon=True)
    thread.start()
    return thread


def _engine_pid(system: RunningSystem) -> int:
    return int(system.child("workflow-engine")["pid"])


def test_workflows_run_through_the_sdk_and_survive_the_engine_being_killed(
    whole_system: RunningSystem,
) -> None:
    tenant = f"wf{uuid.uuid4().hex[:8]}"
    key = whole_system.key_for(tenant)
    http = httpx.Client(
        base_url=whole_system.gateway_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
    )
    for agent in ("fetcher", "writer"):
        assert http.post("/v1/agents", json={"agent_id": agent}).status_code == 201
    saved = http.post(
        "/v1/workflows", content=WORKFLOW_YAML, headers={"Content-Type": "application/yaml"}
    )
    assert saved.status_code == 201, saved.text
    # gather now waits for review, which waits (through the summaries) for gather.
    cyclic = WORKFLOW_YAML.replace("timeout_s: 20", "timeout_s: 20\n    depends_on: [review]", 1)
    refused = http.post(
        "/v1/workflows", content=cyclic, headers={"Content-Type": "application/yaml"}
    )
    assert refused.status_code == 422 and "cycle" in refused.json()["error"]["message"]

    worker = Worker(whole_system.gateway_url, key, poll_s=2)
    flaky_once: set[str] = set()

    async def serve(step: Step) -> Any:
        await step.admit(model="gpt-4o-mini", input_tokens=50, max_output_tokens=20)
        # Work that takes a while, so the engine is killed with attempts in flight.
        await asyncio.sleep(random.uniform(0.05, 0.3))  # simulated model latency, not a wait
        if step.step_id == "summarise-code" and step.execution_id not in flaky_once:
            flaky_once.add(step.execution_id)
            raise RuntimeError("the model timed out")  # the step's one retry takes it
        await step.record(model="gpt-4o-mini", input_tokens=48, output_tokens=17, output="ok")
        return "ok"

    worker.agent("fetcher")(serve)
    worker.agent("writer")(serve)
    thread = _worker_thread(worker)
    try:
        executions = [
            http.post("/v1/workflows/release-notes/executions", json={"inputs": {"n": i}}).json()[
                "execution_id"
            ]
            for i in range(6)
        ]
        for _ in range(3):
            time.sleep(random.uniform(0.3, 1.2))  # a random moment to kill at, not a wait
            pid = _engine_pid(whole_system)
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda pid=pid: _engine_pid(whole_system) != pid, 60, "engine restarted")

        last: list[Any] = []

        def all_done() -> bool:
            states = [http.get(f"/v1/executions/{e}").json() for e in executions]
            # What a failure shows: each execution's status and its steps' states.
            last[:] = [
                (s.get("status"), [st["state"] for st in s.get("steps", [])]) for s in states
            ]
            return all(s.get("status") == "completed" for s in states)

        try:
            wait_for(all_done, 240, "every execution completed", interval=0.5)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; executions: {last}; taken: {worker.taken}") from None
    finally:
        worker.stop()
        thread.join(30)

    with psycopg.connect(whole_system.admin_url) as conn:
        rows = conn.execute(
            "SELECT event_type, payload->>'execution_id', payload->>'step_id',"
            " payload->>'run_id' FROM eventstore.events WHERE tenant_id = %s"
            " AND event_type IN ('execution.step_dispatched', 'execution.step_completed')",
            (tenant,),
        ).fetchall()
    dispatched = Counter(r[3] for r in rows if r[0] == "execution.step_dispatched")
    assert max(dispatched.values()) == 1, "an attempt was dispatched twice"
    assert max(Counter(worker.taken).values()) == 1, "a worker took an attempt twice"
    completed = Counter((r[1], r[2]) for r in rows if r[0] == "execution.step_completed")
    assert len(completed) == 6 * 5 and set(completed.values()) == {1}
    # Every execution's summarise-code failed once and was retried.
    assert len(dispatched) >= 6 * 6
    detail = http.get(f"/v1/executions/{executions[0]}").json()
    assert [s["state"] for s in detail["steps"]] == ["completed"] * 5
    assert detail["steps"][1]["attempt"] >= 2
    listed = http.get("/v1/executions", params={"status": "completed"}).json()["executions"]
    assert {e["execution_id"] for e in listed} >= set(executions)
    # Through the gateway: the critical path starts at the first step and ends at the last, and
    # the listing pages with its cursor.
    assert detail["critical_path"][0] == detail["steps"][0]["step_id"]
    assert detail["critical_path"][-1] == detail["steps"][-1]["step_id"]
    assert detail["critical_path_ms"] > 0
    first = http.get("/v1/executions", params={"limit": 4}).json()
    rest = http.get("/v1/executions", params={"cursor": first["next_cursor"]}).json()
    paged = [e["execution_id"] for e in first["executions"] + rest["executions"]]
    assert set(paged) == set(executions) and len(paged) == len(executions)
    assert rest["next_cursor"] is None
    bad = http.get("/v1/executions", params={"started_after": "2026-01-01T00:00:00"})
    assert bad.status_code == 422
