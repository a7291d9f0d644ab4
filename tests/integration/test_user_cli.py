"""``mctl user`` and ``mctl tenant key --scope`` against the real database."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from psycopg_pool import AsyncConnectionPool
from typer.testing import CliRunner

from libs.runtime.cli import app
from services.gateway.keys import KeyVerifier
from services.gateway.users import UserDirectory
from tests.conftest import System

pytestmark = pytest.mark.integration

PASSWORD = "twelve chars or more"


async def _mctl(*args: str, stdin: str | None = None) -> tuple[int, str]:
    result = await asyncio.to_thread(CliRunner().invoke, app, list(args), input=stdin)
    return result.exit_code, result.output


async def test_users_are_created_granted_listed_revoked_and_disabled(
    system: System, pool: AsyncConnectionPool, unique: Callable[[str], str]
) -> None:
    db = ("--database-url", system.admin_url)
    tenant, user = unique("ucli"), unique("bob-")
    assert (await _mctl("tenant", "create", tenant, *db))[0] == 0

    # Typed twice at the prompt; a mismatch asks again, a short one is refused.
    code, out = await _mctl("user", "create", user, *db, stdin=f"{PASSWORD}\n{PASSWORD}\n")
    assert code == 0, out
    assert PASSWORD not in out
    code, out = await _mctl("user", "create", user, "--password-stdin", *db, stdin="x" * 20)
    assert (code, "already exists" in out) == (1, True)
    code, out = await _mctl("user", "create", unique("c-"), "--password-stdin", *db, stdin="short")
    assert (code, "password is 12 to 1024 characters" in out) == (1, True)
    code, out = await _mctl("user", "create", "Not Valid!", "--password-stdin", *db, stdin="x")
    assert (code, "user id" in out) == (1, True)

    assert (await _mctl("user", "grant", user, tenant, "operator", *db))[0] == 0
    code, out = await _mctl("user", "grant", user, tenant, "operator", *db)
    assert "already held" in out
    code, out = await _mctl("user", "grant", user, tenant, "superuser", *db)
    assert (code, "unknown role 'superuser'" in out) == (1, True)
    code, out = await _mctl("user", "grant", user, unique("nope"), "viewer", *db)
    assert (code, "does not exist" in out) == (1, True)
    assert (await _mctl("user", "grant", user, tenant, "viewer", *db))[0] == 0
    code, out = await _mctl("user", "list", *db)
    line = next(row for row in out.splitlines() if row.startswith(user))
    assert "active" in line
    assert f"{tenant}: operator, viewer" in line

    assert (await _mctl("user", "revoke", user, tenant, "operator", *db))[0] == 0
    code, out = await _mctl("user", "revoke", user, tenant, "operator", *db)
    assert (code, "holds no role" in out) == (1, True)
    record = await UserDirectory(pool).login(user, PASSWORD)
    assert record.grants == {tenant: frozenset({"viewer"})}

    assert (await _mctl("user", "disable", user, *db))[0] == 0
    code, out = await _mctl("user", "disable", user, *db)
    assert "already disabled" in out
    record_after = await UserDirectory(pool).get(user)
    assert record_after is not None and record_after.disabled


async def test_keys_are_issued_with_the_scopes_asked_for(
    system: System, pool: AsyncConnectionPool, unique: Callable[[str], str]
) -> None:
    db = ("--database-url", system.admin_url)
    tenant = unique("scope")
    code, out = await _mctl("tenant", "create", tenant, "--scope", "read", *db)
    assert code == 0, out
    first = next(line for line in out.splitlines() if line.startswith("mc_"))
    assert (await KeyVerifier(pool).verify(first)).scopes == {"read"}
    code, out = await _mctl("tenant", "key", tenant, "--scope", "ingest", "--scope", "admit", *db)
    second = next(line for line in out.splitlines() if line.startswith("mc_"))
    assert (await KeyVerifier(pool).verify(second)).scopes == {"ingest", "admit"}
    code, out = await _mctl("tenant", "key", tenant, "--scope", "write", *db)
    assert (code, "unknown scope write" in out) == (1, True)
