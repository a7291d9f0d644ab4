"""The console's 26 panels in Chromium, over the demo's data: every panel at every O-level it has
renders without an error and without a serious or critical accessibility violation; the links
between a run, its incident and its policy lead to pages showing that entity; the tables and the
navigation work from the keyboard; a person signs in with the login form; an admin issues and
revokes an API key, which a viewer may not.

One page and one sign-in serve the tour of the panels (a loop), so the file stays quick."""

from __future__ import annotations

import asyncio
import re
import secrets
from contextlib import AsyncExitStack
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from services.gateway.demo import DEMO_TENANT
from services.gateway.keys import run_with_pool
from services.gateway.users import create_user, grant_role
from tests.e2e.browser import axe, shot, sign_in_as_person, sign_in_with_key
from tests.e2e.conftest import DemoRun, RunningSystem, wait_for

pytestmark = pytest.mark.e2e

# What a page shows when it shows an entity: its heading carries data-entity and data-id.
SHOWS = {
    "run": "[data-entity='run'][data-id='{id}']",
    "incident": "[data-entity='incident'][data-id='{id}']",
    "policy": "[data-entity='policy'][data-id='{id}']",
}
# The entity a panel's detail levels (O3 to O5) show, named by the route's query.
ENTITY_OF = {
    "ACT-LLM-LIVE": "run",
    "ACT-LLM-COMP": "run",
    "LOG-REC-LLM": "run",
    "ANL-INS-COST": "run",
    "INC-EV-ACT": "incident",
    "INC-EV-RES": "incident",
    "INC-EV-HIST": "incident",
    "POL-GOV-ACT": "policy",
}
# Links to views another part of the console renders: the URL conventions they follow.
VIEW_LINKS = {
    "agent": r"#/view/agent/[^/?]+$",
    "execution": r"#/view/execution/[^/?]+$",
    "workflow": r"#/panel/LOG-REC-AUD/O2\?workflow_id=.+$",
    "approvals": r"#/view/approvals\?execution_id=.+$",
}


async def settled(page: Any) -> None:
    """Wait until the panel and its tables have loaded (none is aria-busy any more)."""
    await page.locator("main .panel-body").first.wait_for()
    await page.wait_for_function("() => !document.querySelector('main [aria-busy]')")


async def demo_ids(base: str, key: str) -> dict[str, str]:
    """The demo's run stopped by policy, its incident and the policy that stopped it."""
    async with httpx.AsyncClient(base_url=base, headers={"X-API-Key": key}, timeout=30) as c:
        runs = (await c.get("/v1/runs", params={"status": "stopped_by_policy"})).json()["runs"]
        run = runs[0]
        incidents = (await c.get("/v1/incidents", params={"run_id": run["run_id"]})).json()
    return {
        "run_id": run["run_id"],
        "incident_id": incidents["incidents"][0]["incident_id"],
        "policy_id": run["violation_policy_id"],
    }


async def signed_in(whole_system: RunningSystem, page: Any) -> tuple[str, dict[str, str]]:
    """Sign in to the demo's tenant with an API key; the gateway's URL and the demo's ids."""
    base = whole_system.gateway_url
    key = await asyncio.to_thread(whole_system.key_for, DEMO_TENANT)
    ids = await demo_ids(base, key)
    await sign_in_with_key(page, base, key)
    return base, ids


async def goto(page: Any, base: str, route: str) -> None:
    await page.goto(f"{base}/{route}")
    await settled(page)


async def test_every_panel_renders_at_every_level_with_no_accessibility_violation(
    whole_system: RunningSystem, demo_run: DemoRun, page: Any
) -> None:
    base, ids = await signed_in(whole_system, page)
    panels = await page.evaluate(
        "async () => (await import('/console/panels/index.js')).PANELS"
        ".map((p) => [p.id, Object.keys(p.levels).sort()])"
    )
    assert len(panels) == 26
    query = "&".join(f"{k}={quote(v)}" for k, v in ids.items())
    problems: dict[str, Any] = {}
    for panel, levels in panels:
        for level in levels:
            detail = level in ("O3", "O4", "O5")
            await goto(page, base, f"#/panel/{panel}/{level}{'?' + query if detail else ''}")
            body = page.locator(f"main .panel-body[data-panel='{panel}'][data-level='{level}']")
            assert await body.count() == 1, (panel, level)
            kind = ENTITY_OF.get(panel)
            if detail and kind:
                shown = body.locator(SHOWS[kind].format(id=ids[f"{kind}_id"]))
                assert await shown.count() >= 1, f"{panel}/{level} does not show its {kind}"
            errors = await page.locator("main .error").all_inner_texts()
            violations = await axe(page)
            if errors or violations:
                problems[f"{panel}/{level}"] = {"errors": errors, "axe": violations}
            await shot(page, f"panel-{panel}-{level}")
    assert problems == {}
    assert page.offsite == []


async def test_a_runs_details_show_where_it_stopped_and_its_trace_marks_the_inflection(
    whole_system: RunningSystem, demo_run: DemoRun, page: Any
) -> None:
    base, ids = await signed_in(whole_system, page)
    await goto(page, base, f"#/panel/ACT-LLM-COMP/O3?run_id={ids['run_id']}")
    text = await page.locator("main").inner_text()
    assert "stopped_by_policy" in text and ids["policy_id"] in text
    assert re.search(r"Stopped at step\s+3", text)
    await goto(page, base, f"#/panel/LOG-REC-LLM/O5?run_id={ids['run_id']}")
    marked = page.locator("main td [data-inflection='true']")
    assert await marked.count() == 1
    assert (await marked.inner_text()).startswith("3")
    names = await page.locator("main .actions button").all_inner_texts()
    assert {"Export JSON", "Export CSV", "Full export (NDJSON, with proof)"} <= set(names)
    async with page.expect_download() as download:
        await page.get_by_role("button", name="Full export (NDJSON, with proof)").click()
    first = (await (await download.value).path()).read_text().splitlines()[0]
    assert '"kind":"header"' in first.replace(" ", "")


async def test_charts_have_a_text_alternative_and_an_empty_state(
    whole_system: RunningSystem, demo_run: DemoRun, page: Any
) -> None:
    base, _ = await signed_in(whole_system, page)
    await goto(page, base, "#/panel/ANL-INS-COST/O1")
    figures = page.locator("main figure.chart-figure")
    assert await figures.count() == 4  # by model, by agent, by day, budget burn
    drawn = page.locator("main figure[data-chart]")
    titles = await drawn.evaluate_all("(fs) => fs.map((f) => f.dataset.chart)")
    assert {"Cost by model", "Cost by agent", "Cost by day"} <= set(titles)
    for i in range(await drawn.count()):
        figure = drawn.nth(i)
        label = await figure.locator("canvas").get_attribute("aria-label")
        assert label and "$" in label
        assert await figure.locator("table.visually-hidden tbody tr").count() >= 1
    # The demo's agents appear in the summary of the chart by agent.
    by_agent = page.locator("main figure[data-chart='Cost by agent'] canvas")
    assert "code-review-agent" in (await by_agent.get_attribute("aria-label") or "")
    # A chart with nothing to draw says so instead (a fresh tenant has no cost).
    fresh = f"console-empty-{secrets.token_hex(4)}"
    key = await asyncio.to_thread(whole_system.key_for, fresh)
    await page.locator("#logout").click()
    await sign_in_with_key(page, base, key)
    await goto(page, base, "#/panel/ANL-INS-COST/O1")
    assert await page.locator("main figure[data-chart]").count() == 0
    assert await page.locator("main figure.chart-figure .empty").count() == 4


async def test_cross_links_lead_to_the_entity_they_name(
    whole_system: RunningSystem, demo_run: DemoRun, page: Any
) -> None:
    base, ids = await signed_in(whole_system, page)
    starts = {
        "run": f"#/panel/ACT-LLM-COMP/O3?run_id={ids['run_id']}",
        "incident": f"#/panel/INC-EV-ACT/O3?incident_id={ids['incident_id']}",
        "policy": f"#/panel/POL-GOV-ACT/O3?policy_id={ids['policy_id']}",
    }
    followed: set[tuple[str, str]] = set()
    for start in starts.values():
        await goto(page, base, start)
        links = await page.locator("main a[data-link]").evaluate_all(
            "(as) => as.map((a) => [a.getAttribute('href'), a.dataset.link, a.dataset.id])"
        )
        assert links, start
        for href, kind, entity in links:
            if kind in VIEW_LINKS:
                assert re.search(VIEW_LINKS[kind], href), (kind, href)
                continue
            await goto(page, base, href)
            shown = page.locator(f"main {SHOWS[kind].format(id=entity)}")
            assert await shown.count() >= 1, f"{start} -> {href} does not show {kind} {entity}"
            followed.add((kind, entity))
    assert {("run", ids["run_id"]), ("incident", ids["incident_id"])} <= followed
    assert ("policy", ids["policy_id"]) in followed

    # The named links of seed 000 §5.2, each to a page showing the run or its incidents.
    await goto(page, base, starts["run"])
    for name, panel in [("Trace and logs", "LOG-REC-LLM"), ("Cost", "ANL-INS-COST")]:
        await goto(page, base, starts["run"])
        await page.get_by_role("link", name=name, exact=True).click()
        await settled(page)
        assert await page.locator(f"main .panel-body[data-panel='{panel}']").count() == 1
        assert await page.locator(f"main {SHOWS['run'].format(id=ids['run_id'])}").count() == 1
    await goto(page, base, starts["run"])
    await page.get_by_role("link", name="Incidents of this run").click()
    await settled(page)
    row = page.locator(f"main tr[data-key='{ids['incident_id']}']")
    await row.wait_for()
    await goto(page, base, starts["policy"])
    await page.get_by_role("link", name="Incidents of this policy").click()
    await settled(page)
    await page.locator(f"main tr[data-key='{ids['incident_id']}']").wait_for()


async def test_the_navigation_and_a_tables_sorting_work_from_the_keyboard(
    whole_system: RunningSystem, demo_run: DemoRun, page: Any
) -> None:
    base, _ = await signed_in(whole_system, page)
    await goto(page, base, "#/panel/ACT-LLM-COMP/O2")
    focused = "() => document.activeElement"
    reached_nav = reached_sort = False
    # From the top of the page: the skip link, the account links, the navigation, the panel.
    await page.locator("a.skip").focus()
    for _ in range(120):
        await page.keyboard.press("Tab")
        where = await page.evaluate_handle(focused)
        if await where.evaluate("(e) => !!e.closest('#nav')"):
            reached_nav = True
        if await where.evaluate("(e) => e.matches('button.sort')"):
            reached_sort = True
            break
    assert reached_nav and reached_sort
    column = await page.evaluate("() => document.activeElement.dataset.sort")
    await page.keyboard.press("Enter")
    header = page.locator(f"main th:has(button[data-sort='{column}'])")
    assert await header.get_attribute("aria-sort") == "ascending"
    await page.keyboard.press("Enter")
    assert await header.get_attribute("aria-sort") == "descending"
    # Enter on a link of the navigation opens its panel.
    await page.locator("#nav a[data-panel='INC-EV-ACT']").focus()
    await page.keyboard.press("Enter")
    await page.wait_for_function("() => location.hash.startsWith('#/panel/INC-EV-ACT')")
    await settled(page)


async def test_a_person_signs_in_with_the_login_form(
    whole_system: RunningSystem, demo_run: DemoRun, page: Any
) -> None:
    user, password = f"console-{secrets.token_hex(4)}", secrets.token_urlsafe(16)

    async def provision(pool: Any) -> None:
        await create_user(pool, user, password, actor="test")
        await grant_role(pool, user, DEMO_TENANT, "viewer", actor="test")

    await asyncio.to_thread(run_with_pool, whole_system.admin_url, provision)
    base = whole_system.gateway_url
    await sign_in_as_person(page, base, user, password)
    await settled(page)
    assert (await page.locator("#who").inner_text()) == f"{user} · {DEMO_TENANT}"
    await goto(page, base, "#/panel/ACC-PRO-OVR/O3")
    text = await page.locator("main").inner_text()
    assert f"user:{user}" in text and "viewer" in text
    assert await axe(page) == []
    await shot(page, "panel-profile-person")


async def test_the_live_panel_says_a_tenant_is_at_its_stream_limit_and_follows_once_freed(
    whole_system: RunningSystem, page: Any
) -> None:
    """A tenant that already holds its limit of open event streams gets 429 for one more: the
    panel shows the gateway's reason while it waits, and follows once a stream is closed."""
    base = whole_system.gateway_url
    key = await asyncio.to_thread(whole_system.key_for, f"t-limit-{secrets.token_hex(4)}")
    async with (
        httpx.AsyncClient(base_url=base, headers={"X-API-Key": key}, timeout=30) as c,
        AsyncExitStack() as held,
    ):
        # Hold streams until the gateway refuses one: whatever the limit is configured to be.
        for _ in range(256):
            stream = await held.enter_async_context(c.stream("GET", "/v1/live"))
            if stream.status_code == 429:
                break
            assert stream.status_code == 200, stream.status_code
        else:
            raise AssertionError("the gateway never refused a stream")
        # The held streams take no place of the short requests: signing in is served.
        await sign_in_with_key(page, base, key)
        await page.goto(f"{base}/#/panel/ACT-LLM-LIVE/O2")
        status = page.locator("main [role='status']").filter(has_text="Live updates waiting")
        await status.wait_for(timeout=15_000)
        text = await status.inner_text()
        assert "event streams open, its limit" in text, text
        assert "(429)" in text and "trying again in 1 s" in text, text
        await shot(page, "live-panel-at-the-stream-limit")
    # The held streams are closed: the panel's next try is served.
    await (
        page.locator("main [role='status']")
        .filter(has_text="updated as runs start")
        .wait_for(timeout=15_000)
    )


async def test_a_tables_filters_are_kept_in_the_address_across_a_detail_and_back(
    whole_system: RunningSystem, demo_run: DemoRun, page: Any
) -> None:
    """Filters applied to a table are written into the URL: Back from a row's detail page, or a
    reload, shows the same filtered rows."""
    base, ids = await signed_in(whole_system, page)
    await goto(page, base, "#/panel/ACT-LLM-COMP/O2")
    table = page.locator("main .datatable").first
    await table.get_by_label("Status").select_option("stopped_by_policy")
    await table.get_by_role("button", name="Apply filters").click()
    await page.wait_for_function("() => location.hash.includes('status=stopped_by_policy')")
    await settled(page)

    async def shown() -> list[str]:
        await page.wait_for_function("() => document.querySelector('main tbody tr[data-key]')")
        return await table.locator("tbody tr[data-key]").evaluate_all(
            "(rows) => rows.map((r) => r.dataset.key)"
        )

    first = await shown()
    assert ids["run_id"] in first
    key = await asyncio.to_thread(whole_system.key_for, DEMO_TENANT)
    async with httpx.AsyncClient(base_url=base, headers={"X-API-Key": key}, timeout=30) as c:
        stopped = (await c.get("/v1/runs", params={"status": "stopped_by_policy"})).json()["runs"]
    assert set(first) <= {r["run_id"] for r in stopped}
    await table.locator(f"tbody tr[data-key='{ids['run_id']}'] a[data-link='run']").first.click()
    await page.locator(f"[data-entity='run'][data-id='{ids['run_id']}']").first.wait_for()
    await page.go_back()
    await settled(page)
    assert await page.locator("main .datatable").first.get_by_label("Status").input_value() == (
        "stopped_by_policy"
    )
    assert await shown() == first
    await page.reload()
    await settled(page)
    assert await shown() == first


def _refusal(base: str, user: str, password: str, method: str, path: str) -> str:
    """The API's own message when ``user`` calls ``method path`` and is refused (403)."""
    with httpx.Client(base_url=base, timeout=30) as http:
        signed = http.post("/v1/auth/token", json={"username": user, "password": password})
        assert signed.status_code == 200, signed.text
        token = signed.json()["access_token"]
        answer = http.request(method, path, headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 403, answer.text
    return str(answer.json()["error"]["message"])


def _keys_seen_with(base: str, key: str) -> httpx.Response:
    """``GET /v1/api-keys`` (a read of the tenant) sent with ``key``."""
    return httpx.get(f"{base}/v1/api-keys", headers={"X-API-Key": key}, timeout=30)


async def _answer_dialog(page: Any, accept: bool) -> list[str]:
    """Answer the page's next dialog (accept or dismiss it); the list receives its message."""
    seen: list[str] = []

    async def answer(dialog: Any) -> None:
        seen.append(dialog.message)
        await (dialog.accept() if accept else dialog.dismiss())

    page.once("dialog", answer)
    return seen


async def test_an_admin_issues_and_revokes_an_api_key_and_a_viewer_may_not(
    whole_system: RunningSystem, page: Any
) -> None:
    uid = secrets.token_hex(4)
    tenant, admin, viewer = f"ckeys{uid}", f"keys-admin-{uid}", f"keys-viewer-{uid}"
    password = secrets.token_urlsafe(16)
    base = whole_system.gateway_url
    # Provisioning the tenant issues it a first key, the one the viewer tries to revoke.
    first = await asyncio.to_thread(whole_system.key_for, tenant)
    first_id = first.split("_")[1]

    async def provision(pool: Any) -> None:
        for user, role in ((admin, "admin"), (viewer, "viewer")):
            await create_user(pool, user, password, actor="test")
            await grant_role(pool, user, tenant, role, actor="test")

    await asyncio.to_thread(run_with_pool, whole_system.admin_url, provision)
    keys_page = "#/panel/CON-API-KEYS/O3"
    await sign_in_as_person(page, base, admin, password)
    await goto(page, base, keys_page)

    # Issued: shown once, with a warning, and listed (active) below at once.
    await page.get_by_role("button", name="Issue a new API key").click()
    field = page.get_by_label("New API key")
    await field.wait_for()
    secret = await field.input_value()
    key_id = secret.split("_")[1]
    note = await page.locator("main .banner[role='note']").inner_text()
    assert key_id in note and "shown once" in note
    listed = page.locator("main tr").filter(has_text=key_id)
    await listed.get_by_role("button", name=f"Revoke {key_id}").wait_for()
    assert await axe(page) == []
    await shot(page, "panel-CON-API-KEYS-issued")
    used = await asyncio.to_thread(_keys_seen_with, base, secret)
    assert used.status_code == 200, used.text
    assert key_id in {k["key_id"] for k in used.json()["keys"]}

    # Once the page is left, the secret is nowhere: not in the page, its fields, its address,
    # its title or the tab's storage; going back renders the panel afresh, without it.
    where = """(secret) => [document.documentElement.outerHTML, document.title, location.href,
        JSON.stringify({...sessionStorage}), JSON.stringify({...localStorage}),
        ...[...document.querySelectorAll('input, textarea')].map((i) => i.value)]
        .filter((text) => text.includes(secret)).length"""
    await goto(page, base, "#/panel/CON-API-KEYS/O2")
    assert await page.evaluate(where, secret) == 0
    await page.go_back()
    await settled(page)
    await listed.get_by_role("button", name=f"Revoke {key_id}").wait_for()
    assert await page.get_by_label("New API key").count() == 0
    assert await page.evaluate(where, secret) == 0

    # Revoking asks first: dismissed, nothing changes; accepted, the API refuses the key.
    asked = await _answer_dialog(page, accept=False)
    await listed.get_by_role("button", name=f"Revoke {key_id}").click()
    assert asked and key_id in asked[0]
    assert (await asyncio.to_thread(_keys_seen_with, base, secret)).status_code == 200
    asked = await _answer_dialog(page, accept=True)
    await listed.get_by_role("button", name=f"Revoke {key_id}").click()
    await page.locator("#toast").filter(has_text=f"Key {key_id} revoked").wait_for()
    assert asked and key_id in asked[0]
    await asyncio.to_thread(
        wait_for,
        lambda: _keys_seen_with(base, secret).status_code == 401,
        10,
        "the revoked key refused",
    )
    await listed.get_by_text("active").wait_for(state="detached")
    assert await listed.get_by_role("button").count() == 0
    assert await axe(page) == []
    await shot(page, "panel-CON-API-KEYS-revoked")

    # A viewer is offered the actions, and the API refuses them with its own message.
    await page.locator("#logout").click()
    await sign_in_as_person(page, base, viewer, password)
    await goto(page, base, keys_page)
    await page.get_by_role("button", name="Issue a new API key").click()
    refused = page.locator("main [role='alert']")
    await refused.wait_for()
    message = await asyncio.to_thread(_refusal, base, viewer, password, "POST", "/v1/api-keys")
    assert await refused.inner_text() == f"forbidden: {message}"
    assert await page.get_by_label("New API key").count() == 0
    assert await axe(page) == []
    await shot(page, "panel-CON-API-KEYS-refused")
    await _answer_dialog(page, accept=True)
    await page.get_by_role("button", name=f"Revoke {first_id}").click()
    message = await asyncio.to_thread(
        _refusal, base, viewer, password, "POST", f"/v1/api-keys/{first_id}:revoke"
    )
    await page.locator("#toast.error").filter(has_text=message).wait_for()
    assert (await asyncio.to_thread(_keys_seen_with, base, first)).status_code == 200
    assert page.offsite == []
