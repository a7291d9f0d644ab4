"""The console's policy, agent and diff views in Chromium, against a running system: the agent
wizard stopped by a deny, held by a warn until acknowledged and explaining a locked field before
it creates the agent; an agent's stored versions listed and two of them diffed; the policy
lifecycle view with its bundles, a freeze banner (also one that starts while the view is open)
and a simulation found again in the recent simulations; a 10,000-row diff scrolled to its end
with only a window of rows in the page, then acknowledged, and found again in the recent diffs.
Each view is checked with axe and saved as a screenshot."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any
from urllib.parse import quote, unquote

import httpx
import pytest

from libs import policy_bundles as artifacts
from tests.e2e.browser import axe, shot
from tests.e2e.conftest import RunningSystem, wait_for
from tests.e2e.test_policy_bundles import PASSWORD
from tests.e2e.test_promotions import _freeze, _high_incident, _person
from tests.integration.helpers.policy_bundles import new_key, repo_files, signed

pytestmark = pytest.mark.e2e

ROWS = 10_000


async def _sign_in(page: Any, base: str, user: str, tenant: str) -> None:
    await page.goto(f"{base}/#/login")
    await page.get_by_label("Username").fill(user)
    await page.get_by_label("Password").fill(PASSWORD)
    await page.get_by_label("Tenant (optional for a single-tenant login)").fill(tenant)
    await page.get_by_role("button", name="Sign in").click()
    await page.locator("main [data-panel='OVR-SUM-HIGH']").wait_for()


async def _setup(system: RunningSystem, role: str) -> tuple[str, str, str, str]:
    """A new tenant, an API key of it, and a person of ``role`` there: name and token."""
    uid = uuid.uuid4().hex[:10]
    tenant, user = f"console-pol-{uid}", f"console-{role}-{uid}"
    key = await asyncio.to_thread(system.key_for, tenant)
    token = await asyncio.to_thread(_person, system, tenant, user, role)
    return tenant, key, user, token


def _specs(rows: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two agent specs whose ``rows`` tool settings all differ: a diff of ``rows`` rows."""

    def spec(scope: str) -> dict[str, Any]:
        return {
            "identity": {"name": "console-agent", "owner": "team-a"},
            "limits": {"max_tokens": 10_000},
            "tools": {f"tool-{i:05d}": {"scope": scope} for i in range(rows)},
        }

    return spec("read"), spec("write")


async def _count(page: Any, selector: str) -> int:
    return int(await page.locator(selector).count())


async def test_a_10000_row_diff_scrolls_to_its_end_with_a_window_of_rows_and_is_acknowledged(
    whole_system: RunningSystem, page: Any
) -> None:
    base = whole_system.gateway_url
    tenant, key, user, _ = await _setup(whole_system, "operator")
    old, new = _specs(ROWS)
    body = {"old_spec": old, "new_spec": new, "locked_fields": ["tools.tool-09999"], "limit": 1}

    def create() -> dict[str, Any]:
        resp = httpx.post(f"{base}/v1/diffs", json=body, headers={"X-API-Key": key}, timeout=60)
        assert resp.status_code == 200, resp.text
        answer: dict[str, Any] = resp.json()
        return answer

    created = await asyncio.to_thread(create)
    assert created["total"] == ROWS
    await _sign_in(page, base, user, tenant)
    await page.goto(f"{base}/#/view/diff/{created['diff_hash']}")
    await page.locator("tr[data-row='0']").wait_for()
    assert await page.locator(".cards").inner_text() != ""
    assert "10,000" in await page.locator(".cards").inner_text()
    assert await _count(page, "tr[data-row]") < 100
    acknowledge = page.get_by_role("button", name="Acknowledge this diff")
    assert await acknowledge.is_disabled()

    # The mouse wheel moves the window: the first rows leave the page, later ones come in.
    scroller = page.get_by_role("region", name="Diff rows", exact=False)
    await scroller.hover()
    await page.mouse.wheel(0, 3000)
    await page.locator("tr[data-row='100']").wait_for()
    assert await _count(page, "tr[data-row='0']") == 0
    # The keyboard reaches the end: the last row is shown, locked, and the page holds a window.
    await scroller.focus()
    await page.keyboard.press("End")
    last = page.locator(f"tr[data-row='{ROWS - 1}']")
    await last.wait_for()
    assert "/tools/tool-09999/scope" in await last.inner_text()
    assert "locked" in await last.inner_text()
    assert await _count(page, "tr[data-row]") < 100
    await page.keyboard.press("PageUp")
    await page.locator(f"tr[data-row='{ROWS - 30}']").wait_for()
    # A row shown whole, with its mark.
    await page.keyboard.press("End")
    await page.get_by_role("button", name=f"Row {ROWS}: show it whole").click()
    detail = page.get_by_role("region", name="The row shown whole")
    await detail.get_by_text("/tools/tool-09999/scope").wait_for()
    assert "locked: tools.tool-09999" in await detail.inner_text()

    # The side-by-side view shows the same rows, left and right.
    await page.get_by_role("button", name="Side by side").click()
    await page.get_by_role("columnheader", name="Left").wait_for()
    assert '"read"' in await last.inner_text()

    # A filter narrows the 10,000 rows to the locked one.
    await page.get_by_label("locked only").check()
    await page.get_by_text("of 1 (filtered from 10,000)").wait_for()
    assert await _count(page, "tr[data-row]") == 1

    assert await axe(page) == []
    await shot(page, "view-diff")
    await acknowledge.click()
    await page.locator("ul.acks li", has_text=f"user:{user}").wait_for()

    # Without a hash, the view makes a diff: two specs pasted, compared, opened.
    await page.goto(f"{base}/#/view/diff")
    await page.get_by_label("Old spec (JSON)").fill('{"role": "sorts"}')
    await page.get_by_label("New spec (JSON)").fill('{"role": "sorts and answers"}')
    assert await axe(page) == []
    await page.get_by_role("button", name="Compare specs").click()
    await page.locator("tr[data-row='0']", has_text="/role").wait_for()
    assert await _count(page, "tr[data-row]") == 1
    specs_hash = unquote(page.url.rsplit("/", 1)[1])

    # Both diffs are in the recent diffs, the one just asked for first; a link opens one.
    await page.goto(f"{base}/#/view/diff")
    recent = page.get_by_role("table", name="Recent diffs")
    await recent.wait_for()
    keys = await recent.locator("tbody tr").evaluate_all("rows => rows.map(r => r.dataset.key)")
    assert keys == [specs_hash, created["diff_hash"]]
    big = recent.locator(f"tr[data-key='{created['diff_hash']}']")
    assert "10,000 rows" in await big.inner_text()
    assert "agent specs" in await big.inner_text()
    assert "user:" + user in await recent.locator(f"tr[data-key='{specs_hash}']").inner_text()
    assert await axe(page) == []
    await shot(page, "view-diff-recent")
    await page.locator(f"a[data-diff='{created['diff_hash']}']").click()
    await page.wait_for_url(f"**/#/view/diff/{quote(created['diff_hash'], safe='')}")
    await page.locator("tr[data-row='0']").wait_for()
    assert page.offsite == []


async def _step(page: Any, number: int) -> None:
    await page.get_by_role("heading", name=f"Step {number} of 7", exact=False).wait_for()


async def test_the_wizard_blocks_on_a_deny_holds_on_a_warn_explains_a_lock_then_creates(
    whole_system: RunningSystem, page: Any
) -> None:
    base = whole_system.gateway_url
    tenant, key, user, _ = await _setup(whole_system, "operator")
    agent_id = f"wizard-{uuid.uuid4().hex[:8]}"
    await _sign_in(page, base, user, tenant)
    await page.goto(f"{base}/#/view/agent-new")
    await _step(page, 1)

    # A locked field: the tenant governs the owner; an operator may not choose it, and is told why.
    owner = page.get_by_label("Owner: the person or team answerable for it")
    await page.locator("details.why").first.wait_for()
    assert await owner.is_disabled() and await owner.input_value() == user
    await page.get_by_text("Why is this locked?").first.click()
    why = page.locator("#agent-identity-owner-why")
    assert "governed by the tenant: only an admin may change it" in await why.inner_text()
    assert "governed_fields" in await why.inner_text()

    await page.get_by_label("Agent id").fill(agent_id)
    await page.get_by_label("Name").fill("Ticket triage")
    await page.get_by_label("Role: what the agent is for").fill("Sorts support tickets")
    await page.get_by_text(f"Draft of {agent_id} saved (version 1, draft).").wait_for()
    assert await page.get_by_label("Agent id").is_disabled()  # the draft lives under it now

    # A warn: no step limit declared (limits are locked too); going on needs acknowledging it.
    next_ = page.get_by_role("button", name="Next")
    await next_.click()
    warn = page.locator("[data-banner='warn']")
    await warn.wait_for()
    assert "max_steps" in await warn.inner_text()
    await next_.click()
    await warn.wait_for()
    assert await page.get_by_role("heading", name="Step 1 of 7", exact=False).is_visible()
    await page.get_by_label("I acknowledge these warnings").check()
    await next_.click()
    await _step(page, 2)
    await page.get_by_label("Model", exact=True).fill("gpt-4o")
    await next_.click()

    # A deny: two tools that together are forbidden; the step cannot be left until it is fixed.
    await _step(page, 3)
    tools = page.get_by_label("Tools, one per line", exact=False)
    await tools.fill("shell\nhttp_request: calls web APIs")
    await next_.click()
    deny = page.locator("[data-banner='deny']")
    await deny.wait_for()
    assert "tool_combinations" in await deny.inner_text()
    assert "shell + http_request" in await deny.inner_text()
    assert await page.get_by_role("heading", name="Step 3 of 7", exact=False).is_visible()
    assert await axe(page) == []
    await shot(page, "view-agent-new")
    await tools.fill("shell")
    await next_.click()
    await _step(page, 4)
    await next_.click()
    await _step(page, 5)
    await next_.click()
    await _step(page, 6)
    assert await page.get_by_label("Maximum steps per run").is_disabled()
    await next_.click()
    await _step(page, 7)
    assert "Ticket triage" in await page.get_by_label("The agent spec").inner_text()

    # Create: validated against the sandbox and moved there; the agent's page opens.
    await page.get_by_role("button", name="Create the agent in the sandbox").click()
    await page.wait_for_url(f"**/#/view/agent/{agent_id}")
    await page.get_by_role("heading", name="Per environment").wait_for()
    assert "sandbox" in await page.locator("dl.kv").inner_text()

    def registered() -> dict[str, Any]:
        resp = httpx.get(f"{base}/v1/agents/{agent_id}", headers={"X-API-Key": key}, timeout=30)
        assert resp.status_code == 200, resp.text
        answer: dict[str, Any] = resp.json()
        return answer

    # Promoting is an admin's: an operator sees the button, disabled.
    assert await page.get_by_role("button", name="Promote to production").is_disabled()
    created = await asyncio.to_thread(registered)
    assert created["state"] == "sandbox"
    assert created["spec"]["identity"]["owner"] == user
    assert created["spec"]["tools"] == [{"name": "shell"}]
    assert created["validation"]["passed"] is True
    assert await axe(page) == []
    await shot(page, "view-agent")

    await page.goto(f"{base}/#/view/agents")
    await page.get_by_role("link", name=agent_id).wait_for()
    assert await axe(page) == []
    await shot(page, "view-agents")
    assert page.offsite == []


def _three_versions(base: str, key: str, token: str, agent_id: str) -> dict[str, Any]:
    """An agent at version 3 through the API: version 1 saved twice (role "second" last),
    promoted to version 2 by the admin, forked to version 3 and edited (role "third")."""
    spec: dict[str, Any] = {
        "identity": {"name": "Versioned", "owner": "team-a"},
        "role": "first",
        "model": {"model": "gpt-4o"},
        "tools": [{"name": "search"}],
    }
    admin = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=base, headers={"X-API-Key": key}, timeout=60) as http:

        def ok(resp: httpx.Response) -> dict[str, Any]:
            assert resp.status_code in (200, 201), resp.text
            answer: dict[str, Any] = resp.json()
            return answer

        for role in ("first", "second"):
            ok(
                http.post(
                    "/v1/agents/draft", json={"agent_id": agent_id, "spec": {**spec, "role": role}}
                )
            )
        ok(http.put("/v1/approval-rules", json={"irreversible": {"required": 0}}, headers=admin))
        ok(http.post(f"/v1/agents/{agent_id}/sandbox"))
        assert ok(http.post(f"/v1/agents/{agent_id}/promote", headers=admin))["version"] == 2
        assert ok(http.post(f"/v1/agents/{agent_id}/fork"))["version"] == 3
        edited = {"agent_id": agent_id, "spec": {**spec, "role": "third"}}
        assert ok(http.post("/v1/agents/draft", json=edited))["version"] == 3
        return ok(http.get(f"/v1/agents/{agent_id}/versions"))


async def test_the_agent_page_lists_its_stored_versions_and_diffs_two_of_them(
    whole_system: RunningSystem, page: Any
) -> None:
    base = whole_system.gateway_url
    tenant, key, user, token = await _setup(whole_system, "admin")
    agent_id = f"versioned-{uuid.uuid4().hex[:8]}"
    listing = await asyncio.to_thread(_three_versions, base, key, token, agent_id)
    await _sign_in(page, base, user, tenant)
    await page.goto(f"{base}/#/view/agent/{agent_id}")

    versions = page.get_by_role("table", name="The agent's stored versions, newest first")
    await versions.wait_for()
    rows = versions.locator("tbody tr")
    assert await rows.count() == 3
    newest, governed, first = [await rows.nth(i).inner_text() for i in range(3)]
    assert newest.startswith("3") and "draft save (fork of 2)" in newest
    assert "current (draft)" in newest and listing["versions"][0]["spec_hash"] in newest
    assert governed.startswith("2") and "promotion of 1" in governed
    assert "governed: production runs it" in governed
    assert first.startswith("1") and "draft save" in first
    # By default the newest version against the governed one.
    old, new = page.get_by_label("Old version"), page.get_by_label("New version")
    assert (await old.input_value(), await new.input_value()) == ("2", "3")
    # Pasting a spec is an option still; the page no longer says versions cannot be fetched.
    assert await page.get_by_text("Compare the newest spec with a pasted one").count() == 1
    assert await page.get_by_text("cannot be fetched", exact=False).count() == 0
    assert await axe(page) == []
    await shot(page, "view-agent-versions")

    # Version 1 (its second save) against version 3: the role is the one change.
    await old.select_option("1")
    await page.get_by_role("button", name="Diff the two versions").click()
    await page.wait_for_url("**/#/view/diff/sha256*")
    row = page.locator("tr[data-row='0']")
    await row.wait_for()
    assert await _count(page, "tr[data-row]") == 1
    text = await row.inner_text()
    assert "/role" in text and "second" in text and "third" in text and "first" not in text
    assert listing["versions"][2]["spec_hash"] in await page.locator("main").inner_text()
    assert await axe(page) == []
    assert page.offsite == []


def _bundle_in_canary_and_a_freeze(base: str, key: str, token: str) -> str:
    """A bundle of the tenant's own activated in production as a canary, and an open high
    incident there (production frozen); the bundle's digest."""
    signing_key = new_key()
    # The repository's policies without their Rego tests: an upload runs a bundle's tests, which
    # takes half a minute on a busy machine, and they are not what this test is about.
    files = {k: v for k, v in repo_files(revision="7").items() if not k.startswith("tests/")}
    archive = signed(signing_key, files, key_id="release")
    with (
        httpx.Client(base_url=base, timeout=60, headers={"X-API-Key": key}) as http,
        httpx.Client(
            base_url=base, timeout=60, headers={"Authorization": f"Bearer {token}"}
        ) as admin,
    ):
        pem = {"public_key": artifacts.public_pem(signing_key)}
        assert admin.put("/v1/policy-signing-keys/release", json=pem).status_code == 200
        resp = http.post(
            "/v1/policy-bundles",
            params={"environment": "production"},
            content=archive,
            headers={"Content-Type": "application/gzip"},
        )
        assert resp.status_code == 201, resp.text
        digest = str(resp.json()["bundle_digest"])
        resp = http.post(
            f"/v1/policy-bundles/{digest}:activate", params={"environment": "production"}
        )
        assert resp.status_code == 200 and resp.json()["reload"]["status"] == "canary", resp.text
        _high_incident(http, "production")
        wait_for(lambda: _freeze(http, "production")["frozen"], what="the production freeze")
    return digest


async def test_the_policy_view_shows_bundles_freeze_drift_a_canary_a_simulation_and_exceptions(
    whole_system: RunningSystem, page: Any
) -> None:
    base = whole_system.gateway_url
    tenant, key, user, token = await _setup(whole_system, "admin")
    digest = await asyncio.to_thread(_bundle_in_canary_and_a_freeze, base, key, token)
    await _sign_in(page, base, user, tenant)
    await page.goto(f"{base}/#/view/policy")

    # The freeze is on top, naming its incident; the bundle is listed with its canary.
    freeze = page.locator("[data-banner='freeze']")
    await freeze.wait_for()
    assert "Promotions into production are frozen" in await freeze.inner_text()
    assert "high" in await freeze.inner_text()
    bundles = page.get_by_role("table", name="Bundles uploaded to production")
    assert "7" in await bundles.inner_text()
    canary = page.locator("[data-reload-status='canary']")
    await canary.wait_for()
    assert digest[:19] in await page.get_by_role("table", name="Reloads, newest first").inner_text()
    assert await axe(page) == []
    await shot(page, "view-policy")

    # Promote the canary: production decides with the tenant's bundle, and drift shows.
    await page.get_by_role("button", name="Promote").click()
    await page.locator("[data-reload-status='promoted']").wait_for()
    drift = page.locator("[data-banner='drift']")
    await drift.wait_for()
    assert "policy_bundle_digest" in await drift.inner_text()
    # An admin accepts the drift, and lets promotions through the freeze, each with a reason.
    await page.locator("#drift-reason").fill("production trials the tenant's bundle")
    await page.get_by_role("button", name="Accept this drift").click()
    await page.locator("[data-banner='drift']", has_text=f"Accepted by user:{user}").wait_for()
    await page.locator("#freeze-production").fill("the hotfix for this incident")
    await page.get_by_role("button", name="Let promotions into production through").click()
    await page.locator("[data-banner='freeze']").wait_for(state="detached")

    # A simulation of the bundle: its report per policy.
    await page.get_by_role("button", name="Simulate").click()
    await page.locator("[data-simulation-status='done']").wait_for(timeout=60_000)
    assert "decisions replayed" in await page.locator("#simulation-report").inner_text()
    simulation_id = page.url.split("simulation_id=", 1)[1]

    # It is in the recent simulations, done with its totals; its link opens it again.
    recent = page.get_by_role("table", name="Recent simulations")
    listed = recent.locator(f"tr[data-key='{simulation_id}']", has_text="decisions flipped")
    await listed.wait_for()
    assert "done" in await listed.inner_text()
    assert f"user:{user}" in await listed.inner_text()
    assert await axe(page) == []
    await shot(page, "view-policy-simulations")
    await page.goto(f"{base}/#/view/policy")
    await page.get_by_role("table", name="Recent simulations").wait_for()
    assert await page.locator("[data-simulation-status]").count() == 0
    # Filtered by status through the API: none failed; the done one is there.
    filters = page.get_by_role("search", name="Filter Recent simulations")
    await filters.get_by_label("Status").select_option("failed")
    await filters.get_by_role("button", name="Apply filters").click()
    await page.get_by_text("No simulation yet", exact=False).wait_for()
    await filters.get_by_label("Status").select_option("done")
    await filters.get_by_role("button", name="Apply filters").click()
    await page.locator(f"a[data-simulation='{simulation_id}']").click()
    await page.wait_for_url(f"**/#/view/policy?simulation_id={simulation_id}")
    await page.locator("[data-simulation-status='done']").wait_for()
    assert "decisions replayed" in await page.locator("#simulation-report").inner_text()

    # An exception granted with an expiry, then revoked.
    await page.get_by_label("Policy id").fill("token_limit")
    await page.get_by_label("Agent or run id").fill("greedy-production")
    await page.get_by_label("Reason", exact=True).fill("a migration this week")
    await page.get_by_role("button", name="Grant").click()
    revoke = page.get_by_role("button", name="Revoke", exact=False)
    await revoke.wait_for()
    assert "(in " in await page.get_by_role("table", name="Policy exceptions").inner_text()
    await revoke.click()
    await page.locator("[data-exception-status='revoked']").wait_for()
    assert await axe(page) == []
    assert page.offsite == []


async def test_a_freeze_that_starts_while_the_policy_view_is_open_shows_without_a_reload(
    whole_system: RunningSystem, page: Any
) -> None:
    """The banners follow the tenant's events: a high incident freezes production while the view
    is open, and its banner appears on the same page, naming the incident."""
    base = whole_system.gateway_url
    tenant, key, user, _ = await _setup(whole_system, "admin")
    await _sign_in(page, base, user, tenant)
    await page.goto(f"{base}/#/view/policy")
    await page.locator("#pol-bundles").wait_for()
    await page.evaluate("() => { window.notReloaded = true; }")
    assert await page.locator("[data-banner='freeze']").count() == 0

    def freeze_production() -> str:
        with httpx.Client(base_url=base, timeout=60, headers={"X-API-Key": key}) as http:
            run_id = _high_incident(http, "production")
            wait_for(lambda: _freeze(http, "production")["frozen"], what="the production freeze")
            return run_id

    await asyncio.to_thread(freeze_production)
    freeze = page.locator("[data-banner='freeze']")
    await freeze.wait_for(timeout=20_000)
    assert "Promotions into production are frozen" in await freeze.inner_text()
    assert await page.evaluate("() => window.notReloaded === true")
    assert await axe(page) == []
    await shot(page, "policy-freeze-live")
