"""``mctl tenant``: tenants and keys created in the real database, usable by the gateway."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from psycopg_pool import AsyncConnectionPool
from typer.testing import CliRunner

from libs.contracts import stream_id_for
from libs.errors import Unauthorized
from libs.eventbus.store import EventStore
from libs.runtime.cli import app
from services.gateway.keys import KeyVerifier
from tests.conftest import System

pytestmark = pytest.mark.integration


async def _mctl(*args: str) -> tuple[int, str]:
    result = await asyncio.to_thread(CliRunner().invoke, app, list(args))
    return result.exit_code, result.output


def _key_of(output: str) -> str:
    return next(line for line in output.splitlines() if line.startswith("mc_"))


async def test_create_tenant_issue_and_revoke_keys(
    system: System, pool: AsyncConnectionPool, unique: Callable[[str], str]
) -> None:
    tenant = unique("cli")
    db = ("--database-url", system.admin_url)
    code, out = await _mctl("tenant", "create", tenant, "--name", "CLI Test", *db)
    assert code == 0, out
    first = _key_of(out)
    verifier = KeyVerifier(pool)
    assert (await verifier.verify(first)).tenant_id == tenant
    # The creation is on the record, in the tenant's own stream.
    [event] = await EventStore(pool).read_stream(stream_id_for(tenant, "tenant", tenant))
    assert event.event_type == "tenant.created"
    assert event.payload == {"tenant_id": tenant, "name": "CLI Test"}

    code, out = await _mctl("tenant", "create", tenant, *db)
    assert code == 1
    assert "already exists" in out

    code, out = await _mctl("tenant", "key", tenant, *db)
    assert code == 0, out
    second = _key_of(out)
    assert second != first
    assert (await verifier.verify(second)).tenant_id == tenant

    code, out = await _mctl("tenant", "revoke", second.split("_")[1], *db)
    assert code == 0, out
    # A fresh verifier has no cached row: the revocation is visible at once.
    with pytest.raises(Unauthorized):
        await KeyVerifier(pool).verify(second)
    assert (await KeyVerifier(pool).verify(first)).tenant_id == tenant


async def test_keys_of_unknown_tenants_and_bad_ids_are_refused(
    system: System, unique: Callable[[str], str]
) -> None:
    db = ("--database-url", system.admin_url)
    code, out = await _mctl("tenant", "key", unique("nobody"), *db)
    assert code == 1
    assert "does not exist" in out
    code, out = await _mctl("tenant", "create", "Not A Tenant", *db)
    assert code == 1
    assert "invalid tenant id" in out


async def test_the_database_comes_from_the_running_systems_state_file(
    system: System, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unique: Callable[[str], str]
) -> None:

    monkeypatch.delenv("DATABASE_URL", raising=False)
    (tmp_path / "state.json").write_text(json.dumps({"postgres_admin_url": system.admin_url}))
    code, out = await _mctl("tenant", "create", unique("st"), "--data-dir", str(tmp_path))
    assert code == 0, out
    assert _key_of(out).startswith("mc_")
