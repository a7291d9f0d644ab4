"""Tenants and API keys in PostgreSQL (schema ``gateway``), and the verification of presented keys.

Used by the gateway service (verification, on every request) and by ``mctl tenant`` and the demo
(creation and issuing, through :func:`provision_tenant` and :func:`run_with_pool`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

import psycopg
import structlog
from psycopg_pool import AsyncConnectionPool

from libs.contracts import DomainEvent, envelope_for, new_uuid7, stream_id_for
from libs.contracts.events import ApiKeyIssued, ApiKeyRevoked
from libs.errors import Conflict, NotFound, Unauthorized, first_line
from libs.eventbus.db import AsyncConn, open_pool, transaction
from libs.eventbus.store import EventStore
from services.gateway.domain import (
    check_tenant_id,
    decide_create_tenant,
    generate_key,
    parse_key,
    secret_matches,
)
from services.gateway.rbac import KeyPrincipal, check_scopes

T = TypeVar("T")

log = structlog.get_logger("gateway.keys")

CACHE_TTL_S = 30.0
CACHE_MAX_ENTRIES = 10_000
# revoke_key notifies this channel with the key id, in the revoking transaction.
REVOKED_CHANNEL = "mc_api_key_revoked"
TENANT_CATEGORY = "tenant"
API_KEY_CATEGORY = "api_key"
"""Streams ``<tenant>/tenant/<tenant>``: each tenant's own history (``tenant.created``)."""
RELISTEN_DELAY_S = 1.0
# How often the listening connection is probed while no notification arrives: a connection that
# died without closing (a dropped route, a killed backend behind a proxy) is noticed this fast.
LISTEN_PROBE_S = 0.5
# The listening connection's application_name, so operators can find it in pg_stat_activity.
LISTENER_NAME = "mc-gateway-revocations"


async def create_tenant(
    pool: AsyncConnectionPool,
    tenant_id: str,
    name: str | None = None,
    *,
    exist_ok: bool = False,
    actor: str = "mctl",
) -> bool:
    """Create a tenant and append ``tenant.created`` in the same transaction.

    Returns ``False`` when the tenant already existed and ``exist_ok``; raises :class:`Conflict`
    when it existed and not ``exist_ok``.
    """
    event = decide_create_tenant(tenant_id, name)
    stream_id = stream_id_for(event.tenant_id, TENANT_CATEGORY, event.tenant_id)
    async with transaction(pool) as conn:
        cur = await conn.execute(
            "INSERT INTO gateway.tenants (tenant_id, name) VALUES (%s, %s) "
            "ON CONFLICT (tenant_id) DO NOTHING RETURNING tenant_id",
            (event.tenant_id, event.name),
        )
        if await cur.fetchone() is None:
            if exist_ok:
                return False
            raise Conflict(f"tenant {event.tenant_id!r} already exists")
        await record_event(
            pool, conn, event, tenant_id=event.tenant_id, stream_id=stream_id, actor=actor, new=True
        )
    return True


async def record_event(
    pool: AsyncConnectionPool,
    conn: AsyncConn,
    event: DomainEvent,
    *,
    tenant_id: str,
    stream_id: str,
    actor: str,
    new: bool = False,
) -> None:
    """Append ``event`` in the caller's transaction, so the table change and its record commit
    together (``new``: the stream must not exist yet)."""
    envelope = envelope_for(
        event,
        tenant_id=tenant_id,
        stream_id=stream_id,
        correlation_id=str(new_uuid7()),
        actor=actor,
    )
    store = EventStore(pool)
    await store.append(stream_id, [envelope], expected_version=0 if new else None, conn=conn)


async def issue_key(
    pool: AsyncConnectionPool,
    tenant_id: str,
    name: str = "",
    scopes: Iterable[str] = (),
    *,
    actor: str = "mctl",
) -> str:
    """A new API key of ``tenant_id`` holding ``scopes`` (default: all); the returned token is the
    only copy of its secret. ``api_key.issued`` records it in the tenant's log."""
    tenant_id = check_tenant_id(tenant_id)
    granted = check_scopes(scopes)
    issued = generate_key()
    async with transaction(pool) as conn:
        cur = await conn.execute("SELECT 1 FROM gateway.tenants WHERE tenant_id = %s", (tenant_id,))
        if await cur.fetchone() is None:
            raise NotFound(f"tenant {tenant_id!r} does not exist")
        await conn.execute(
            "INSERT INTO gateway.api_keys (key_id, tenant_id, secret_hash, name, scopes) "
            "VALUES (%s, %s, %s, %s, %s)",
            (issued.key_id, tenant_id, issued.secret_hash, name, granted),
        )
        await record_event(
            pool,
            conn,
            ApiKeyIssued(key_id=issued.key_id, name=name, scopes=granted),
            tenant_id=tenant_id,
            stream_id=stream_id_for(tenant_id, API_KEY_CATEGORY, issued.key_id),
            actor=actor,
            new=True,
        )
    return issued.token


async def revoke_key(
    pool: AsyncConnectionPool, key_id: str, *, actor: str = "mctl", tenant_id: str | None = None
) -> None:
    """Revoke a key; gateways stop accepting it when the revocation commits.

    The notification on :data:`REVOKED_CHANNEL` is delivered at commit; a gateway that is not
    listening at that moment still stops within :data:`CACHE_TTL_S` seconds. The first revocation
    is recorded as ``api_key.revoked``; revoking again changes nothing. With ``tenant_id`` (the
    API's callers) a key of another tenant does not exist.
    """
    async with transaction(pool) as conn:
        cur = await conn.execute(
            "SELECT tenant_id, revoked_at FROM gateway.api_keys WHERE key_id = %s FOR UPDATE",
            (key_id,),
        )
        row = await cur.fetchone()
        if row is None or (tenant_id is not None and row["tenant_id"] != tenant_id):
            raise NotFound(f"API key {key_id!r} does not exist")
        if row["revoked_at"] is not None:
            return
        await conn.execute(
            "UPDATE gateway.api_keys SET revoked_at = now() WHERE key_id = %s", (key_id,)
        )
        await record_event(
            pool,
            conn,
            ApiKeyRevoked(key_id=key_id),
            tenant_id=row["tenant_id"],
            stream_id=stream_id_for(row["tenant_id"], API_KEY_CATEGORY, key_id),
            actor=actor,
        )
        await conn.execute("SELECT pg_notify(%s, %s)", (REVOKED_CHANNEL, key_id))


MAX_LISTED_KEYS = 1000


async def list_keys(pool: AsyncConnectionPool, tenant_id: str) -> list[dict[str, object]]:
    """The tenant's API keys, newest first (at most :data:`MAX_LISTED_KEYS`): id, name, scopes,
    when issued and revoked. Never a secret: only its hash is kept, and it is not read here."""
    async with transaction(pool) as conn:
        cur = await conn.execute(
            "SELECT key_id, name, scopes, created_at, revoked_at FROM gateway.api_keys "
            "WHERE tenant_id = %s ORDER BY created_at DESC, key_id LIMIT %s",
            (tenant_id, MAX_LISTED_KEYS),
        )
        rows = await cur.fetchall()
    return [
        {
            "key_id": r["key_id"],
            "name": r["name"],
            "scopes": list(r["scopes"]),
            "created_at": _iso(r["created_at"]),
            "revoked_at": _iso(r["revoked_at"]),
        }
        for r in rows
    ]


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class _CachedKey:
    tenant_id: str
    secret_hash: bytes
    scopes: frozenset[str]
    expires_at: float


class KeyVerifier:
    """Turns a presented API key into a :class:`KeyPrincipal`, or raises :class:`Unauthorized`.

    Valid keys' rows are cached for ``ttl`` seconds so a request costs one hash, not a database
    round trip. :meth:`follow_revocations` evicts a key as soon as its revocation commits. While
    a follower runs but is not listening (its connection dropped, it is reconnecting), the cache
    is not trusted: every request reads the key's row, so a revocation committed in the gap is
    refused at once, and the cache is emptied when listening resumes. ``ttl`` bounds the rest
    (a verifier nobody follows revocations for).
    Unknown and revoked keys are not cached: they are rare, and caching them would let a flood of
    made-up key ids evict the real ones.
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
        self._cache: dict[str, _CachedKey] = {}
        self._following = False
        self.listening = False
        """Whether revocations are being followed right now (the cache is trusted only then)."""

    def _trusted(self, row: _CachedKey | None, now: float) -> bool:
        if row is None or row.expires_at <= now:
            return False
        return self.listening or not self._following

    async def verify(self, token: str) -> KeyPrincipal:
        """The principal ``token`` authenticates."""
        parsed = parse_key(token)
        now = time.monotonic()
        row = self._cache.get(parsed.key_id)
        if row is None or not self._trusted(row, now):
            row = await self._load(parsed.key_id, now)
        if not secret_matches(parsed.secret, row.secret_hash):
            raise Unauthorized("invalid or revoked API key")
        return KeyPrincipal(row.tenant_id, parsed.key_id, row.scopes)

    async def _load(self, key_id: str, now: float) -> _CachedKey:
        async with transaction(self.pool) as conn:
            cur = await conn.execute(
                "SELECT tenant_id, secret_hash, scopes FROM gateway.api_keys "
                "WHERE key_id = %s AND revoked_at IS NULL",
                (key_id,),
            )
            found = await cur.fetchone()
        if found is None:
            self._cache.pop(key_id, None)
            raise Unauthorized("invalid or revoked API key")
        row = _CachedKey(
            found["tenant_id"],
            bytes(found["secret_hash"]),
            frozenset(found["scopes"]),
            now + self.ttl,
        )
        if len(self._cache) >= self.max_entries:
            self._evict(now)
        self._cache[key_id] = row
        return row

    def forget(self, key_id: str) -> None:
        """Drop ``key_id`` from the cache (its row changed)."""
        self._cache.pop(key_id, None)

    def forget_all(self) -> None:
        """Drop every cached key."""
        self._cache.clear()

    def set_listening(self, listening: bool) -> None:
        """Told by the notification follower whether it listens now: the cache is trusted only
        while it does, since a revocation notified in a gap would be missed."""
        self._following = True
        self.listening = listening

    async def follow_revocations(self, database_url: str) -> None:
        """Evict keys from the cache as their revocations commit, until cancelled."""
        await follow_notifications(
            database_url, {REVOKED_CHANNEL: self.forget}, self.forget_all, self.set_listening
        )

    def _evict(self, now: float) -> None:
        for key_id in [k for k, v in self._cache.items() if v.expires_at <= now]:
            del self._cache[key_id]
        while len(self._cache) >= self.max_entries:
            # Dicts keep insertion order: the first entry is the oldest load.
            del self._cache[next(iter(self._cache))]


async def follow_notifications(
    database_url: str,
    channels: Mapping[str, Callable[[str], None]],
    on_listen: Callable[[], None],
    on_state: Callable[[bool], None] | None = None,
) -> None:
    """Call ``channels[channel](payload)`` for each notification on those channels, until
    cancelled.

    Listens on a connection of its own (``application_name`` :data:`LISTENER_NAME`), probed every
    :data:`LISTEN_PROBE_S` seconds without notifications, so a connection that dropped silently
    is noticed within a second. Notifications sent while it is not listening are lost, so
    ``on_listen`` (which empties the caches they keep fresh) runs each time listening (re)starts,
    and ``on_state`` is told whether it listens, so a cache can stop trusting itself meanwhile.
    """
    state = on_state or (lambda _listening: None)
    while True:
        try:
            conn = await psycopg.AsyncConnection.connect(
                database_url, autocommit=True, connect_timeout=5, application_name=LISTENER_NAME
            )
            async with conn:
                for channel in channels:
                    await conn.execute(f"LISTEN {channel}")
                on_listen()
                state(True)
                while True:
                    async for note in conn.notifies(timeout=LISTEN_PROBE_S):
                        channels[note.channel](note.payload)
                    # No notification for a while: make sure the connection is still there (a
                    # probe that does not come back in time counts as a dropped connection).
                    await asyncio.wait_for(conn.execute("SELECT 1"), LISTEN_PROBE_S * 2)
        except (psycopg.Error, OSError, TimeoutError) as exc:
            log.warning("gateway.revocations_not_followed", error=first_line(exc))
        finally:
            state(False)
        await asyncio.sleep(RELISTEN_DELAY_S)


async def provision_tenant(
    pool: AsyncConnectionPool,
    tenant_id: str,
    name: str | None = None,
    *,
    exist_ok: bool = False,
    key_name: str = "",
    actor: str = "mctl",
    scopes: Iterable[str] = (),
) -> tuple[bool, str]:
    """Create ``tenant_id`` (unless it exists and ``exist_ok``) and issue it a key.

    Returns (whether the tenant was created now, the new key's token).
    """
    created = await create_tenant(pool, tenant_id, name, exist_ok=exist_ok, actor=actor)
    return created, await issue_key(pool, tenant_id, key_name, scopes, actor=actor)


def run_with_pool(database_url: str, work: Callable[[AsyncConnectionPool], Awaitable[T]]) -> T:
    """Run ``work(pool)`` on a short-lived pool, from synchronous code (the CLI, the demo)."""

    async def main() -> T:
        pool = await open_pool(database_url, min_size=1, max_size=2)
        try:
            return await work(pool)
        finally:
            await pool.close()

    return asyncio.run(main())
