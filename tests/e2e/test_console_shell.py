"""The console's shell in Chromium: served by the gateway at ``/`` and fully offline, signing
in with an API key, and the API docs page rendered from vendored Swagger UI."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from tests.e2e.browser import axe, shot, sign_in_with_key
from tests.e2e.conftest import RunningSystem

pytestmark = pytest.mark.e2e


def test_the_gateway_serves_the_console_and_its_assets(whole_system: RunningSystem) -> None:
    base = whole_system.gateway_url
    index = httpx.get(f"{base}/", timeout=10)
    assert index.status_code == 200 and "text/html" in index.headers["content-type"]
    assert '<script type="module" src="/console/app.js">' in index.text
    assert index.headers["cache-control"] == "no-store"
    assets = ("/console/app.js", "/console/style.css", "/console/vendor/chartjs/chart.umd.min.js")
    for asset in assets:
        assert httpx.get(f"{base}{asset}", timeout=10).status_code == 200, asset
    # FastAPI's CDN page is gone; Redoc (CDN only) is not served.
    docs = httpx.get(f"{base}/docs", timeout=10).text
    assert "/console/vendor/swagger-ui/swagger-ui-bundle.js" in docs and "cdn" not in docs
    assert httpx.get(f"{base}/redoc", timeout=10).status_code == 404


async def test_signing_in_with_an_api_key_opens_the_highlights(
    whole_system: RunningSystem, page: Any
) -> None:
    base = whole_system.gateway_url
    key = await asyncio.to_thread(whole_system.key_for, "console-shell")
    await sign_in_with_key(page, base, key)
    assert (await page.locator("#who").inner_text()).startswith("API key")
    assert await axe(page) == []
    await shot(page, "shell-highlights")
    assert page.offsite == []


async def test_a_wrong_api_key_is_refused_with_the_servers_reason(
    whole_system: RunningSystem, page: Any
) -> None:
    await page.goto(f"{whole_system.gateway_url}/#/login")
    await page.get_by_label("API key").fill("mc_not-a-key")
    await page.get_by_role("button", name="Sign in").click()
    alert = page.get_by_role("alert")
    await alert.wait_for()
    assert await alert.inner_text() == "unauthorized: malformed API key"


async def test_the_api_docs_render_offline(whole_system: RunningSystem, page: Any) -> None:
    await page.goto(f"{whole_system.gateway_url}/docs")
    await page.locator(".swagger-ui .opblock").first.wait_for()
    assert await page.locator(".swagger-ui .opblock").count() > 50
    assert page.offsite == []


async def test_a_proxy_error_at_sign_in_is_named_by_its_status(
    whole_system: RunningSystem, page: Any
) -> None:
    """A proxy in front of the gateway answering an HTML error page: the form names the status
    rather than failing to read it as JSON."""

    async def bad_gateway(route: Any) -> None:
        await route.fulfill(status=502, content_type="text/html", body="<h1>Bad Gateway</h1>")

    await page.route("**/v1/auth/token", bad_gateway)
    await page.goto(f"{whole_system.gateway_url}/#/login")
    await page.get_by_label("Username").fill("someone")
    await page.get_by_label("Password", exact=True).fill("secret-password")
    await page.get_by_role("button", name="Sign in").click()
    alert = page.get_by_role("alert")
    await alert.wait_for()
    assert await alert.inner_text() == "error: 502 Bad Gateway"
