"""The gateway over real NATS and PostgreSQL: API keys, tenant scoping, validation, errors, OpenAPI.

The gateway app runs in-process with the service host's real wiring (``create_app`` and its
lifespan) behind ``httpx.ASGITransport``. workflow-engine and incident are the real services.
audit-replay (ClickHouse) and policy-admission are stood in by small RPC servers that only give
the gateway answers of the documented shape; the audit stand-in reads the real event store, scoped
by the tenant it is given, so tenant isolation is observed on real data.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from hypothesis import HealthCheck, Phase, given, settings
from typer.testing import CliRunner

from libs.contracts import stream_id_for
from libs.contracts.registry import decode
from libs.contracts.subjects import EVENTS_STREAM
from libs.errors import NotFound, TransientError
from libs.eventbus.db import open_pool
from libs.eventbus.jetstream import connect, ensure_streams
from libs.eventbus.rpc import RpcServer
from libs.eventbus.store import EventStore
from libs.runtime.embedded import free_port
from libs.runtime.service_host import Service, ServiceContext
from libs.settings import Settings, get_settings
from services.audit_replay.domain.search import page, parse_search
from services.gateway.audit_cli import audit_app
from services.gateway.bootstrap import create_app
from services.gateway.client import ApiError, AsyncMissionControlClient
from services.gateway.keys import create_tenant, issue_key, revoke_key
from services.incident.bootstrap import IncidentService
from services.incident.entrypoints import violation_consumer_spec as incident_consumer_spec
from services.workflow_engine.bootstrap import WorkflowEngineService
from services.workflow_engine.entrypoints import violation_consumer_spec
from tests.conftest import wait_until

pytestmark = pytest.mark.integration


@dataclass
class Gateway:
    """The in-process gateway and what the tests need around it."""

    app: FastAPI
    http: httpx.AsyncClient
    transport: httpx.ASGITransport
    pool: Any
    store: EventStore

    async def tenant_key(self, tenant: str) -> str:
        await create_tenant(self.pool, tenant, exist_ok=True, actor="test")
        return await issue_key(self.pool, tenant, "test")


async def _audit_run(store: EventStore, p: dict[str, Any]) -> dict[str, Any]:
    tenant, run_id = p["tenant_id"], p["run_id"]
    events = await store.read_stream(stream_id_for(tenant, "run", run_id))
    if not events:
        raise NotFound(f"run {run_id} not found")
    status = "running"
    for env in events:
        if env.event_type == "run.completed":
            status = str(getattr(decode(env), "status", status))
    return {"run_id": run_id, "status": status, "events": len(events)}


def _stand_ins(nc: Any, store: EventStore) -> list[RpcServer]:
    audit = RpcServer(nc, "audit")

    async def run(p: dict[str, Any], h: dict[str, str]) -> Any:
        return await _audit_run(store, p)

    async def export(p: dict[str, Any], h: dict[str, str]) -> Any:
        found = await _audit_run(store, p)
        if p["format"] == "csv":
            body = f"run_id,status\n{found['run_id']},{found['status']}\n"
            return {"content_type": "text/csv; charset=utf-8", "body": body}
        return {"content_type": "application/json", "body": json.dumps(found)}

    async def runs(p: dict[str, Any], h: dict[str, str]) -> Any:
        return {"runs": [], "limit": p.get("limit", 100), "offset": p.get("offset", 0)}

    async def incidents(p: dict[str, Any], h: dict[str, str]) -> Any:
        # What audit-replay answers while it rebuilds its projections.
        raise TransientError("projections are being rebuilt, retry shortly")

    async def rebuild(p: dict[str, Any], h: dict[str, str]) -> Any:
        return {"events": 0, "rows": {}, "position": 0, "duration_s": 0.0}

    audit.route("run", run)
    audit.route("export", export)
    audit.route("runs", runs)
    audit.route("incidents", incidents)

    async def search(p: dict[str, Any], h: dict[str, str]) -> Any:
        # audit-replay's own checks of a search, over one event (found by the word "probe").
        row = {
            "occurred_at": "2026-01-02 03:04:05.000006", "event_id": "e1", "position": 7,
            "event_type": "admission.decided", "stream_id": "t/decisions/r1", "actor": "test",
            "run_id": "r1", "agent_id": "a1", "workflow_id": "", "execution_id": "",
            "policy_ids": ["p1"], "outcome": "deny", "incident_id": "", "excerpt": "a probe",
        }  # fmt: skip
        return page(parse_search(p["tenant_id"], p), [row] if p.get("q") == "probe" else [])

    audit.route("rebuild", rebuild)
    audit.route("search", search)

    admission = RpcServer(nc, "admission")

    async def admit(p: dict[str, Any], h: dict[str, str]) -> Any:
        used = p["estimate"]["input_tokens"] + p["estimate"]["max_output_tokens"]
        deny = used > 10_000
        reasons = (
            [{"policy_id": "token_limit", "severity": "high", "message": f"{used} > 10000"}]
            if deny
            else []
        )
        return {
            "decision_id": f"d-{p['run_id']}-{p['step_index']}",
            "outcome": "deny" if deny else "allow",
            "reasons": reasons,
            "bundle_digest": "sha256:test",
            "context": {"tenant": p["tenant_id"]},
        }

    admission.route("admit", admit)
    return [audit, admission]


@pytest.fixture(scope="module")
async def gateway(system, tmp_path_factory) -> AsyncIterator[Gateway]:  # type: ignore[no-untyped-def]
    # Whatever the environment says: admin routes disabled here.
    async with serve_gateway(system, tmp_path_factory.mktemp("gw"), None, "gw-test") as gw:
        yield gw


@contextlib.asynccontextmanager
async def serve_gateway(
    system: Any, data_dir: Any, admin_token: str | None, prefix: str, **extra: Any
) -> AsyncIterator[Gateway]:
    """The gateway app started in-process, with the real workflow-engine and incident behind it
    and the stand-ins of the others; ``prefix`` names its consumers, ``extra`` adds settings."""
    settings = Settings(
        nats_url=system.nats_url,
        database_url=system.service_url,
        MC_DATA_DIR=str(data_dir),
        MC_ADMIN_TOKEN=admin_token,
        **extra,
    )
    pool = await open_pool(system.service_url, max_size=4)
    store = EventStore(pool)
    nc = await connect(system.nats_url, "test-gateway-backends")
    js = nc.jetstream()
    await ensure_streams(js)
    # The real workflow-engine and incident services; their violation consumers watch a tenant
    # no test here uses (nothing in this module publishes violations).
    wf_spec = violation_consumer_spec(durable=f"{prefix}-wf-violations", tenant_id="gw-none")
    inc_spec = incident_consumer_spec(durable=f"{prefix}-inc-violations", tenant_id="gw-none")
    services: list[Service] = [
        WorkflowEngineService(violation_spec=wf_spec),
        IncidentService(violation_spec=inc_spec),
    ]
    for svc in services:
        ctx = ServiceContext.wire(svc.name, get_settings(), nc, pool)
        await svc.start(ctx)
        await wait_until(svc.ready, what=f"{svc.name} ready")
    servers = _stand_ins(nc, store)
    for s in servers:
        await s.start()
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://gateway") as http,
    ):
        yield Gateway(app, http, transport, pool, store)
    for s in servers:
        await s.stop()
    for svc in services:
        await svc.stop()
    for spec in (wf_spec, inc_spec):
        with contextlib.suppress(Exception):
            await js.delete_consumer(EVENTS_STREAM, spec.durable)
    await nc.close()
    await pool.close()


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _error(resp: httpx.Response) -> dict[str, str]:
    body = resp.json()
    assert set(body) == {"error"}, body
    return body["error"]  # type: ignore[no-any-return]


# --- OpenAPI --------------------------------------------------------------------------------------


async def test_openapi_is_published_with_its_security_schemes(gateway: Gateway) -> None:
    resp = await gateway.http.get("/openapi.json")
    assert resp.status_code == 200
    spec = resp.json()
    assert spec["info"]["title"] == "Mission Control API"
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert spec["components"]["securitySchemes"]["apiKey"]["name"] == "X-API-Key"
    for path in (
        "/v1/runs",
        "/v1/runs/{run_id}/admissions",
        "/v1/runs/{run_id}/steps",
        "/v1/steps:batch",
        "/v1/runs/{run_id}/finish",
        "/v1/runs/{run_id}/export",
        "/v1/incidents/{incident_id}/resolve",
        "/v1/prices",
        "/v1/admin/rebuild-projections",
    ):
        assert path in spec["paths"], path
    start = spec["paths"]["/v1/runs"]["post"]
    assert {"bearer": []} in start["security"]
    assert "422" in start["responses"]


# --- authentication -------------------------------------------------------------------------------


async def test_requests_without_a_valid_key_are_401(gateway: Gateway, tenant: str) -> None:
    key = await gateway.tenant_key(tenant)
    revoked = await issue_key(gateway.pool, tenant, "to revoke")
    await revoke_key(gateway.pool, revoked.split("_")[1])
    key_id = key.split("_")[1]
    wrong_secret = f"mc_{key_id}_{'A' * 43}"
    unknown_id = f"mc_zzzzzzzzzzzz_{key.split('_', 2)[2]}"
    cases: list[dict[str, str]] = [
        {},
        {"Authorization": f"Basic {key}"},
        {"Authorization": "Bearer not-a-key"},
        _auth(wrong_secret),
        _auth(unknown_id),
        _auth(revoked),
        {"X-API-Key": wrong_secret},
    ]
    for headers in cases:
        resp = await gateway.http.post("/v1/runs", json={"agent_id": "a"}, headers=headers)
        assert resp.status_code == 401, headers
        assert _error(resp)["code"] == "unauthorized"
        assert resp.headers["www-authenticate"] == "Bearer"
    # The same key is accepted, through either header.
    for headers in (_auth(key), {"X-API-Key": key}):
        resp = await gateway.http.post("/v1/runs", json={"agent_id": "a"}, headers=headers)
        assert resp.status_code == 201, resp.text


async def test_a_revoked_key_is_refused_as_soon_as_the_revocation_commits(
    gateway: Gateway, tenant: str
) -> None:
    key = await gateway.tenant_key(tenant)
    # Accepted once, so the key is in the gateway's cache (valid for 30 s).
    resp = await gateway.http.post("/v1/runs", json={"agent_id": "a"}, headers=_auth(key))
    assert resp.status_code == 201, resp.text
    await revoke_key(gateway.pool, key.split("_")[1])

    async def refused() -> bool:
        resp = await gateway.http.get("/v1/prices", headers=_auth(key))
        return resp.status_code == 401

    # Well inside the cache's 30 s: the revocation reached the gateway, not the expiry.
    await wait_until(refused, timeout=10, what="the revoked key refused")


async def test_an_unknown_key_is_refused_even_with_a_valid_body_elsewhere(
    gateway: Gateway,
) -> None:
    # Authentication comes before validation: a caller without a key learns nothing.
    resp = await gateway.http.post("/v1/steps:batch", content=b"{not json")
    assert resp.status_code == 401


# --- tenant scoping -------------------------------------------------------------------------------


async def test_a_key_of_one_tenant_cannot_see_or_touch_another_tenants_run(
    gateway: Gateway, unique: Callable[[str], str]
) -> None:
    key_a = await gateway.tenant_key(unique("ta"))
    tenant_b = unique("tb")
    key_b = await gateway.tenant_key(tenant_b)
    run_id = unique("run-")
    resp = await gateway.http.post(
        "/v1/runs", json={"run_id": run_id, "agent_id": "agent-b"}, headers=_auth(key_b)
    )
    assert resp.status_code == 201, resp.text
    assert (resp.json()["run_id"], resp.json()["status"]) == (run_id, "running")
    assert (await gateway.http.get(f"/v1/runs/{run_id}", headers=_auth(key_b))).status_code == 200

    step = {"step_index": 1, "input_tokens": 10}
    attempts = [
        ("GET", f"/v1/runs/{run_id}", None),
        ("GET", f"/v1/runs/{run_id}/export", None),
        ("POST", f"/v1/runs/{run_id}/steps", step),
        ("POST", "/v1/steps:batch", {"items": [{"run_id": run_id, **step}]}),
        ("POST", f"/v1/runs/{run_id}/finish", {"status": "completed"}),
    ]
    for method, path, body in attempts:
        resp = await gateway.http.request(method, path, json=body, headers=_auth(key_a))
        assert resp.status_code == 404, (method, path, resp.text)
        assert _error(resp)["code"] == "not_found"
    # A's attempts changed nothing of B's run.
    events = await gateway.store.read_stream(stream_id_for(tenant_b, "run", run_id))
    assert [e.event_type for e in events] == ["run.started"]
    # And a tenant cannot be named in the body.
    resp = await gateway.http.post(
        "/v1/runs", json={"agent_id": "x", "tenant_id": tenant_b}, headers=_auth(key_a)
    )
    assert resp.status_code == 422
    assert "tenant_id" in _error(resp)["message"]


# --- validation and errors ------------------------------------------------------------------------


async def test_bad_input_is_4xx_with_a_message_naming_the_field(
    gateway: Gateway, tenant: str
) -> None:
    h = _auth(await gateway.tenant_key(tenant))
    cases: list[tuple[str, str, Any, str]] = [
        ("POST", "/v1/runs", b"{not json", "invalid JSON"),
        ("POST", "/v1/runs", b"[1, 2]", "body: Input should be a valid dictionary"),
        ("POST", "/v1/runs", {"agent_id": 42}, "body.agent_id"),
        ("POST", "/v1/runs", {"agent_id": "a", "run_id": "white space"}, "body.run_id"),
        ("POST", "/v1/runs/r1/admissions", {"step_index": "first"}, "body.step_index"),
        (
            "POST",
            "/v1/runs/r1/admissions",
            {"step_index": 1, "estimate": {"input_tokens": -5}},
            "body.estimate.input_tokens",
        ),
        ("POST", "/v1/runs/r1/steps", {"step_index": 1, "output_tokens": -1}, "output_tokens"),
        ("POST", "/v1/runs/r1/steps", {"step_index": 1, "status": "exploded"}, "body.status"),
        ("POST", "/v1/steps:batch", {"items": []}, "body.items"),
        ("POST", "/v1/runs/r1/finish", {"status": "paused"}, "body.status"),
        ("GET", "/v1/runs?status=sleeping", None, "query.status"),
        ("GET", "/v1/runs?limit=0", None, "query.limit"),
        ("GET", "/v1/audit/search?q=a%00b", None, "query.q"),
        ("GET", "/v1/audit/search?outcome=maybe", None, "query.outcome"),
        ("GET", "/v1/audit/search?limit=201", None, "query.limit"),
        ("GET", "/v1/audit/search?since=yesterday", None, "query.since"),
        ("GET", "/v1/audit/search?cursor=not%20a%20cursor", None, "query.cursor"),
        # Well-formed text that is no cursor, refused by audit-replay.
        ("GET", "/v1/audit/search?cursor=bm90YWN1cnNvcg", None, "cursor is not a cursor"),
        ("GET", "/v1/audit/search?q=---", None, "q must hold at least one letter"),
        ("GET", "/v1/audit/search?since=0001-01-01T00:00:00%2B01:00", None, "since must be a time"),
        ("GET", "/v1/incidents/not-a-uuid", None, "path.incident_id"),
        ("POST", "/v1/incidents/0193e1a0-0000-7000-8000-000000000000/resolve", {}, "resolution"),
        ("PUT", "/v1/prices", {"prices": [{"model": "m"}]}, "input_per_token"),
        ("POST", "/v1/exports", {"subject_type": "tenant", "subject_id": "r1"}, "subject_type"),
        ("POST", "/v1/exports", {"subject_type": "run", "subject_id": "a/../b"}, "subject_id"),
        ("POST", "/v1/exports", {"subject_type": "run", "subject_id": "r1", "x": 1}, "body.x"),
        ("GET", "/v1/exports?limit=501", None, "query.limit"),
        ("GET", "/v1/exports/not-a-job", None, "path.job_id"),
        ("GET", "/v1/exports/1%27%20OR%201=1/download", None, "path.job_id"),
        ("GET", "/v1/runs/white%20space/full-export", None, "path.run_id"),
        ("GET", "/v1/executions/e1/replay?at_position=0", None, "query.at_position"),
        ("GET", "/v1/runs/r1/replay?at_step=-1", None, "query.at_step"),
        ("GET", f"/v1/executions/e1/replay?at_version={2**63}", None, "query.at_version"),
    ]
    for method, path, body, field in cases:
        if isinstance(body, bytes):
            headers = {**h, "Content-Type": "application/json"}
            resp = await gateway.http.request(method, path, headers=headers, content=body)
        else:
            resp = await gateway.http.request(method, path, headers=h, json=body)
        assert resp.status_code == 422, (path, body, resp.text)
        err = _error(resp)
        assert err["code"] == "invalid_input"
        assert field in err["message"], (field, err["message"])


async def test_conflicts_from_the_services_keep_their_status(
    gateway: Gateway, tenant: str, unique: Callable[[str], str]
) -> None:
    h = _auth(await gateway.tenant_key(tenant))
    run_id = unique("run-")
    body = {"run_id": run_id, "agent_id": "a"}
    assert (await gateway.http.post("/v1/runs", json=body, headers=h)).status_code == 201
    again = await gateway.http.post("/v1/runs", json=body, headers=h)
    assert again.status_code == 409
    assert run_id in _error(again)["message"]


async def test_oversized_bodies_are_413(gateway: Gateway, tenant: str) -> None:
    h = _auth(await gateway.tenant_key(tenant))
    big = b'{"agent_id": "' + b"x" * (10 * 1024 * 1024) + b'"}'
    resp = await gateway.http.post("/v1/runs", content=big, headers=h)
    assert resp.status_code == 413
    assert _error(resp)["code"] == "payload_too_large"

    async def chunked() -> AsyncIterator[bytes]:
        # No Content-Length: the limit must hold while reading, too.
        for _ in range(11):
            yield b" " * (1024 * 1024)

    resp = await gateway.http.post("/v1/runs", content=chunked(), headers=h)
    assert resp.status_code == 413


# --- correlation and trace context ----------------------------------------------------------------


async def test_correlation_id_and_trace_context_reach_the_recorded_events(
    gateway: Gateway, tenant: str, unique: Callable[[str], str]
) -> None:
    h = _auth(await gateway.tenant_key(tenant))
    run_id = unique("run-")
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    resp = await gateway.http.post(
        "/v1/runs",
        json={"run_id": run_id, "agent_id": "a"},
        headers={
            **h,
            "X-Correlation-Id": "corr-test-1",
            "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01",
        },
    )
    assert resp.status_code == 201
    assert resp.headers["x-correlation-id"] == "corr-test-1"
    [started] = await gateway.store.read_stream(stream_id_for(tenant, "run", run_id))
    assert started.correlation_id == "corr-test-1"
    assert started.trace_context.traceparent is not None
    assert started.trace_context.traceparent.split("-")[1] == trace_id

    # Without either header, the gateway mints both, and still echoes the correlation id.
    other = unique("run2-")
    resp = await gateway.http.post("/v1/runs", json={"run_id": other, "agent_id": "a"}, headers=h)
    minted = resp.headers["x-correlation-id"]
    [started] = await gateway.store.read_stream(stream_id_for(tenant, "run", other))
    assert started.correlation_id == minted
    assert started.trace_context.traceparent is not None
    # Errors carry it too.
    resp = await gateway.http.get("/v1/runs/nope", headers={**h, "X-Correlation-Id": "c-404"})
    assert resp.status_code == 404
    assert resp.headers["x-correlation-id"] == "c-404"


# --- the typed client over the whole run flow -----------------------------------------------------


async def test_the_async_client_drives_a_run_to_its_end(
    gateway: Gateway, tenant: str, unique: Callable[[str], str]
) -> None:
    key = await gateway.tenant_key(tenant)
    run_id = unique("run-")
    async with AsyncMissionControlClient("http://gateway", key, transport=gateway.transport) as mc:
        started = await mc.start_run("agent-1", run_id=run_id, labels={"team": "qa"})
        assert started.run_id == run_id
        ok = await mc.admit(run_id, 1, model="m", input_tokens=400, max_output_tokens=100)
        assert ok.outcome == "allow"
        rec = await mc.record_step(run_id, 1, model="m", input_tokens=400, output_tokens=100)
        assert rec.recorded == 1
        batch = await mc.record_steps_batch(
            [{"run_id": run_id, "step_index": i, "input_tokens": 10} for i in (2, 3)]
        )
        assert batch.recorded == 2
        denied = await mc.admit(run_id, 4, input_tokens=8000, max_output_tokens=9000)
        assert denied.outcome == "deny"
        assert denied.reasons[0].policy_id == "token_limit"
        assert denied.context == {"tenant": tenant}
        finished = await mc.finish_run(run_id, "completed")
        assert finished.status == "completed"
        csv = await mc.export(run_id, "csv")
        assert csv == f"run_id,status\n{run_id},completed\n".encode()
        with pytest.raises(ApiError) as info:
            await mc.record_step(run_id, 5)
        assert (info.value.status, info.value.code) == (409, "conflict")
    events = await gateway.store.read_stream(stream_id_for(tenant, "run", run_id))
    assert [e.event_type for e in events] == [
        "run.started",
        *["run.step_recorded"] * 3,
        "run.completed",
    ]


async def test_export_is_a_download_with_the_right_content_type(
    gateway: Gateway, tenant: str, unique: Callable[[str], str]
) -> None:
    h = _auth(await gateway.tenant_key(tenant))
    run_id = unique("run-")
    await gateway.http.post("/v1/runs", json={"run_id": run_id, "agent_id": "a"}, headers=h)
    for fmt, media in (("csv", "text/csv"), ("json", "application/json")):
        resp = await gateway.http.get(f"/v1/runs/{run_id}/export?format={fmt}", headers=h)
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith(media)
        assert resp.headers["content-disposition"] == f'attachment; filename="run-{run_id}.{fmt}"'


# --- property-based: no generated request, valid or not, is a server error ---------------------


def _fuzz(base_url: str, key: str, examples: int) -> list[str]:
    """Every operation, valid and invalid inputs; the failures as readable lines."""
    import schemathesis
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()  # type: ignore[union-attr]
        if operation.path.endswith("work:take"):
            # A worker's long poll waits up to 30 s by design; tests/e2e/test_api_fuzz.py sends
            # it bad inputs that ask for no wait.
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=examples,
                deadline=None,
                database=None,
                phases=[Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            def check(case: Any) -> None:
                resp = case.call(base_url=base_url, headers=_auth(key))
                if resp.status_code < 500:
                    return
                # Services this test does not run answer "no responders": a documented 503.
                if resp.status_code == 503 and resp.json()["error"]["code"] == "unavailable":
                    return
                failures.append(
                    f"{case.method} {case.formatted_path} -> {resp.status_code}: "
                    f"{resp.text[:300]} (body {case.body!r:.200})"
                )

            check()
    return failures


@contextlib.asynccontextmanager
async def over_a_socket(app: FastAPI) -> AsyncIterator[str]:
    """``app``, already started, served by uvicorn on a free port (without a second lifespan);
    yields its URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="error")
    )
    task = asyncio.create_task(server.serve())
    try:
        await wait_until(lambda: server.started, what="uvicorn started")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def test_generated_requests_never_get_a_server_error(gateway: Gateway, tenant: str) -> None:
    key = await gateway.tenant_key(tenant)
    async with over_a_socket(gateway.app) as url:
        failures = await asyncio.to_thread(_fuzz, url, key, 10)
    assert failures == [], "\n".join(failures[:20])


async def test_incident_commands_reach_the_incident_service_scoped_to_the_tenant(
    gateway: Gateway, tenant: str
) -> None:
    h = _auth(await gateway.tenant_key(tenant))
    unknown = "0193e1a0-0000-7000-8000-000000000000"
    resp = await gateway.http.post(f"/v1/incidents/{unknown}/acknowledge", json={}, headers=h)
    assert resp.status_code == 404
    assert unknown in _error(resp)["message"]
    resp = await gateway.http.post(
        f"/v1/incidents/{unknown}/resolve", json={"resolution": "fixed"}, headers=h
    )
    assert resp.status_code == 404


# --- admin ----------------------------------------------------------------------------------------

REBUILD = "/v1/admin/rebuild-projections"


async def test_rebuilding_projections_needs_the_operator_token(
    gateway: Gateway, tenant: str, system: Any, tmp_path: Any
) -> None:
    key = await gateway.tenant_key(tenant)
    h = _auth(key)
    # No operator token configured: refused for every tenant's key, whatever token is sent.
    for headers in (h, {**h, "X-Admin-Token": "anything"}):
        resp = await gateway.http.post(REBUILD, headers=headers)
        assert resp.status_code == 403
        assert _error(resp) == {
            "code": "forbidden",
            "message": "admin operations are disabled: set MC_ADMIN_TOKEN",
        }
    # The operator token does not replace the API key.
    resp = await gateway.http.post(REBUILD, headers={"X-Admin-Token": "anything"})
    assert resp.status_code == 401

    settings = Settings(
        nats_url=system.nats_url,
        database_url=system.service_url,
        MC_DATA_DIR=str(tmp_path),
        MC_ADMIN_TOKEN="operator-secret",
    )
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://gateway") as http,
    ):
        for headers in (h, {**h, "X-Admin-Token": "wrong"}, {**h, "X-Admin-Token": "operator"}):
            resp = await http.post(REBUILD, headers=headers)
            assert resp.status_code == 403, headers
            assert _error(resp)["code"] == "forbidden"
            assert "X-Admin-Token" in _error(resp)["message"]
        resp = await http.post(REBUILD, headers={**h, "X-Admin-Token": "operator-secret"})
        assert resp.status_code == 202
        assert resp.json()["position"] == 0  # audit-replay's answer
        async with AsyncMissionControlClient("http://gateway", key, transport=transport) as mc:
            assert (await mc.rebuild_projections("operator-secret"))["events"] == 0
            with pytest.raises(ApiError) as info:
                await mc.rebuild_projections("wrong")
            assert (info.value.status, info.value.code) == (403, "forbidden")
        spec = (await http.get("/openapi.json")).json()
        operation = spec["paths"][REBUILD]["post"]
        assert "403" in operation["responses"]
        assert "MC_ADMIN_TOKEN" in operation["description"]
        assert any(p["name"] == "X-Admin-Token" for p in operation["parameters"])


async def test_a_query_during_a_rebuild_is_503_to_retry(gateway: Gateway, tenant: str) -> None:
    resp = await gateway.http.get("/v1/incidents", headers=_auth(await gateway.tenant_key(tenant)))
    assert resp.status_code == 503
    assert _error(resp) == {
        "code": "unavailable",
        "message": "projections are being rebuilt, retry shortly",
    }


async def test_mctl_audit_search_prints_the_matching_events(gateway: Gateway, tenant: str) -> None:
    key = await gateway.tenant_key(tenant)
    async with over_a_socket(gateway.app) as base_url:

        def mctl(*args: str) -> Any:
            cli = ("search", "--url", base_url, "--api-key", key, *args)
            return CliRunner().invoke(audit_app, list(cli))

        found = await asyncio.to_thread(mctl, "--text", "probe", "--outcome", "deny")
        assert found.exit_code == 0, found.output
        assert found.output.strip() == (
            "2026-01-02T03:04:05.000006Z admission.decided run=r1 agent=a1 outcome=deny "
            "policy=p1 by test — a probe"
        )
        none = await asyncio.to_thread(mctl, "--text", "nothing")
        assert none.exit_code == 0 and none.output.strip() == "no matching event"
        bad = await asyncio.to_thread(mctl, "--cursor", "bm90YWN1cnNvcg")
        assert bad.exit_code == 1 and "cursor is not a cursor" in bad.output
        assert key not in found.output + bad.output
