"""Webhook subscriptions to reload outcomes, and their durable, signed deliveries.

A tenant subscribes a URL (``POST /v1/policy-webhooks``); the answer shows the signing secret
once. Every reload outcome (``policy.canary_promoted``, ``policy.canary_rolled_back``) adds one
row per subscription to ``policy_admission.webhook_deliveries`` in the transaction of its event:
the outbox. :meth:`Webhooks.run` delivers due rows from every replica (rows are claimed with
``FOR UPDATE SKIP LOCKED`` and a lease, so a replica that dies mid-delivery leaves the row to be
tried again when the lease ends): each POST is retried in place a few times (tenacity, with
exponential backoff), then, still failing, the row is put back with a growing delay, until
:data:`MAX_ATTEMPTS` claims have failed.

Each delivery is a JSON body signed with HMAC-SHA256 over ``<timestamp>.<body>``:

``Mc-Webhook-Signature: t=<unix seconds>,v1=<hex digest>``

plus ``Mc-Webhook-Id``, ``Mc-Delivery-Id`` (the same on every retry: a receiver drops
duplicates by it) and ``Mc-Event-Type``. The secret never reaches an event, a log or an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import httpx
import structlog
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from libs.contracts import new_uuid7
from libs.errors import Conflict, InvalidInput, NotFound
from libs.eventbus.db import transaction
from libs.eventbus.store import EventStore
from libs.eventbus.uow import UnitOfWork

log = structlog.get_logger("policy_admission")

SIGNATURE_HEADER = "Mc-Webhook-Signature"
MAX_WEBHOOKS = 20
MAX_URL = 2000
MAX_ATTEMPTS = 12
TRIES_PER_ATTEMPT = 3
LEASE_S = 60.0
BATCH = 20


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The ``Mc-Webhook-Signature`` header value of ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify(secret: str, header: str, body: bytes, now: float, tolerance_s: float = 300.0) -> bool:
    """Whether ``header`` signs ``body`` with ``secret`` within ``tolerance_s`` of ``now`` (what a
    receiver checks)."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance_s:
        return False
    expected = sign(secret, body, timestamp).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


def check_url(url: str) -> str:
    """``webhook_url_invalid`` unless ``url`` is an absolute http(s) URL with a host."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        raise InvalidInput("webhook_url_invalid: not a URL") from None
    if parsed.scheme not in ("http", "https") or not parsed.host or len(url) > MAX_URL:
        raise InvalidInput(
            f"webhook_url_invalid: an absolute http or https URL of at most {MAX_URL} characters"
        )
    if parsed.userinfo:
        raise InvalidInput("webhook_url_invalid: credentials in the URL are not accepted")
    return url


class _Retryable(Exception):
    """A delivery that may succeed when tried again (a 5xx, 408, 429 or a transport error)."""


def _backoff_s(attempts: int, base_s: float) -> float:
    return float(min(base_s * 2 ** max(attempts - 1, 0), 3600.0))


class Webhooks:
    """Subscriptions, the outbox and its delivery loop."""

    def __init__(
        self,
        store: EventStore,
        *,
        interval_s: float = 0.5,
        backoff_base_s: float = 5.0,
        timeout_s: float = 5.0,
        max_attempts: int = MAX_ATTEMPTS,
    ) -> None:
        self.store = store
        self.interval_s = interval_s
        self.backoff_base_s = backoff_base_s
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self._wake = asyncio.Event()

    # -- subscriptions -------------------------------------------------------------------------

    async def create(self, tenant_id: str, url: str, actor: str) -> dict[str, Any]:
        """Subscribe ``url``; the answer holds the secret, shown this once."""
        check_url(url)
        webhook_id = str(new_uuid7())
        secret = "whsec_" + secrets.token_urlsafe(32)
        async with transaction(self.store.pool) as conn:
            cur = await conn.execute(
                "SELECT count(*) AS n FROM policy_admission.webhooks WHERE tenant_id = %s",
                (tenant_id,),
            )
            row = await cur.fetchone()
            if row is not None and int(row["n"]) >= MAX_WEBHOOKS:
                raise Conflict(f"webhook_limit: a tenant may hold at most {MAX_WEBHOOKS} webhooks")
            cur = await conn.execute(
                "INSERT INTO policy_admission.webhooks (tenant_id, webhook_id, url, secret, "
                "created_by) VALUES (%s, %s, %s, %s, %s) RETURNING created_at",
                (tenant_id, webhook_id, url, secret, actor),
            )
            created = await cur.fetchone()
        assert created is not None
        return {
            "webhook_id": webhook_id,
            "url": url,
            "created_by": actor,
            "created_at": _iso(created["created_at"]),
            "secret": secret,
        }

    async def listing(self, tenant_id: str) -> dict[str, Any]:
        """The tenant's subscriptions (never their secrets) and their pending deliveries."""
        async with transaction(self.store.pool) as conn:
            cur = await conn.execute(
                "SELECT w.webhook_id, w.url, w.created_by, w.created_at, "
                "count(d.delivery_id) FILTER (WHERE d.delivered_at IS NULL "
                "AND d.failed_at IS NULL) AS pending, "
                "count(d.delivery_id) FILTER (WHERE d.delivered_at IS NOT NULL) AS delivered, "
                "count(d.delivery_id) FILTER (WHERE d.failed_at IS NOT NULL) AS failed "
                "FROM policy_admission.webhooks w LEFT JOIN policy_admission.webhook_deliveries d "
                "ON d.tenant_id = w.tenant_id AND d.webhook_id = w.webhook_id "
                "WHERE w.tenant_id = %s GROUP BY w.webhook_id, w.url, w.created_by, w.created_at "
                "ORDER BY w.created_at",
                (tenant_id,),
            )
            rows = await cur.fetchall()
        return {
            "webhooks": [
                {
                    "webhook_id": r["webhook_id"],
                    "url": r["url"],
                    "created_by": r["created_by"],
                    "created_at": _iso(r["created_at"]),
                    "deliveries": {
                        "pending": int(r["pending"]),
                        "delivered": int(r["delivered"]),
                        "failed": int(r["failed"]),
                    },
                }
                for r in rows
            ]
        }

    async def delete(self, tenant_id: str, webhook_id: str) -> dict[str, Any]:
        """Unsubscribe; its undelivered rows go with it. 404 ``webhook_not_found``."""
        async with transaction(self.store.pool) as conn:
            cur = await conn.execute(
                "DELETE FROM policy_admission.webhooks WHERE tenant_id = %s AND webhook_id = %s",
                (tenant_id, webhook_id),
            )
            if cur.rowcount == 0:
                raise NotFound(f"webhook_not_found: no webhook {webhook_id!r}")
            await conn.execute(
                "DELETE FROM policy_admission.webhook_deliveries WHERE tenant_id = %s "
                "AND webhook_id = %s AND delivered_at IS NULL",
                (tenant_id, webhook_id),
            )
        return {"webhook_id": webhook_id, "deleted": True}

    # -- the outbox ----------------------------------------------------------------------------

    async def enqueue(
        self,
        uow: UnitOfWork,
        tenant_id: str,
        reload_id: str,
        event_type: str,
        payload: Mapping[str, Any],
    ) -> int:
        """One delivery per subscription of the tenant, in ``uow`` (the outcome's transaction)."""
        conn = uow.conn
        if conn is None:  # pragma: no cover - begin() always has a connection
            raise NotFound("no database connection for the webhook outbox")
        cur = await conn.execute(
            "SELECT webhook_id FROM policy_admission.webhooks WHERE tenant_id = %s",
            (tenant_id,),
        )
        hooks = [r["webhook_id"] for r in await cur.fetchall()]
        body = json.dumps(payload, sort_keys=True, default=str)
        for webhook_id in hooks:
            await conn.execute(
                "INSERT INTO policy_admission.webhook_deliveries (delivery_id, tenant_id, "
                "webhook_id, reload_id, event_type, payload) VALUES (%s, %s, %s, %s, %s, %s)",
                (str(new_uuid7()), tenant_id, webhook_id, reload_id, event_type, body),
            )
        if hooks:
            self._wake.set()
        return len(hooks)

    async def deliver_due(self, client: httpx.AsyncClient) -> int:
        """Claim and try every due delivery; how many were delivered."""
        async with transaction(self.store.pool) as conn:
            cur = await conn.execute(
                "UPDATE policy_admission.webhook_deliveries d "
                "SET attempts = d.attempts + 1, "
                "next_attempt_at = now() + make_interval(secs => %s) "
                "FROM policy_admission.webhooks w "
                "WHERE w.tenant_id = d.tenant_id AND w.webhook_id = d.webhook_id "
                "AND d.delivery_id IN (SELECT delivery_id FROM policy_admission.webhook_deliveries "
                "WHERE delivered_at IS NULL AND failed_at IS NULL AND next_attempt_at <= now() "
                "ORDER BY next_attempt_at LIMIT %s FOR UPDATE SKIP LOCKED) "
                "RETURNING d.delivery_id, d.webhook_id, d.event_type, d.payload::text AS body, "
                "d.attempts, w.url, w.secret",
                (LEASE_S, BATCH),
            )
            claimed = await cur.fetchall()
        if not claimed:
            return 0
        results = await asyncio.gather(*(self._deliver(client, row) for row in claimed))
        return sum(results)

    async def _deliver(self, client: httpx.AsyncClient, row: Mapping[str, Any]) -> int:
        body = json.dumps(json.loads(row["body"]), sort_keys=True, separators=(",", ":")).encode()
        error: str | None = None
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(TRIES_PER_ATTEMPT),
                wait=wait_exponential(multiplier=min(self.backoff_base_s, 1.0) / 10, max=2.0),
                retry=retry_if_exception_type(_Retryable),
                reraise=True,
            ):
                with attempt:
                    await self._post(client, row, body)
        except _Retryable as exc:
            error = str(exc)
        except httpx.HTTPError as exc:  # pragma: no cover - mapped to _Retryable in _post
            error = type(exc).__name__
        except _Refused as exc:
            error = str(exc)
        attempts = int(row["attempts"])
        async with transaction(self.store.pool) as conn:
            if error is None:
                await conn.execute(
                    "UPDATE policy_admission.webhook_deliveries SET delivered_at = now(), "
                    "last_error = NULL WHERE delivery_id = %s",
                    (row["delivery_id"],),
                )
            elif attempts >= self.max_attempts:
                await conn.execute(
                    "UPDATE policy_admission.webhook_deliveries SET failed_at = now(), "
                    "last_error = %s WHERE delivery_id = %s",
                    (error[:200], row["delivery_id"]),
                )
            else:
                await conn.execute(
                    "UPDATE policy_admission.webhook_deliveries SET last_error = %s, "
                    "next_attempt_at = now() + make_interval(secs => %s) WHERE delivery_id = %s",
                    (error[:200], _backoff_s(attempts, self.backoff_base_s), row["delivery_id"]),
                )
        if error is not None:
            log.warning(
                "policy_webhook.delivery_failed",
                webhook_id=row["webhook_id"],
                delivery_id=row["delivery_id"],
                attempts=attempts,
                error=error[:200],
            )
        return 1 if error is None else 0

    async def _post(self, client: httpx.AsyncClient, row: Mapping[str, Any], body: bytes) -> None:
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(row["secret"], body, int(time.time())),
            "Mc-Webhook-Id": row["webhook_id"],
            "Mc-Delivery-Id": row["delivery_id"],
            "Mc-Event-Type": row["event_type"],
        }
        try:
            resp = await client.post(row["url"], content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise _Retryable(f"transport: {type(exc).__name__}") from None
        if 200 <= resp.status_code < 300:
            return
        if resp.status_code >= 500 or resp.status_code in (408, 429):
            raise _Retryable(f"status {resp.status_code}")
        raise _Refused(f"status {resp.status_code}")

    async def run(self) -> None:
        """Deliver until cancelled; a failed round is logged and retried at the next tick."""
        async with httpx.AsyncClient(timeout=self.timeout_s, follow_redirects=False) as client:
            while True:
                try:
                    while await self.deliver_due(client):
                        pass
                except Exception as exc:
                    log.warning("policy_webhook.round_failed", error=type(exc).__name__)
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.interval_s)


class _Refused(Exception):
    """A 4xx answer: tried again later like any failure, but not in place."""


def _iso(value: datetime) -> str:
    return value.isoformat()
