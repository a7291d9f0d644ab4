"""The whole system, started once for the e2e tests with ``mctl up --detach``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_asyncio
from pydantic import SecretStr

from libs.eventbus.jetstream import connect
from libs.runtime.busauth import OPERATOR_USER, credentials_dir
from libs.runtime.urls import Source, resolve_url
from libs.settings import Settings
from services.gateway.client import MissionControlClient
from services.gateway.keys import provision_tenant, run_with_pool

# The fields of a run that its projection and its replay from the store must agree on.
RUN_STATE_FIELDS = (
    "status",
    "stopped_at_step",
    "violation_policy_id",
    "tokens_used",
    "cost_usd",
    "last_step_index",
)


@dataclass
class RunningSystem:
    """A running Mission Control and how to reach it."""

    data_dir: Path
    state: dict[str, Any]
    admin_token: str | None = None
    """The operator token (``MC_ADMIN_TOKEN``) the system was started with."""

    @property
    def gateway_url(self) -> str:
        return self.url_of("gateway")

    @property
    def admin_url(self) -> str:
        found = resolve_url(
            "admin_database", settings=Settings.model_construct(), data_dir=self.data_dir
        )
        assert found is not None and found.source == Source.RUNNING_SYSTEM
        return found.secret()

    @property
    def nats_url(self) -> str:
        return str(self.state["nats_url"])

    def nats_credentials(self, user: str = OPERATOR_USER) -> tuple[str, SecretStr]:
        """The NATS user ``user`` of the running system and its password (``mctl up`` wrote it
        under the data directory)."""
        path = credentials_dir(self.data_dir) / user
        return user, SecretStr(path.read_text().strip())

    def url_of(self, name: str) -> str:
        return str(self.child(name)["url"])

    def child(self, name: str) -> dict[str, Any]:
        self.refresh()
        return next(c for c in self.state["children"] if c["name"] == name)

    def refresh(self) -> None:
        self.state = json.loads((self.data_dir / "state.json").read_text())

    def new_tenant(self, tenant_id: str) -> MissionControlClient:
        _, key = run_with_pool(
            self.admin_url, lambda pool: provision_tenant(pool, tenant_id, tenant_id)
        )
        return MissionControlClient(self.gateway_url, key, timeout=30)

    def key_for(self, tenant_id: str) -> str:
        _, key = run_with_pool(
            self.admin_url, lambda pool: provision_tenant(pool, tenant_id, exist_ok=True)
        )
        return key


def mctl(*args: str, env: dict[str, str] | None = None, timeout: float = 240) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "libs.runtime.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, f"mctl {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def start_whole_system(data_dir: Path, extra_env: dict[str, str] | None = None) -> RunningSystem:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("NATS_URL", "DATABASE_URL", "CLICKHOUSE_URL")
    }
    env.update(extra_env or {})
    mctl("up", "--detach", "--data-dir", str(data_dir), env=env)
    sys_ = RunningSystem(data_dir, {}, admin_token=env.get("MC_ADMIN_TOKEN"))
    sys_.refresh()
    return sys_


def stop_whole_system(sys_: RunningSystem) -> None:
    try:
        mctl("down", "--data-dir", str(sys_.data_dir), timeout=90)
    except AssertionError:
        with contextlib.suppress(Exception):
            os.kill(int(sys_.state["supervisor_pid"]), signal.SIGKILL)
        for c in sys_.state.get("children", []):
            with contextlib.suppress(Exception):
                os.kill(int(c["pid"]), signal.SIGKILL)


@pytest.fixture(scope="session")
def whole_system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSystem]:
    # An operator token, so the admin route (projection rebuild) can be exercised. Aggregates
    # exact: the tests compare answers read before and after a write (a redelivery), which a
    # kept answer could pass without reading; the staleness bound has its own unit tests.
    token = secrets.token_urlsafe(24)
    sys_ = start_whole_system(
        tmp_path_factory.mktemp("e2e") / "mc",
        extra_env={"MC_ADMIN_TOKEN": token, "MC_ANALYTICS_MAX_STALENESS_MS": "0"},
    )
    yield sys_
    stop_whole_system(sys_)


@dataclass(frozen=True)
class DemoRun:
    """One run of the demo against the shared system: its outcome and what it printed."""

    outcome: Any
    text: str


@pytest.fixture(scope="session")
def demo_run(whole_system: RunningSystem) -> DemoRun:
    """The demo, run once per session: every test about what it does reads this one run (a
    second run against the same system would test the demo's re-runs, not what it shows)."""
    from services.gateway.demo import run_demo

    printed: list[str] = []
    outcome = run_demo(whole_system.gateway_url, whole_system.data_dir, echo=printed.append)
    return DemoRun(outcome, "\n".join(printed))


def wait_for(predicate: Any, timeout: float = 30.0, what: str = "", interval: float = 0.1) -> Any:
    """Poll until ``predicate()`` returns something truthy; return it, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except Exception as exc:  # not there yet (404 while the projection catches up)
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}: last value {last!r}")


def consumers_idle(sys_: RunningSystem) -> bool:
    """Whether every durable consumer of ``MC_EVENTS`` has handled and acknowledged everything
    (asked as the system's read-only ``operator`` NATS user)."""

    async def check() -> bool:
        nc = await connect(sys_.nats_url, "e2e-check", sys_.nats_credentials())
        try:
            jsm = nc.jetstream()
            infos = await jsm.consumers_info("MC_EVENTS")
            return all(
                i.num_pending == 0 and i.num_ack_pending == 0
                for i in infos
                if i.config.durable_name and not i.config.durable_name.startswith("read-")
            )
        finally:
            await nc.close()

    return asyncio.run(check())


def event_counts(admin_url: str, tenant: str) -> dict[str, int]:
    """How many events of each type the store holds for ``tenant``."""
    with psycopg.connect(admin_url) as conn:
        rows = conn.execute(
            "SELECT event_type, count(*) FROM eventstore.events WHERE tenant_id = %s GROUP BY 1",
            (tenant,),
        ).fetchall()
    return {r[0]: int(r[1]) for r in rows}


@pytest_asyncio.fixture(scope="session")
async def chromium() -> AsyncIterator[Any]:
    """Debian's Chromium under Playwright, once per session (see tests/e2e/browser.py).

    Playwright's async API, on the session's event loop: its sync API keeps a loop running on
    the test thread, which the system's synchronous helpers (``asyncio.run``) cannot share.
    """
    from playwright.async_api import async_playwright

    from tests.e2e.browser import CHROMIUM, CHROMIUM_ARGS

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


@pytest_asyncio.fixture
async def page(chromium: Any) -> AsyncIterator[Any]:
    """A fresh browser context and page; every request it makes off this machine is refused
    and recorded in ``page.offsite`` (the console must work offline)."""
    context = await chromium.new_context(viewport={"width": 1280, "height": 860})
    offsite: list[str] = []

    async def guard(route: Any) -> None:
        url = route.request.url
        if url.startswith(("http://127.0.0.1", "http://localhost", "data:", "blob:")):
            await route.continue_()
        else:
            offsite.append(url)
            await route.abort()

    await context.route("**/*", guard)
    page = await context.new_page()
    page.offsite = offsite
    page.set_default_timeout(20_000)
    try:
        yield page
    finally:
        await context.close()
