"""``mctl workflow`` and ``mctl approval`` against the whole system: save a workflow, run it to its
end with ``--wait``, and approve an irreversible step as a person from the command line."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from services.gateway.worker import Step, Worker
from tests.e2e.conftest import RunningSystem, mctl, wait_for

pytestmark = pytest.mark.e2e

PASSWORD = "a passphrase long enough"
WORKFLOW = """
name: {name}
steps:
  - id: draft
    agent: scribe
  - id: check
    agent: scribe
    depends_on: [draft]
  - id: ship
    agent: scribe
    depends_on: [check]
    risk_tier: {tier}
"""


def _cli(
    system: RunningSystem, *args: str, env: dict[str, str] | None = None, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "libs.runtime.cli", *args, "--data-dir", str(system.data_dir)],
        capture_output=True,
        text=True,
        timeout=180,
        input=stdin,
        env=env,
    )


def _worker(system: RunningSystem, key: str) -> tuple[Worker, threading.Thread]:
    worker = Worker(system.gateway_url, key, poll_s=2)

    @worker.agent("scribe")
    async def scribe(step: Step) -> Any:
        await step.admit(model="gpt-4o-mini", input_tokens=30, max_output_tokens=10)
        await step.record(model="gpt-4o-mini", input_tokens=30, output_tokens=9, output="done")
        return "done"

    thread = threading.Thread(target=lambda: asyncio.run(worker.run()), daemon=True)
    thread.start()
    return worker, thread


def test_a_workflow_is_saved_run_and_approved_from_the_command_line(
    whole_system: RunningSystem, tmp_path: Path
) -> None:
    uid = uuid.uuid4().hex[:8]
    tenant, admin, approver = f"cli{uid}", f"ada-{uid}", f"bo-{uid}"
    key = whole_system.key_for(tenant)
    env = {**os.environ, "MC_API_KEY": key}
    db = ("--database-url", whole_system.admin_url)
    for person, role in ((admin, "admin"), (approver, "approver")):
        made = subprocess.run(
            [sys.executable, "-m", "libs.runtime.cli", "user", "create", person,
             "--password-stdin", *db],
            capture_output=True, text=True, timeout=120, input=f"{PASSWORD}\n",
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        mctl("user", "grant", person, tenant, role, *db)

    http = httpx.Client(
        base_url=whole_system.gateway_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
    )
    assert http.post("/v1/agents", json={"agent_id": "scribe"}).status_code == 201
    token = http.post("/v1/auth/token", json={"username": admin, "password": PASSWORD})
    rules = {"irreversible": {"required": 1, "role": "approver", "sla_s": 600}}
    set_rules = http.put(
        "/v1/approval-rules",
        json=rules,
        headers={"Authorization": f"Bearer {token.json()['access_token']}"},
    )
    assert set_rules.status_code == 200, set_rules.text

    plain, gated = tmp_path / "plain.yaml", tmp_path / "gated.yaml"
    plain.write_text(WORKFLOW.format(name="notes", tier="write"))
    gated.write_text(WORKFLOW.format(name="release", tier="irreversible"))
    for doc, name in ((plain, "notes"), (gated, "release")):
        saved = _cli(whole_system, "workflow", "save", str(doc), env=env)
        assert saved.returncode == 0, saved.stderr
        assert f"workflow {name} saved as version 1" in saved.stdout
    again = _cli(whole_system, "workflow", "save", str(plain), env=env)
    assert "unchanged at version 1" in again.stdout

    worker, thread = _worker(whole_system, key)
    try:
        ran = _cli(
            whole_system, "workflow", "run", "notes", "--input", "n=3", "--wait", "--timeout",
            "120", env=env,
        )  # fmt: skip
        assert ran.returncode == 0, ran.stdout + ran.stderr
        # Progress as it went, then the final state of every step.
        for line in ("draft: completed", "check: completed", "ship: completed"):
            assert line in ran.stdout, ran.stdout
        assert ": completed" in ran.stdout.splitlines()[-4]

        started = _cli(whole_system, "workflow", "run", "release", env=env)
        assert started.returncode == 0, started.stderr
        execution_id = started.stdout.split()[1]

        def waiting() -> str | None:
            listed = _cli(whole_system, "approval", "list", env=env)
            return listed.stdout if f"{execution_id} ship" in listed.stdout else None

        listing = wait_for(waiting, 60, "ship waiting for approval", interval=0.5)
        assert "0/1 approver" in listing and "SLA left" in listing

        # A person is needed: an API key alone is refused, naming why.
        keyed = _cli(
            whole_system, "approval", "approve", execution_id, "ship", "--reason", "x", env=env
        )
        assert keyed.returncode == 1 and "approvals are for people" in keyed.stderr
        approved = _cli(
            whole_system, "approval", "approve", execution_id, "ship", "--reason",
            "release checked", "--user", approver, "--password-stdin", env=env,
            stdin=f"{PASSWORD}\n",
        )  # fmt: skip
        assert approved.returncode == 0, approved.stdout + approved.stderr
        assert PASSWORD not in approved.stdout + approved.stderr

        def completed() -> bool:
            shown = _cli(whole_system, "workflow", "show", execution_id, env=env)
            return f"execution {execution_id}: completed" in shown.stdout

        wait_for(completed, 60, "the approved execution completed", interval=0.5)
    finally:
        worker.stop()
        thread.join(30)

    with psycopg.connect(whole_system.admin_url) as conn:
        row = conn.execute(
            "SELECT actor, payload->>'reason' FROM eventstore.events WHERE tenant_id = %s"
            " AND event_type = 'execution.step_approved'",
            (tenant,),
        ).fetchone()
    assert row == (f"user:{approver}", "release checked")

    missing = _cli(whole_system, "workflow", "run", "no-such-workflow", env=env)
    assert missing.returncode == 1
    assert missing.stderr.startswith("error: POST /v1/workflows/no-such-workflow/executions: 404")
