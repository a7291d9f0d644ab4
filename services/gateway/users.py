"""Users and their roles per tenant in PostgreSQL (schema ``gateway``), and their lookup.

``mctl user`` creates, disables and grants through these functions; each change is recorded in the
store in the same transaction (``user.created`` and ``user.disabled`` in the system's streams,
``user.role_granted`` and ``user.role_revoked`` in the tenant's), and notifies
:data:`USER_CHANNEL`, so gateways drop the user from their cache when it commits.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache

from psycopg_pool import AsyncConnectionPool

from libs.contracts import stream_id_for
from libs.contracts.events import UserCreated, UserDisabled, UserRoleGranted, UserRoleRevoked
from libs.errors import Conflict, InvalidInput, NotFound, Unauthorized
from libs.eventbus.db import AsyncConn, transaction
from services.gateway.domain import check_tenant_id, hash_password, password_matches
from services.gateway.keys import CACHE_MAX_ENTRIES, CACHE_TTL_S, record_event
from services.gateway.rbac import check_role, check_user_id

USER_CHANNEL = "mc_user_changed"
# Users are global: their own records live in the streams of the reserved tenant.
SYSTEM_TENANT = "system"
USER_CATEGORY = "user"
MAX_LISTED_MEMBERS = 1000


@dataclass(frozen=True)
class UserRecord:
    """A user as the gateway sees it: enabled or not, and the roles held per tenant."""

    user_id: str
    disabled: bool
    grants: Mapping[str, frozenset[str]] = field(default_factory=dict)
    created_at: datetime | None = None


UserEvent = UserCreated | UserDisabled | UserRoleGranted | UserRoleRevoked


async def _record_change(
    pool: AsyncConnectionPool,
    conn: AsyncConn,
    event: UserEvent,
    tenant_id: str,
    actor: str,
    *,
    new: bool = False,
) -> None:
    """Record ``event`` in ``<tenant>/user/<id>`` and tell the gateways, both at commit."""
    stream_id = stream_id_for(tenant_id, USER_CATEGORY, event.user_id)
    await record_event(
        pool, conn, event, tenant_id=tenant_id, stream_id=stream_id, actor=actor, new=new
    )
    await conn.execute("SELECT pg_notify(%s, %s)", (USER_CHANNEL, event.user_id))


async def create_user(
    pool: AsyncConnectionPool, user_id: str, password: str, *, actor: str = "mctl"
) -> None:
    """Create a user of the embedded identity provider (no roles yet)."""
    user_id = check_user_id(user_id)
    hashed = await asyncio.to_thread(hash_password, password)
    async with transaction(pool) as conn:
        cur = await conn.execute(
            "INSERT INTO gateway.users (user_id, password_hash) VALUES (%s, %s) "
            "ON CONFLICT (user_id) DO NOTHING RETURNING user_id",
            (user_id, hashed),
        )
        if await cur.fetchone() is None:
            raise Conflict(f"user {user_id!r} already exists")
        await _record_change(
            pool, conn, UserCreated(user_id=user_id), SYSTEM_TENANT, actor, new=True
        )


async def disable_user(pool: AsyncConnectionPool, user_id: str, *, actor: str = "mctl") -> bool:
    """Disable a user; gateways refuse their tokens once it commits. ``False``: already was."""
    async with transaction(pool) as conn:
        cur = await conn.execute(
            "SELECT disabled_at FROM gateway.users WHERE user_id = %s FOR UPDATE", (user_id,)
        )
        row = await cur.fetchone()
        if row is None:
            raise NotFound(f"user {user_id!r} does not exist")
        if row["disabled_at"] is not None:
            return False
        await conn.execute(
            "UPDATE gateway.users SET disabled_at = now() WHERE user_id = %s", (user_id,)
        )
        await _record_change(pool, conn, UserDisabled(user_id=user_id), SYSTEM_TENANT, actor)
    return True


async def grant_role(
    pool: AsyncConnectionPool, user_id: str, tenant_id: str, role: str, *, actor: str = "mctl"
) -> bool:
    """Give ``user_id`` ``role`` in ``tenant_id``; ``False`` when they held it already."""
    checked_role = check_role(role)
    tenant_id = check_tenant_id(tenant_id)
    async with transaction(pool) as conn:
        await _require(conn, user_id, tenant_id)
        cur = await conn.execute(
            "INSERT INTO gateway.role_grants (user_id, tenant_id, role) VALUES (%s, %s, %s) "
            "ON CONFLICT (user_id, tenant_id, role) DO UPDATE "
            "SET granted_at = now(), revoked_at = NULL "
            "WHERE gateway.role_grants.revoked_at IS NOT NULL RETURNING role",
            (user_id, tenant_id, checked_role),
        )
        if await cur.fetchone() is None:
            return False
        await _record_change(
            pool, conn, UserRoleGranted(user_id=user_id, role=checked_role), tenant_id, actor
        )
    return True


async def revoke_role(
    pool: AsyncConnectionPool, user_id: str, tenant_id: str, role: str, *, actor: str = "mctl"
) -> None:
    """Take ``role`` in ``tenant_id`` away from ``user_id``; gateways stop honouring it at
    commit."""
    checked_role = check_role(role)
    async with transaction(pool) as conn:
        cur = await conn.execute(
            "UPDATE gateway.role_grants SET revoked_at = now() "
            "WHERE user_id = %s AND tenant_id = %s AND role = %s AND revoked_at IS NULL "
            "RETURNING role",
            (user_id, tenant_id, checked_role),
        )
        if await cur.fetchone() is None:
            raise NotFound(f"user {user_id!r} holds no role {role!r} in tenant {tenant_id!r}")
        await _record_change(
            pool, conn, UserRoleRevoked(user_id=user_id, role=checked_role), tenant_id, actor
        )


async def _require(conn: AsyncConn, user_id: str, tenant_id: str) -> None:
    cur = await conn.execute("SELECT 1 FROM gateway.users WHERE user_id = %s", (user_id,))
    if await cur.fetchone() is None:
        raise NotFound(f"user {user_id!r} does not exist")
    cur = await conn.execute("SELECT 1 FROM gateway.tenants WHERE tenant_id = %s", (tenant_id,))
    if await cur.fetchone() is None:
        raise NotFound(f"tenant {tenant_id!r} does not exist")


_SELECT_USERS = (
    "SELECT u.user_id, u.created_at, u.disabled_at, u.password_hash, "
    "coalesce(array_agg(g.tenant_id || ':' || g.role) FILTER (WHERE g.role IS NOT NULL), '{}') "
    "AS grants "
    "FROM gateway.users u LEFT JOIN gateway.role_grants g "
    "ON g.user_id = u.user_id AND g.revoked_at IS NULL "
)


def _user_of(row: Mapping[str, object]) -> UserRecord:
    grants: dict[str, set[str]] = {}
    for pair in row["grants"]:  # type: ignore[attr-defined]
        tenant, role = str(pair).rsplit(":", 1)
        grants.setdefault(tenant, set()).add(role)
    return UserRecord(
        user_id=str(row["user_id"]),
        disabled=row["disabled_at"] is not None,
        grants={t: frozenset(r) for t, r in grants.items()},
        created_at=row["created_at"],  # type: ignore[arg-type]
    )


async def list_users(pool: AsyncConnectionPool) -> list[UserRecord]:
    """Every user, by id."""
    async with transaction(pool) as conn:
        cur = await conn.execute(_SELECT_USERS + "GROUP BY u.user_id ORDER BY u.user_id")
        return [_user_of(row) for row in await cur.fetchall()]


async def tenant_members(pool: AsyncConnectionPool, tenant_id: str) -> list[dict[str, object]]:
    """The users holding a role in ``tenant_id``: their roles there and whether they are
    disabled, by id (no password hashes, no other tenants' roles)."""
    async with transaction(pool) as conn:
        cur = await conn.execute(
            "SELECT u.user_id, u.disabled_at IS NOT NULL AS disabled, "
            "array_agg(g.role ORDER BY g.role) AS roles "
            "FROM gateway.role_grants g JOIN gateway.users u ON u.user_id = g.user_id "
            "WHERE g.tenant_id = %s AND g.revoked_at IS NULL "
            "GROUP BY u.user_id, u.disabled_at ORDER BY u.user_id LIMIT %s",
            (tenant_id, MAX_LISTED_MEMBERS),
        )
        rows = await cur.fetchall()
    return [
        {"user_id": r["user_id"], "roles": list(r["roles"]), "disabled": bool(r["disabled"])}
        for r in rows
    ]


async def _load(pool: AsyncConnectionPool, user_id: str) -> tuple[UserRecord, str] | None:
    async with transaction(pool) as conn:
        cur = await conn.execute(
            _SELECT_USERS + "WHERE u.user_id = %s GROUP BY u.user_id", (user_id,)
        )
        row = await cur.fetchone()
    return None if row is None else (_user_of(row), str(row["password_hash"]))


_LOGIN_REFUSED = "wrong user name or password, or the user is disabled"


@cache
def _absent_hash() -> str:
    """Compared against when the user does not exist, so an unknown name costs as long as a wrong
    password and the answer's timing does not tell which names exist."""
    return hash_password("x" * 16)


@dataclass(frozen=True)
class _Cached:
    record: UserRecord | None
    expires_at: float


class UserDirectory:
    """The users the gateway authenticates, cached like :class:`~services.gateway.keys.KeyVerifier`
    caches keys: a change (disable, grant, revoke) evicts its user as soon as it commits
    (:data:`USER_CHANNEL`), and ``ttl`` bounds staleness when a notification is missed.

    Absent users are cached too: the ids looked up come only from validly signed tokens.
    """

    def __init__(
        self,
        pool: AsyncConnectionPool,
        ttl: float = CACHE_TTL_S,
        max_entries: int = CACHE_MAX_ENTRIES,
    ) -> None:
        self.pool = pool
        self.ttl = ttl
        self.max_entries = max_entries
        self._cache: dict[str, _Cached] = {}

    async def get(self, user_id: str) -> UserRecord | None:
        """The user named ``user_id`` as of the last change, or ``None``."""
        now = time.monotonic()
        hit = self._cache.get(user_id)
        if hit is not None and hit.expires_at > now:
            return hit.record
        loaded = await _load(self.pool, user_id)
        record = loaded[0] if loaded else None
        if len(self._cache) >= self.max_entries:
            self._cache.clear()
        self._cache[user_id] = _Cached(record, now + self.ttl)
        return record

    async def login(self, user_id: str, password: str) -> UserRecord:
        """The enabled user whose password this is; :class:`Unauthorized` otherwise, with one
        message whatever was wrong."""
        try:
            check_user_id(user_id)
        except InvalidInput:
            raise Unauthorized(_LOGIN_REFUSED) from None
        loaded = await _load(self.pool, user_id)
        stored = loaded[1] if loaded else _absent_hash()
        matches = await asyncio.to_thread(password_matches, stored, password)
        if loaded is None or not matches or loaded[0].disabled:
            raise Unauthorized(_LOGIN_REFUSED)
        return loaded[0]

    def forget(self, user_id: str) -> None:
        """Drop ``user_id`` from the cache (their row changed)."""
        self._cache.pop(user_id, None)

    def forget_all(self) -> None:
        """Drop every cached user."""
        self._cache.clear()
