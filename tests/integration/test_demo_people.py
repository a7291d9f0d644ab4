"""The demo's people: made once with passwords only the data directory keeps, signed in as again
by later runs, and made afresh (never taken over) when the passwords are gone."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from psycopg_pool import AsyncConnectionPool

from libs.eventbus.db import transaction
from services.gateway.demo_workflow import PEOPLE, ensure_people
from services.gateway.keys import create_tenant
from services.gateway.users import UserDirectory

pytestmark = pytest.mark.integration


async def _roles(pool: AsyncConnectionPool, user_id: str, tenant: str) -> list[str]:
    async with transaction(pool) as conn:
        cur = await conn.execute(
            "SELECT role FROM gateway.role_grants"
            " WHERE user_id = %s AND tenant_id = %s AND revoked_at IS NULL",
            (user_id, tenant),
        )
        return [r["role"] for r in await cur.fetchall()]


async def test_the_demos_people_are_made_once_and_never_taken_over(
    pool: AsyncConnectionPool, tmp_path: Path
) -> None:
    tenant = f"dp{uuid.uuid4().hex[:8]}"
    await create_tenant(pool, tenant, actor="test")
    secrets_file = tmp_path / "demo" / "people.json"
    directory = UserDirectory(pool)

    first = await ensure_people(pool, tenant, secrets_file)
    assert {r: p.user_id for r, p in first.items()} == PEOPLE
    assert secrets_file.stat().st_mode & 0o777 == 0o600
    for role, person in first.items():
        assert await _roles(pool, person.user_id, tenant) == [role]
        await directory.login(person.user_id, person.password)
        assert person.password not in repr(person)

    # A later run signs in as the same people.
    assert await ensure_people(pool, tenant, secrets_file) == first

    # Without the passwords (another data directory on the same database), the users that exist
    # are left alone: this run makes its own, and the runs after it reuse those.
    secrets_file.unlink()
    fresh = await ensure_people(pool, tenant, secrets_file)
    for role, person in fresh.items():
        assert person.user_id.startswith(f"{PEOPLE[role]}-")
        assert await _roles(pool, person.user_id, tenant) == [role]
        await directory.login(person.user_id, person.password)
    assert await ensure_people(pool, tenant, secrets_file) == fresh
