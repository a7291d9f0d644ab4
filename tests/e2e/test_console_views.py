"""The console's workflow and incident views in Chromium, against the whole system: an
execution watched live while policy stops it, its replay scrubbed to the stop, its incident
acknowledged and resolved, a step approved in the approval queue, another rejected there with a
reason, a third shown overdue and then escalated once its SLA runs out, and evidence downloaded.

Workflows are served by :class:`services.gateway.worker.Worker` in a thread of this process; a
step waits on an event the test sets once the page shows it running, so the stop happens while
the view is open.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import httpx
import pytest

from services.gateway.worker import Step, Worker
from tests.e2e.browser import axe, shot, sign_in_as_person, sign_in_with_key
from tests.e2e.conftest import RunningSystem, mctl, wait_for

pytestmark = pytest.mark.e2e

PASSWORD = "a passphrase long enough"
# A gated release: the last step waits for approval.
RELEASE = """
name: release
steps:
  - id: prepare
    agent: scribe
  - id: ship
    agent: scribe
    depends_on: [prepare]
    risk_tier: irreversible
"""
# A fan-out and fan-in: policy stops ``write``, so ``publish`` is never reached.
NOTES = """
name: notes
steps:
  - id: prepare
    agent: scribe
  - id: write
    agent: scribe
    depends_on: [prepare]
  - id: index
    agent: scribe
    depends_on: [prepare]
  - id: publish
    agent: scribe
    depends_on: [write, index]
"""


def _uid() -> str:
    return uuid.uuid4().hex[:8]


@contextmanager
def _serving(
    system: RunningSystem, key: str, watched: threading.Event, gate: threading.Event
) -> Iterator[Worker]:
    """A worker for the agent ``scribe``: each step makes one small call. The step ``write``
    reports its call's usage so far once ``watched`` is set, then records the call, waits for
    ``gate`` and asks for a call that takes the run past 10,000 tokens."""
    worker = Worker(system.gateway_url, key, poll_s=1)

    @worker.agent("scribe")
    async def scribe(step: Step) -> Any:
        await step.admit(model="gpt-4o-mini", input_tokens=300, max_output_tokens=100)
        if step.step_id == "write":
            await asyncio.to_thread(watched.wait, 120)
            await step.report_usage(
                model="gpt-4o-mini", input_tokens=300, output_tokens=40, force=True
            )
        await step.record(model="gpt-4o-mini", input_tokens=300, output_tokens=90, output="ok")
        if step.step_id == "write":
            await asyncio.to_thread(gate.wait, 120)
            await step.admit(model="gpt-4o", input_tokens=6000, max_output_tokens=5000)
        return "ok"

    thread = threading.Thread(target=lambda: asyncio.run(worker.run()), daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        watched.set()
        gate.set()
        worker.stop()
        thread.join(30)


def _setup(system: RunningSystem, tenant: str, document: str) -> httpx.Client:
    key = system.key_for(tenant)
    http = httpx.Client(
        base_url=system.gateway_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
    )
    assert http.post("/v1/agents", json={"agent_id": "scribe"}).status_code == 201
    saved = http.post(
        "/v1/workflows",
        content=document,
        headers={"Content-Type": "application/yaml"},
    )
    assert saved.status_code == 201, saved.text
    return http


async def _show(page: Any, hash_: str) -> None:
    """Route the open console to ``hash_`` (a hash change: the page is not reloaded)."""
    await page.evaluate("h => { location.hash = h; }", hash_)


async def test_an_execution_stops_live_then_its_replay_and_incident(
    whole_system: RunningSystem, page: Any
) -> None:
    tenant = f"cviews{_uid()}"
    http = await asyncio.to_thread(_setup, whole_system, tenant, NOTES)
    key = http.headers["Authorization"].removeprefix("Bearer ")
    watched, gate = threading.Event(), threading.Event()
    with _serving(whole_system, key, watched, gate):
        started = await asyncio.to_thread(http.post, "/v1/workflows/notes/executions", json={})
        assert started.status_code == 201, started.text
        execution = started.json()["execution_id"]
        await sign_in_with_key(page, whole_system.gateway_url, key)
        await page.evaluate("() => { window.notReloaded = true; }")
        await _show(page, f"#/view/execution/{execution}")

        # Open before the violating call: live, the first step done, the second running.
        await page.locator("[data-connection='open']").wait_for()
        await page.locator("tr[data-step='prepare'] [data-state='completed']").wait_for()
        await page.locator("tr[data-step='write'] [data-state='running']").wait_for()
        # The call's usage so far shows as it streams.
        watched.set()
        live = page.locator("tr[data-step='write'] [data-live]")
        await live.wait_for()
        assert "live: 340 tokens" in await live.inner_text()
        await page.locator("section[data-step='write'] [data-check='allow']").wait_for()
        assert await page.locator("[data-execution-status='running']").count() == 1
        gate.set()

        # The stop and its incident appear without a reload.
        await page.locator("[data-execution-status='failed']").wait_for(timeout=60_000)
        await page.locator("tr[data-step='write'] [data-state='blocked']").wait_for()
        denied = page.locator("section[data-step='write'] [data-check='deny']")
        await denied.wait_for()
        assert "token_limit" in await denied.inner_text()
        run_id = f"{execution}:write:1"

        def opened() -> Any:
            return http.get("/v1/incidents", params={"run_id": run_id}).json()["incidents"]

        await asyncio.to_thread(wait_for, opened, 60, "the stop's incident opened", 0.5)
        incident_link = page.locator("section[data-step='write'] a[data-incident]")
        await incident_link.wait_for(timeout=60_000)
        incident = await incident_link.get_attribute("data-incident")
        chosen = "section[data-step='write'] li[data-attempt='1'][data-chosen='true']"
        await page.locator(f"{chosen} [data-state='stopped_by_policy']").wait_for()
        assert await page.evaluate("() => window.notReloaded === true")
        dag = page.locator("svg.dag")
        assert await dag.locator("path[data-edge='prepare->write'][data-executed='true']").count()
        assert await dag.locator("path[data-edge='write->publish'][data-executed='false']").count()
        assert await dag.locator("g[data-step='publish'][data-state='waiting']").count()
        assert "write: blocked" in (await dag.get_attribute("aria-label") or "")
        assert await axe(page) == []
        await shot(page, "view-execution")

    await _show(page, "#/view/executions")
    listed = page.locator(f"tr[data-execution='{execution}'] [data-state='failed']")
    await listed.wait_for()
    assert await axe(page) == []
    await shot(page, "view-executions")
    await page.get_by_label("Status").select_option("completed")
    await page.get_by_role("button", name="Filter").click()
    await page.get_by_text("No execution matches.", exact=False).wait_for()
    await page.get_by_label("Status").select_option("failed")
    await page.get_by_role("button", name="Filter").click()
    await listed.wait_for()

    # Scrub the replay of the stopped attempt to its inflection point, by keyboard.
    replay_path = f"/v1/runs/{run_id}/replay"
    whole = (await asyncio.to_thread(http.get, replay_path)).json()
    stopped = whole["state"]["stopped_at_step"]
    asked: list[dict[str, list[str]]] = []  # the query of each replay request the page makes

    def note(request: Any) -> None:
        url = urlsplit(request.url)
        if unquote(url.path) == replay_path:
            asked.append(parse_qs(url.query))

    page.on("request", note)
    await _show(page, f"#/view/replay/{run_id}")
    scrubber = page.get_by_label("Event of the run", exact=False)
    await scrubber.wait_for()
    total = int(await scrubber.get_attribute("max"))
    await page.locator(f"output[data-version='{total}']").wait_for()
    # The count comes with the first answer: besides it, one request for the stopped call's end
    # (the inflection point) and one for the point shown, none probing for the end.
    assert total == whole["events_total"]
    assert sorted(asked, key=str) == sorted(
        [{}, {"at_step": [str(stopped)]}, {"at_version": [str(total)]}], key=str
    )
    await scrubber.focus()
    await page.keyboard.press("Home")
    output = page.locator("output[for='replay-scrubber']")
    await page.locator("output[data-version='1']").wait_for()
    for _ in range(total):
        if await output.get_attribute("data-inflection") == "true":
            break
        await page.keyboard.press("ArrowRight")
        await page.wait_for_function(
            "v => document.querySelector('output').dataset.version === String(v)",
            arg=int(await scrubber.input_value()),
        )
    assert await output.get_attribute("data-inflection") == "true"
    assert await output.get_attribute("data-status") == "stopped_by_policy"
    await page.keyboard.press("ArrowLeft")
    await page.locator("output[data-inflection='false'][data-status='running']").wait_for()
    # Go to the end of the first call: the scrubber lands on the run stream's event there.
    first = (await asyncio.to_thread(http.get, replay_path, params={"at_step": 1})).json()
    await page.get_by_label("Go to the end of call", exact=False).fill("1")
    await page.get_by_role("button", name="Go", exact=True).click()
    landed = page.locator("output[data-end-of-call='1']")
    await landed.wait_for()
    assert await landed.get_attribute("data-step") == "1"
    assert await landed.get_attribute("data-version") == str(first["at_version"])
    assert await landed.get_attribute("data-status") == "running"
    assert await scrubber.input_value() == str(first["at_version"])
    assert "After call 1" in await output.inner_text()
    # Moving the scrubber again shows events, not the call.
    await scrubber.focus()
    await page.keyboard.press("End")
    await page.locator(f"output[data-end-of-call=''][data-version='{total}']").wait_for()
    assert await axe(page) == []
    await shot(page, "view-replay")

    # The incident: acknowledge, resolve with a note, download its debrief.
    await page.locator(f"a[data-incident='{incident}']").first.click()
    await page.locator(f".incident[data-incident='{incident}']").wait_for()
    await page.get_by_role("button", name="Acknowledge").click()
    await page.locator("[data-status='acknowledged']").wait_for()
    await page.get_by_label("Resolution").fill("raised the agent's token limit review")
    await page.get_by_role("button", name="Resolve").click()
    await page.locator("[data-status='resolved']").wait_for()
    resolved = (await asyncio.to_thread(http.get, f"/v1/incidents/{incident}")).json()
    assert resolved["status"] == "resolved"
    assert resolved["resolution"] == "raised the agent's token limit review"
    assert resolved["acknowledged_at"] is not None
    async with page.expect_download() as info:
        await page.get_by_role("button", name="Debrief (Markdown)").click()
    debrief = await info.value
    assert debrief.suggested_filename == f"debrief-{incident}.md"
    text = Path(await debrief.path()).read_text(encoding="utf-8")
    assert text.startswith("# Executive debrief") and run_id in text
    assert await axe(page) == []
    await shot(page, "view-incident")
    assert page.offsite == []


def _person(system: RunningSystem, tenant: str, name: str, role: str) -> None:
    db = ("--database-url", system.admin_url)
    made = subprocess.run(
        [sys.executable, "-m", "libs.runtime.cli", "user", "create", name,
         "--password-stdin", *db],
        capture_output=True, text=True, timeout=120, input=f"{PASSWORD}\n",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    mctl("user", "grant", name, tenant, role, *db)


@asynccontextmanager
async def _gated_release(
    system: RunningSystem, name: str
) -> AsyncIterator[tuple[httpx.Client, str, str]]:
    """A fresh tenant with the workflow ``release`` saved, an admin named after ``name`` and a
    worker serving the steps: the tenant's client (with its key), the tenant and the admin."""
    uid = _uid()
    tenant, admin = f"c{name}{uid}", f"{name}-{uid}"
    http = await asyncio.to_thread(_setup, system, tenant, RELEASE)
    key = http.headers["Authorization"].removeprefix("Bearer ")
    await asyncio.to_thread(_person, system, tenant, admin, "admin")
    with _serving(system, key, threading.Event(), threading.Event()):
        yield http, tenant, admin


async def test_a_step_is_approved_in_the_queue_and_evidence_downloaded(
    whole_system: RunningSystem, page: Any
) -> None:
    async with _gated_release(whole_system, "appr") as (http, tenant, admin):
        execution, other = [
            (
                await asyncio.to_thread(http.post, "/v1/workflows/release/executions", json={})
            ).json()["execution_id"]
            for _ in range(2)
        ]

        def waiting() -> bool:
            queue = {a["execution_id"] for a in http.get("/v1/approvals").json()["approvals"]}
            return {execution, other} <= queue

        await asyncio.to_thread(wait_for, waiting, 60, "ship waiting for approval", 0.5)

        await sign_in_as_person(page, whole_system.gateway_url, admin, PASSWORD, tenant)
        await _show(page, f"#/view/approvals?execution_id={execution}")
        row = page.locator(f"tr[data-approval='{execution}/ship']")
        await row.wait_for()
        assert "0 of 1" in await row.inner_text()
        assert await row.locator("[data-sla-left]").inner_text() != ""
        assert await axe(page) == []
        await shot(page, "view-approvals")

        # A reason is required: without one nothing is sent.
        await page.get_by_role("button", name="Approve ship").click()
        assert await page.get_by_label("Reason for ship").get_attribute("aria-invalid") == "true"
        assert waiting()
        await page.get_by_label("Reason for ship").fill("release notes checked")
        await page.get_by_role("button", name="Approve ship").click()
        await page.get_by_text("No step of this execution waits for approval.").wait_for()

        def completed() -> bool:
            return bool(http.get(f"/v1/executions/{execution}").json()["status"] == "completed")

        await asyncio.to_thread(wait_for, completed, 60, "the approved execution completed", 0.5)

        # The other execution is aborted from its flow view, with a reason.
        await _show(page, f"#/view/execution/{other}")
        await page.locator("tr[data-step='ship'] [data-state='waiting']").wait_for()
        await page.get_by_label("Reason to abort").fill("superseded by the approved release")
        await page.get_by_role("button", name="Abort execution").click()
        await page.locator("[data-execution-status='aborted']").wait_for()
        assert await page.get_by_role("button", name="Abort execution").is_hidden()
        aborted = (await asyncio.to_thread(http.get, f"/v1/executions/{other}")).json()
        assert aborted["status"] == "aborted"
        assert "superseded by the approved release" in aborted["reason"]
    shown = (await asyncio.to_thread(http.get, f"/v1/executions/{execution}")).json()
    ship = next(s for s in shown["steps"] if s["step_id"] == "ship")
    assert ship["approval"]["approvers"] == [f"user:{admin}"]

    await _show(page, "#/view/evidence")
    async with page.expect_download() as info:
        await page.get_by_role("button", name="SOC 2 evidence (JSON)").click()
    soc2 = await info.value
    assert soc2.suggested_filename.startswith("soc2-evidence-")
    document = json.loads(Path(await soc2.path()).read_text(encoding="utf-8"))
    assert document["evidence"] and document["signature"]["tenant_id"] == tenant
    async with page.expect_download() as info:
        await page.get_by_role("button", name="Debriefs (Markdown)").click()
    assert (await info.value).suggested_filename.endswith(".md")
    await page.get_by_role("button", name="Generate attestation").click()
    attestation = page.locator("tr[data-attestation]")
    await attestation.wait_for(timeout=60_000)
    async with page.expect_download() as info:
        await attestation.get_by_role("button", name="JSON of soc2").click()
    signed = json.loads(Path(await (await info.value).path()).read_text(encoding="utf-8"))
    assert signed["signature"]["tenant_id"] == tenant
    assert await axe(page) == []
    await shot(page, "view-evidence")
    assert page.offsite == []


def _waiting_release(http: httpx.Client) -> str:
    """Start an execution of ``release``; its id once ``ship`` waits in the approval queue."""
    started = http.post("/v1/workflows/release/executions", json={})
    assert started.status_code == 201, started.text
    execution = str(started.json()["execution_id"])

    def queued() -> bool:
        return execution in {
            a["execution_id"] for a in http.get("/v1/approvals").json()["approvals"]
        }

    wait_for(queued, 60, "ship waiting for approval", 0.5)
    return execution


def _ship(http: httpx.Client, execution: str) -> dict[str, Any]:
    """The execution as the API shows it, and its step ``ship``."""
    shown = http.get(f"/v1/executions/{execution}").json()
    return {**shown, "ship": next(s for s in shown["steps"] if s["step_id"] == "ship")}


async def test_a_step_is_rejected_in_the_queue_with_its_reason(
    whole_system: RunningSystem, page: Any
) -> None:
    reason = "the release window closed"
    async with _gated_release(whole_system, "rej") as (http, tenant, admin):
        execution = await asyncio.to_thread(_waiting_release, http)
        await sign_in_as_person(page, whole_system.gateway_url, admin, PASSWORD, tenant)
        await _show(page, f"#/view/approvals?execution_id={execution}")
        await page.locator(f"tr[data-approval='{execution}/ship']").wait_for()
        await page.get_by_label("Reason for ship").fill(reason)
        assert await axe(page) == []
        await page.get_by_role("button", name="Reject ship").click()
        await page.get_by_text("No step of this execution waits for approval.").wait_for()
        await page.locator("#toast").filter(has_text=f"ship of {execution}: rejected.").wait_for()
        assert await axe(page) == []
        await shot(page, "view-approvals-rejected")

        # The rejection, with its reason and who gave it, is the execution's end.
        shown = await asyncio.to_thread(_ship, http, execution)
        assert shown["status"] == "failed"
        assert shown["reason"] == f"step 'ship' was rejected by user:{admin}: {reason}"
        assert shown["ship"]["state"] == "blocked" and shown["ship"]["reason"] == reason
        assert shown["ship"]["attempt"] == 0 and shown["ship"]["approval"]["pending"] is False

        await _show(page, f"#/view/execution/{execution}")
        await page.locator("[data-execution-status='failed']").wait_for()
        step = page.locator("tr[data-step='ship']")
        await step.locator("[data-state='blocked']").wait_for()
        assert reason in await step.inner_text()
        assert await page.locator("[data-reason]").inner_text() == shown["reason"]
        assert await page.locator("tr[data-step='prepare'] [data-state='completed']").count()
        assert await page.get_by_role("button", name="Abort execution").is_hidden()
        assert await axe(page) == []
        await shot(page, "view-execution-rejected")
    assert page.offsite == []


# Short enough for a test to wait out; long enough that the page is open before it runs out
# and that the escalated request is still waiting when the page is refreshed.
SLA_S = 8


async def test_an_approval_past_its_sla_shows_overdue_then_escalated(
    whole_system: RunningSystem, page: Any
) -> None:
    async with _gated_release(whole_system, "esc") as (http, tenant, admin):
        # The SLA is the tenant's approval rule of the tier (the workflow has none): an admin
        # sets it before the execution starts, which copies it.
        signed = await asyncio.to_thread(
            http.post, "/v1/auth/token", json={"username": admin, "password": PASSWORD}
        )
        token = signed.json()["access_token"]
        rule = {"required": 1, "role": "approver", "sla_s": SLA_S, "on_expiry": "escalate"}
        set_rules = await asyncio.to_thread(
            http.put,
            "/v1/approval-rules",
            json={"irreversible": rule},
            headers={"Authorization": f"Bearer {token}", "X-Tenant-Id": tenant},
        )
        assert set_rules.status_code == 200, set_rules.text
        await sign_in_as_person(page, whole_system.gateway_url, admin, PASSWORD, tenant)
        execution = await asyncio.to_thread(_waiting_release, http)
        await _show(page, f"#/view/approvals?execution_id={execution}")
        row = page.locator(f"tr[data-approval='{execution}/ship']")
        await row.wait_for()
        left = row.locator("[data-sla-left] span")
        assert not (await left.inner_text()).startswith("overdue")
        await row.get_by_role("cell", name="no", exact=True).wait_for()
        assert "role approver" in await row.inner_text()

        # The countdown runs out on the page: overdue, in the colour of a denial.
        await row.locator("[data-sla-left] span.deny").wait_for(timeout=(SLA_S + 20) * 1000)
        assert (await left.inner_text()).startswith("overdue by ")
        assert await axe(page) == []
        await shot(page, "view-approvals-overdue")

        # The engine's sweep escalates it to an admin, with a fresh SLA; the refreshed queue
        # shows it escalated.
        def escalated() -> bool:
            return bool(_ship(http, execution)["ship"]["approval"]["escalated"])

        await asyncio.to_thread(wait_for, escalated, 30, "the approval escalated", 0.2)
        await page.get_by_role("button", name="Refresh the queue").click()
        await row.get_by_role("cell", name="escalated", exact=True).wait_for()
        assert "role admin" in await row.inner_text()
        assert not (await left.inner_text()).startswith("overdue")
        assert await axe(page) == []
        await shot(page, "view-approvals-escalated")

        # An admin decides the escalated step.
        await page.get_by_label("Reason for ship").fill("approved on escalation")
        await page.get_by_role("button", name="Approve ship").click()
        await page.get_by_text("No step of this execution waits for approval.").wait_for()

        def completed() -> dict[str, Any] | None:
            shown = _ship(http, execution)
            return shown if shown["status"] == "completed" else None

        shown = await asyncio.to_thread(wait_for, completed, 60, "the execution completed", 0.5)
        assert shown["ship"]["approval"]["approvers"] == [f"user:{admin}"]
        assert shown["ship"]["approval"]["escalated"] is True
    assert page.offsite == []
