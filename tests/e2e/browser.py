"""Driving the console in Debian's Chromium with Playwright, for the console tests.

Playwright's own browser download does not work on the project's machines (no network), so the
browser is always ``/usr/bin/chromium`` (``scripts/test.sh`` installs it when it is missing),
started headless with its background networking off: on a closed network its update, sync and
lookup requests only fail, many at a time.

``axe(page)`` runs the vendored axe-core (``tests/e2e/vendor/axe-core``) in a page and returns
its violations; ``shot(page, name)`` saves a screenshot under ``test-artifacts/console/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from playwright.async_api import Page

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
AXE = Path(__file__).parent / "vendor" / "axe-core" / "axe.min.js"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "console"
# The impacts a console page must have none of.
BLOCKING_IMPACTS = {"serious", "critical"}


async def axe(page: Page) -> list[dict[str, Any]]:
    """The serious and critical accessibility violations axe-core finds in ``page``."""
    if not await page.evaluate("() => typeof window.axe !== 'undefined'"):
        await page.add_script_tag(content=AXE.read_text(encoding="utf-8"))
    result: dict[str, Any] = await page.evaluate(
        "async () => await window.axe.run(document, {resultTypes: ['violations']})"
    )
    return [
        {
            "id": v["id"],
            "impact": v["impact"],
            "help": v["help"],
            "nodes": [n["target"] for n in v["nodes"][:5]],
        }
        for v in result["violations"]
        if v["impact"] in BLOCKING_IMPACTS
    ]


async def shot(page: Page, name: str) -> Path:
    """Save a full-page screenshot as a test artifact; its path."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    return path


async def sign_in_with_key(page: Page, base_url: str, api_key: str) -> None:
    """Open the console and sign in with an API key; waits for the first panel."""
    await page.goto(f"{base_url}/#/login")
    await page.get_by_label("API key").fill(api_key)
    await page.get_by_role("button", name="Sign in").click()
    await page.locator("main [data-panel='OVR-SUM-HIGH']").wait_for()


async def sign_in_as_person(
    page: Page, base_url: str, user: str, password: str, tenant: str | None = None
) -> None:
    """Open the console and sign in with a username and password (naming ``tenant`` when
    given); waits for the first panel."""
    await page.goto(f"{base_url}/#/login")
    await page.get_by_label("Username").fill(user)
    await page.get_by_label("Password").fill(password)
    if tenant:
        await page.get_by_label("Tenant", exact=False).fill(tenant)
    await page.get_by_role("button", name="Sign in").click()
    await page.locator("main [data-panel='OVR-SUM-HIGH']").wait_for()
