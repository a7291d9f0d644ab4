"""Load shedding over real NATS and PostgreSQL: bounded services, 429 with Retry-After, metrics.

The gateway runs in-process (``create_app`` and its lifespan) behind ``httpx.ASGITransport`` with
small in-flight bounds; policy-admission and workflow-engine are the real services. Where a test
needs requests held in flight, a stand-in RPC server's handler waits on an event the test sets, so
"refused while the others were still in flight" is observed directly, never inferred from timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest
from fastapi import FastAPI
from prometheus_client import generate_latest

from libs.contracts import stream_id_for
from libs.contracts.events import AdmissionDecided
from libs.contracts.registry import decode
from libs.contracts.subjects import EVENTS_STREAM, rpc_subject
from libs.errors import Overloaded
from libs.eventbus.db import open_pool
from libs.eventbus.jetstream import connect, ensure_streams
from libs.eventbus.rpc import RpcClient, RpcServer
from libs.eventbus.store import EventStore
from libs.runtime.service_host import Service, ServiceContext, new_registry
from libs.settings import Settings, get_settings
from services.gateway.bootstrap import create_app
from services.gateway.client import ApiError, AsyncMissionControlClient
from services.gateway.keys import create_tenant, issue_key
from services.gateway.shedding import RETRY_AFTER_S
from services.policy_admission.bootstrap import PolicyAdmissionService
from services.workflow_engine.bootstrap import WorkflowEngineService
from services.workflow_engine.entrypoints import violation_consumer_spec
from tests.conftest import System, wait_until

pytestmark = pytest.mark.integration

Unique = Callable[[str], str]

AGENT_BOUND = 4
QUERY_BOUND = 2
ADMISSION = "/v1/runs/{run_id}/admissions"


@dataclass
class Held:
    """A stand-in route whose calls wait until the test releases them."""

    release: asyncio.Event = field(default_factory=asyncio.Event)
    entered: int = 0

    async def __call__(self, payload: dict[str, Any], headers: dict[str, str]) -> Any:
        self.entered += 1
        await self.release.wait()
        return {"run_id": payload.get("run_id", ""), "status": "running", "prices": {}}


# --- the RPC server's own bound -------------------------------------------------------------------


@asynccontextmanager
async def held_server(
    system: System, service: str, max_in_flight: int | None = None
) -> AsyncIterator[tuple[Any, RpcServer, Held]]:
    """A NATS connection and a started RPC server of ``service`` whose ``work`` route is held."""
    nc = await connect(system.nats_url, f"test-{service}")
    held = Held()
    server = RpcServer(nc, service, max_in_flight=max_in_flight)
    server.route("work", held)
    await server.start()
    try:
        yield nc, server, held
    finally:
        held.release.set()
        await server.stop()
        await nc.close()


async def test_an_rpc_server_refuses_above_its_bound_at_once(
    system: System, unique: Unique
) -> None:
    service = unique("shed")
    async with held_server(system, service, max_in_flight=2) as (nc, server, held):
        client = RpcClient(nc, default_timeout=30)
        first = [asyncio.create_task(client.call(service, "work", {"n": i})) for i in range(2)]
        await wait_until(lambda: server.in_flight == 2, what="two requests in flight")
        # The two in flight are still held: these answers cannot have waited for them.
        for i in range(3):
            with pytest.raises(Overloaded, match="limit of 2 requests in flight"):
                await client.call(service, "work", {"n": 10 + i})
        assert held.entered == 2
        assert server.refused == 3
        metrics = generate_latest(new_registry()).decode()
        assert f'mc_rpc_refused_total{{service="{service}"}} 3.0' in metrics
        assert f'mc_rpc_in_flight{{service="{service}"}} 2.0' in metrics
        held.release.set()
        assert len(await asyncio.gather(*first)) == 2
        await wait_until(lambda: server.in_flight == 0, what="in-flight requests finished")
        # Below the bound again, requests are served.
        assert (await client.call(service, "work", {"n": 99}))["status"] == "running"
        assert held.entered == 3


async def test_a_request_past_its_deadline_is_answered_without_being_worked_on(
    system: System, unique: Unique
) -> None:
    service = unique("late")
    async with held_server(system, service) as (nc, server, held):
        held.release.set()
        past = str(int(time.time() * 1000) - 1000)
        msg = await nc.request(
            rpc_subject(service, "work"), b"{}", timeout=10, headers={"Mc-Deadline": past}
        )
        reply = orjson.loads(msg.data)
        assert reply["ok"] is False
        assert reply["error"]["code"] == "deadline_exceeded"
        assert held.entered == 0
        assert server.expired == 1


# --- the gateway ----------------------------------------------------------------------------------


@dataclass
class Shedding:
    """The in-process gateway with small bounds, and the held stand-ins behind it."""

    app: FastAPI
    http: httpx.AsyncClient
    transport: httpx.ASGITransport
    store: EventStore
    key: str
    tenant: str
    runs: list[str]
    audit: Held
    audit_server: RpcServer
    cost: Held
    cost_server: RpcServer


@pytest.fixture(scope="module")
async def shedding(system: System, tmp_path_factory: Any) -> AsyncIterator[Shedding]:
    settings = Settings(
        nats_url=system.nats_url,
        database_url=system.service_url,
        MC_DATA_DIR=str(tmp_path_factory.mktemp("shed")),
        MC_GATEWAY_MAX_AGENT=AGENT_BOUND,
        MC_GATEWAY_MAX_QUERY=QUERY_BOUND,
    )
    pool = await open_pool(system.service_url, max_size=8)
    store = EventStore(pool)
    nc = await connect(system.nats_url, "test-shed-backends")
    js = nc.jetstream()
    await ensure_streams(js)
    wf_spec = violation_consumer_spec(durable="shed-test-wf-violations", tenant_id="shed-none")
    services: list[Service] = [
        WorkflowEngineService(violation_spec=wf_spec),
        PolicyAdmissionService(),
    ]
    for svc in services:
        await svc.start(ServiceContext.wire(svc.name, get_settings(), nc, pool))
        await wait_until(svc.ready, what=f"{svc.name} ready")
    # Stand-ins for the query side: audit may hold many requests, cost only one at a time.
    audit, cost = Held(), Held()
    audit_server = RpcServer(nc, "audit", max_in_flight=16)
    audit_server.route("run", audit)
    cost_server = RpcServer(nc, "cost", max_in_flight=1)
    cost_server.route("prices", cost)
    for s in (audit_server, cost_server):
        await s.start()

    tenant = "shed-tenant"
    await create_tenant(pool, tenant, exist_ok=True, actor="test")
    key = await issue_key(pool, tenant, "test")
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    headers = {"Authorization": f"Bearer {key}"}
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=transport, base_url="http://gateway", headers=headers, timeout=60
        ) as http,
    ):
        runs = []
        for i in range(20):
            resp = await http.post("/v1/runs", json={"agent_id": f"shed-agent-{i}"})
            assert resp.status_code == 201, resp.text
            runs.append(resp.json()["run_id"])
        yield Shedding(
            app, http, transport, store, key, tenant, runs, audit, audit_server, cost, cost_server
        )
    audit.release.set()
    cost.release.set()
    for s in (audit_server, cost_server):
        await s.stop()
    for svc in services:
        await svc.stop()
    with contextlib.suppress(Exception):
        await js.delete_consumer(EVENTS_STREAM, wf_spec.durable)
    await nc.close()
    await pool.close()


def _admission(i: int) -> dict[str, Any]:
    return {
        "step_index": i + 1,
        "kind": "llm_call",
        "model": "gpt-4o-mini",
        "estimate": {"input_tokens": 20, "max_output_tokens": 20},
    }


def _assert_overloaded(resp: httpx.Response, by: str) -> None:
    assert resp.status_code == 429, resp.text
    assert resp.headers["Retry-After"].isdigit()
    assert int(resp.headers["Retry-After"]) >= 1
    body = resp.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == "overloaded"
    assert by in body["error"]["message"]


async def _decision_ids(store: EventStore, tenant: str, run_id: str) -> set[str]:
    envs = await store.read_stream(stream_id_for(tenant, "decisions", run_id))
    return {e.decision_id for e in map(decode, envs) if isinstance(e, AdmissionDecided)}


async def test_a_flood_of_admissions_is_shed_with_429_and_every_200_is_durable(
    shedding: Shedding,
) -> None:
    flood = 200
    calls = [
        shedding.http.post(
            ADMISSION.format(run_id=shedding.runs[i % len(shedding.runs)]), json=_admission(i)
        )
        for i in range(flood)
    ]
    answers = await asyncio.gather(*calls)
    by_status: dict[int, list[tuple[int, httpx.Response]]] = {}
    for i, resp in enumerate(answers):
        by_status.setdefault(resp.status_code, []).append((i, resp))
    assert set(by_status) <= {200, 429}, {s: r[0][1].text for s, r in by_status.items()}
    assert by_status.get(200), "no admission got through"
    assert by_status.get(429), f"{flood} admissions at once with a bound of {AGENT_BOUND}"
    for _, resp in by_status[429]:
        _assert_overloaded(resp, "gateway")
    # Every answered decision is in the store: nothing was acknowledged and then lost.
    expected: dict[str, set[str]] = {}
    for i, resp in by_status[200]:
        run_id = shedding.runs[i % len(shedding.runs)]
        expected.setdefault(run_id, set()).add(resp.json()["decision_id"])
    for run_id, ids in expected.items():
        assert ids <= await _decision_ids(shedding.store, shedding.tenant, run_id)

    metrics = (await shedding.http.get("/metrics")).text
    shed = _sample(metrics, 'mc_gateway_shed_total{route_class="agent",source="gateway"}')
    assert shed >= len(by_status[429])
    route = f'method="POST",route="{ADMISSION}"'
    assert _sample(metrics, f'mc_gateway_requests_total{{{route},status_class="2xx"}}') >= len(
        by_status[200]
    )
    assert _sample(metrics, f'mc_gateway_requests_total{{{route},status_class="4xx"}}') >= len(
        by_status[429]
    )
    latency = f'mc_gateway_request_duration_seconds_count{{{route},status_class="2xx"}}'
    assert _sample(metrics, latency) >= len(by_status[200])
    # Series are per route template: no run id ever becomes a label value.
    assert not any(run_id in metrics for run_id in shedding.runs)
    assert _sample(metrics, 'mc_gateway_in_flight{route_class="agent"}') == 0
    # The bound adapts to the latency seen, never above the configured one.
    assert 2 <= _sample(metrics, 'mc_gateway_in_flight_limit{route_class="agent"}') <= AGENT_BOUND


async def test_queries_over_the_gateway_bound_get_429_while_admissions_still_pass(
    shedding: Shedding,
) -> None:
    held = shedding.audit
    held.release.clear()
    before = held.entered
    run_id = shedding.runs[0]
    in_flight = [
        asyncio.create_task(shedding.http.get(f"/v1/runs/{run_id}")) for _ in range(QUERY_BOUND)
    ]
    try:
        await wait_until(lambda: held.entered == before + QUERY_BOUND, what="queries in flight")
        resp = await shedding.http.get(f"/v1/runs/{run_id}")
        _assert_overloaded(resp, f"limit of {QUERY_BOUND} query requests")
        assert held.entered == before + QUERY_BOUND
        # The agent hot path has its own bound: a full query class does not block admission.
        admitted = await shedding.http.post(
            ADMISSION.format(run_id=shedding.runs[1]), json=_admission(1000)
        )
        assert admitted.status_code == 200, admitted.text
    finally:
        held.release.set()
    assert [r.status_code for r in await asyncio.gather(*in_flight)] == [200] * QUERY_BOUND


async def test_an_overloaded_service_is_answered_429_with_retry_after(
    shedding: Shedding,
) -> None:
    held = shedding.cost
    held.release.clear()
    first = asyncio.create_task(shedding.http.get("/v1/prices"))
    try:
        await wait_until(lambda: shedding.cost_server.in_flight == 1, what="cost busy")
        resp = await shedding.http.get("/v1/prices")
        _assert_overloaded(resp, "cost is at its limit of 1 requests in flight")
        # The Python client hands the caller the wait the server asked for.
        client = AsyncMissionControlClient(
            "http://gateway", shedding.key, transport=shedding.transport
        )
        with pytest.raises(ApiError) as refused:
            await client.prices()
        assert (refused.value.status, refused.value.code) == (429, "overloaded")
        assert refused.value.retry_after == RETRY_AFTER_S
    finally:
        held.release.set()
    assert (await first).status_code == 200
    metrics = (await shedding.http.get("/metrics")).text
    assert _sample(metrics, 'mc_gateway_shed_total{route_class="query",source="upstream"}') >= 1


async def test_the_openapi_documents_429_and_retry_after(shedding: Shedding) -> None:
    spec = (await shedding.http.get("/openapi.json")).json()
    answer = spec["paths"]["/v1/runs/{run_id}/admissions"]["post"]["responses"]["429"]
    assert "Retry-After" in answer["headers"]
    assert answer["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")


def _sample(metrics: str, series: str) -> float:
    """The value of one exposition line, ``series`` being its name and labels exactly."""
    for line in metrics.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{series} not in /metrics")
