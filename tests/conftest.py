"""Shared fixtures: real embedded NATS and PostgreSQL, started once per test session.

Tests that kill or restart servers start their own with :func:`start_system` so they never
disturb the shared ones.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from libs.eventbus.migrate import apply_all
from libs.runtime.embedded import ServerProcess, start_nats, start_postgres


@dataclass
class System:
    """Embedded servers for a test, and the URLs to reach them."""

    data_dir: Path
    nats: ServerProcess
    pg: ServerProcess

    @property
    def nats_url(self) -> str:
        return self.nats.url

    @property
    def admin_url(self) -> str:
        return self.pg.dsn()

    @property
    def service_url(self) -> str:
        # Tests of behaviour act for every service at once, so they log in as the administrator;
        # the per-service roles and what they are refused are tested in test_pg_roles.py.
        return self.pg.dsn()

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            NATS_URL=self.nats_url, DATABASE_URL=self.service_url, MC_DATA_DIR=str(self.data_dir)
        )
        return env

    def stop(self) -> None:
        for s in (self.nats, self.pg):
            try:
                s.stop()
            except Exception:
                s.kill()


def start_system(base: Path) -> System:
    """Start NATS and PostgreSQL under ``base`` and apply migrations."""
    base.mkdir(parents=True, exist_ok=True)
    nats = start_nats(base)
    pg = start_postgres(base)
    apply_all(pg.dsn())
    return System(base, nats, pg)


@pytest.fixture(scope="session")
def system() -> Iterator[System]:
    base = Path(tempfile.mkdtemp(prefix="mc-test-"))
    sys_ = start_system(base)
    yield sys_
    sys_.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def own_system(tmp_path: Path) -> Iterator[System]:
    """Servers of this test alone (for tests that kill or restart them)."""
    sys_ = start_system(tmp_path / "sys")
    yield sys_
    sys_.stop()


@pytest.fixture
def unique() -> Callable[[str], str]:
    """Unique names per test, so parallel or repeated runs never collide."""
    suffix = uuid.uuid4().hex[:10]

    def make(prefix: str) -> str:
        return f"{prefix}{suffix}"

    return make


@pytest.fixture
def tenant(unique: Callable[[str], str]) -> str:
    return unique("t")


async def wait_until(
    predicate: Callable[[], object], timeout: float = 20.0, interval: float = 0.05, what: str = ""
) -> None:
    """Poll ``predicate`` (sync or async) until truthy, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await asyncio.sleep(interval)


@pytest.fixture
async def pool(system: System) -> AsyncIterator[object]:
    from libs.eventbus.db import open_pool

    p = await open_pool(system.service_url, max_size=12)
    yield p
    await p.close()
