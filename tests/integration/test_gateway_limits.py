"""Revocation on every gateway replica within a second, also across a dropped LISTEN connection,
and the rate limits per API key and per tenant (429 with Retry-After naming the limit).

Two gateway apps run in-process with the service host's real wiring (``create_app`` and its
lifespan) on the same PostgreSQL and NATS, as two replicas would; a small RPC stand-in answers
the one route used, so what is observed is the gateway's own authentication and limits.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg
import pytest

from libs.eventbus.db import open_pool
from libs.eventbus.jetstream import connect
from libs.eventbus.rpc import RpcServer
from libs.settings import Settings
from services.gateway.bootstrap import create_app
from services.gateway.keys import LISTENER_NAME, create_tenant, issue_key, revoke_key
from tests.conftest import System, wait_until

pytestmark = pytest.mark.integration

REVOCATION_DEADLINE_S = 1.0


@dataclass
class Replicas:
    http: list[httpx.AsyncClient]
    pool: Any
    admin_url: str

    async def key(self, tenant: str) -> str:
        await create_tenant(self.pool, tenant, exist_ok=True, actor="test")
        return await issue_key(self.pool, tenant, "test")

    def listeners(self) -> int:
        with psycopg.connect(self.admin_url) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                (LISTENER_NAME,),
            ).fetchone()
        return int(row[0]) if row else 0

    def drop_listeners(self) -> int:
        with psycopg.connect(self.admin_url) as conn:
            rows = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = %s",
                (LISTENER_NAME,),
            ).fetchall()
        return len(rows)


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def _replicas(
    system: System, tmp_path_factory: Any, n: int, **limits: Any
) -> AsyncIterator[Replicas]:
    pool = await open_pool(system.service_url, max_size=4)
    nc = await connect(system.nats_url, "test-gateway-limits")
    audit = RpcServer(nc, "audit")

    async def policies(p: dict[str, Any], h: dict[str, str]) -> Any:
        return {"bundle_digest": "sha256:test", "activated_at": None, "policies": []}

    audit.route("policies", policies)
    await audit.start()
    # GET /v1/policies also asks policy-admission what decides for the tenant.
    admission = RpcServer(nc, "admission")

    async def status(p: dict[str, Any], h: dict[str, str]) -> Any:
        return {"environments": {}, "settings": {"version": 0, "settings": {}}}

    admission.route("status", status)
    await admission.start()
    async with AsyncExitStack() as stack:
        clients = []
        for i in range(n):
            settings = Settings(
                nats_url=system.nats_url,
                database_url=system.service_url,
                MC_DATA_DIR=str(tmp_path_factory.mktemp(f"gw{i}")),
                **limits,
            )
            app = create_app(settings)
            await stack.enter_async_context(app.router.lifespan_context(app))
            transport = httpx.ASGITransport(app=app)
            clients.append(
                await stack.enter_async_context(
                    httpx.AsyncClient(transport=transport, base_url=f"http://gateway-{i}")
                )
            )
        yield Replicas(clients, pool, system.admin_url)
    await audit.stop()
    await admission.stop()
    await nc.close()
    await pool.close()


@pytest.fixture
async def replicas(system: System, tmp_path_factory: Any) -> AsyncIterator[Replicas]:
    async for r in _replicas(system, tmp_path_factory, 2):
        yield r


async def _refused_everywhere_within(r: Replicas, key: str, deadline_s: float) -> float:
    """Seconds until every replica answers ``key`` with 401 (fails past ``deadline_s``)."""
    started = time.monotonic()
    pending = set(range(len(r.http)))
    while pending:
        for i in sorted(pending):
            resp = await r.http[i].get("/v1/policies", headers=_auth(key))
            if resp.status_code == 401:
                pending.discard(i)
            else:
                assert resp.status_code == 200, resp.text
        elapsed = time.monotonic() - started
        assert elapsed < deadline_s, f"replicas {sorted(pending)} still accept after {elapsed}s"
    return time.monotonic() - started


async def _accepted_everywhere(r: Replicas, key: str) -> None:
    for http in r.http:
        resp = await http.get("/v1/policies", headers=_auth(key))
        assert resp.status_code == 200, resp.text  # and now cached on that replica


async def test_a_revoked_key_is_refused_by_every_replica_within_a_second(
    replicas: Replicas, tenant: str
) -> None:
    await wait_until(lambda: replicas.listeners() >= 2, what="both replicas listening")
    key = await replicas.key(tenant)
    await _accepted_everywhere(replicas, key)
    await revoke_key(replicas.pool, key.split("_")[1])
    took = await _refused_everywhere_within(replicas, key, REVOCATION_DEADLINE_S)
    assert took < REVOCATION_DEADLINE_S


async def test_a_dropped_listen_connection_still_refuses_within_a_second_and_reconnects(
    replicas: Replicas, tenant: str
) -> None:
    await wait_until(lambda: replicas.listeners() >= 2, what="both replicas listening")
    key = await replicas.key(tenant)
    await _accepted_everywhere(replicas, key)
    assert replicas.drop_listeners() >= 2
    # Revoked while nobody listens: the notification is lost, and still no replica accepts it.
    await revoke_key(replicas.pool, key.split("_")[1])
    await _refused_everywhere_within(replicas, key, REVOCATION_DEADLINE_S)
    # Both replicas listen again, and then follow revocations as before.
    await wait_until(lambda: replicas.listeners() >= 2, timeout=10, what="listening again")
    second = await replicas.key(tenant)
    await _accepted_everywhere(replicas, second)
    await revoke_key(replicas.pool, second.split("_")[1])
    await _refused_everywhere_within(replicas, second, REVOCATION_DEADLINE_S)


# --- rate limits ---------------------------------------------------------------------------------


@pytest.fixture
async def limited(system: System, tmp_path_factory: Any) -> AsyncIterator[Replicas]:
    limits = {
        "MC_RATE_LIMIT_KEY_RPS": 0.5,
        "MC_RATE_LIMIT_KEY_BURST": 3,
        "MC_RATE_LIMIT_TENANT_RPS": 100,
        "MC_RATE_LIMIT_TENANT_BURST": 100,
        "MC_RATE_LIMIT_TENANTS": "rl-small=0.5:4",
    }
    async for r in _replicas(system, tmp_path_factory, 1, **limits):
        yield r


async def test_a_key_over_its_rate_gets_429_with_retry_after_naming_the_limit(
    limited: Replicas, tenant: str
) -> None:
    key = await limited.key(tenant)
    http = limited.http[0]
    for _ in range(3):  # the burst
        assert (await http.get("/v1/policies", headers=_auth(key))).status_code == 200
    resp = await http.get("/v1/policies", headers=_auth(key))
    assert resp.status_code == 429
    assert int(resp.headers["retry-after"]) >= 1
    error = resp.json()["error"]
    assert error["code"] == "rate_limited"
    assert f"key {key.split('_')[1]!r}" in error["message"]
    assert "0.5 requests per second (burst 3)" in error["message"]
    # Another key of the same tenant has its own bucket.
    other = await limited.key(tenant)
    assert (await http.get("/v1/policies", headers=_auth(other))).status_code == 200
    # Counted as rate limited, not as shed for load.
    metrics = (await http.get("/metrics")).text
    assert 'mc_gateway_rate_limited_total{limit="key"}' in metrics
    assert "mc_gateway_shed_total{" not in metrics


async def test_a_tenant_over_its_own_rate_is_refused_whatever_key_it_uses(
    limited: Replicas,
) -> None:
    http = limited.http[0]
    keys = [await limited.key("rl-small") for _ in range(3)]
    statuses = [(await http.get("/v1/policies", headers=_auth(k))).status_code for k in keys + keys]
    assert statuses == [200, 200, 200, 200, 429, 429]  # the tenant's burst of 4, over 3 keys
    resp = await http.get("/v1/policies", headers=_auth(keys[0]))
    assert resp.status_code == 429
    assert "tenant 'rl-small'" in resp.json()["error"]["message"]


async def test_invalid_keys_spend_no_ones_budget(limited: Replicas, tenant: str) -> None:
    key = await limited.key(tenant)
    key_id = key.split("_")[1]
    forged = f"mc_{key_id}_{'A' * 43}"
    http = limited.http[0]
    for _ in range(10):
        assert (await http.get("/v1/policies", headers=_auth(forged))).status_code == 401
    assert (await http.get("/v1/policies", headers=_auth(key))).status_code == 200
