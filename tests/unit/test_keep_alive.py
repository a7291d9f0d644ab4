"""Idle connections: a client must drop one before the gateway does. At equal keep-alive times
the gateway closes a connection as the client sends on it, and the request fails with a
ReadError (a worker's step failed that way while it waited for an approval)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from services.gateway import bootstrap
from services.gateway.client import KEEPALIVE_EXPIRY_S, AsyncMissionControlClient

pytestmark = pytest.mark.unit


def test_the_gateway_keeps_idle_connections_longer_than_its_clients(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    served: dict[str, Any] = {}
    monkeypatch.setattr(bootstrap, "create_app", lambda settings: object())
    monkeypatch.setattr(bootstrap.uvicorn, "run", lambda app, **kw: served.update(kw))
    bootstrap.main()
    gateway = served["timeout_keep_alive"]
    # The SDK's clients and any plain httpx client (whose default is 5 s) give up first.
    assert gateway > KEEPALIVE_EXPIRY_S
    assert httpx.Limits().keepalive_expiry is not None
    assert httpx.Limits().keepalive_expiry < gateway


async def test_the_sdk_client_drops_idle_connections_before_the_gateway() -> None:
    client = AsyncMissionControlClient("http://127.0.0.1:9", "mc_key")
    try:
        pool = client._http._transport._pool  # type: ignore[attr-defined]
        assert pool._keepalive_expiry == KEEPALIVE_EXPIRY_S
        assert pool._keepalive_expiry < bootstrap.KEEP_ALIVE_S
    finally:
        await client.aclose()
