"""Services' request routes through FastStream's in-memory broker (``TestNatsBroker``).

The routes run exactly as in production: the FastStream subscribers with their pydantic-parsed
arguments and the request middleware (envelope, typed errors, deadline, in-flight bound), on the
in-memory event store instead of PostgreSQL and without a NATS server.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
from faststream.nats import NatsBroker, TestNatsBroker
from nats.aio.client import Client as NATS
from opentelemetry import trace

from libs.contracts import stream_id_for
from libs.eventbus.memory import InMemoryEventStore
from libs.eventbus.repository import begin
from libs.eventbus.rpc import Headers, Meta, RpcServer
from libs.observability import configure_logging, inject_headers, tracer
from services.cost.entrypoints import build_rpc_server as cost_rpc
from services.cost.handlers import CostHandlers
from services.incident.domain import incident_id_for
from services.incident.entrypoints import build_rpc as incident_rpc
from services.incident.handlers import IncidentHandlers
from services.workflow_engine.entrypoints import build_rpc as workflow_rpc
from services.workflow_engine.handlers import WorkflowHandlers
from tests.unit.test_handlers_on_twin import MemoryIncidentTable, _stored, _violation

pytestmark = pytest.mark.unit

T = "acme"


@asynccontextmanager
async def served(server: RpcServer) -> AsyncIterator[NatsBroker]:
    """The server's broker on FastStream's in-memory transport."""
    async with TestNatsBroker(server.broker()) as broker:
        yield broker


async def call(
    broker: NatsBroker, subject: str, body: Any, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """One request; the decoded ``{"ok": ...}`` reply."""
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    reply = await broker.request(raw, subject, headers=headers)
    out: dict[str, Any] = orjson.loads(reply.body)
    return out


def _server(service: str) -> RpcServer:
    # An unconnected client: TestNatsBroker never uses it; the server reads its payload limit.
    return RpcServer(NATS(), service)


async def test_workflow_routes_parse_execute_and_answer_in_the_envelope() -> None:
    store = InMemoryEventStore()
    server = workflow_rpc(_server("workflow"), WorkflowHandlers(store))
    async with served(server) as broker:
        started = await call(
            broker,
            "mc.rpc.workflow.start_run",
            {"tenant_id": T, "run_id": "r1", "agent_id": "agent-1"},
            headers={"Mc-Correlation-Id": "corr-7", "Mc-Actor": "user:ann"},
        )
        assert started == {
            "ok": True,
            "result": {"run_id": "r1", "status": "running", "positions": [1]},
        }
        recorded = await call(
            broker,
            "mc.rpc.workflow.record_steps",
            {"tenant_id": T, "items": [{"run_id": "r1", "step_index": 1, "input_tokens": 5}]},
        )
        assert recorded["ok"] and recorded["result"]["recorded"] == 1
        run = await call(broker, "mc.rpc.workflow.get_run", {"tenant_id": T, "run_id": "r1"})
        assert run["result"]["tokens_used"] == 5

        missing = await call(broker, "mc.rpc.workflow.get_run", {"tenant_id": T, "run_id": "r9"})
        assert missing["error"]["code"] == "not_found"
    (first, *_) = await store.read_stream(stream_id_for(T, "run", "r1"))
    # The Meta dependency carried the request's headers into the event's envelope.
    assert (first.correlation_id, first.actor) == ("corr-7", "user:ann")


async def test_a_bad_request_is_invalid_input_naming_every_bad_field() -> None:
    server = workflow_rpc(_server("workflow"), WorkflowHandlers(InMemoryEventStore()))
    async with served(server) as broker:
        bad = await call(
            broker,
            "mc.rpc.workflow.record_steps",
            {"tenant_id": T, "items": [{"run_id": "r1", "step_index": 0, "input_tokens": -1}]},
        )
        assert bad["error"]["code"] == "invalid_input"
        assert "items.0.step_index" in bad["error"]["message"]
        assert "items.0.input_tokens" in bad["error"]["message"]
        no_tenant = await call(broker, "mc.rpc.workflow.get_run", {"run_id": "r1"})
        assert no_tenant["error"] == {
            "code": "invalid_input",
            "message": "tenant_id: Field required",
        }
        not_json = await call(broker, "mc.rpc.workflow.get_run", b"{nope")
        assert not_json["error"]["code"] == "invalid_input"
        assert not_json["error"]["message"].startswith("bad JSON")
        a_list = await call(broker, "mc.rpc.workflow.get_run", b"[1]")
        assert a_list["error"]["message"] == "request body must be a JSON object"


async def test_cost_routes_publish_and_read_the_tenants_prices() -> None:
    server = cost_rpc(NATS(), CostHandlers(InMemoryEventStore()))
    prices = [{"model": "m-1", "input_per_token": "0.000001", "output_per_token": "0.000002"}]
    async with served(server) as broker:
        published = await call(
            broker, "mc.rpc.cost.set_prices", {"tenant_id": T, "prices": prices, "actor": "ann"}
        )
        assert published["result"]["version"] == 1
        table = await call(broker, "mc.rpc.cost.prices", {"tenant_id": T})
        assert table["result"]["version"] == 1
        assert "m-1" in {p["model"] for p in table["result"]["prices"]}
        negative = [{**prices[0], "input_per_token": "-1"}]
        refused = await call(broker, "mc.rpc.cost.set_prices", {"tenant_id": T, "prices": negative})
        assert refused["error"]["code"] == "invalid_input"
        bad_tenant = await call(broker, "mc.rpc.cost.prices", {"tenant_id": "Not A Tenant"})
        assert bad_tenant["error"]["code"] == "invalid_input"
        assert bad_tenant["error"]["message"].startswith("tenant_id:")


async def test_incident_routes_acknowledge_resolve_and_get() -> None:
    store, table = InMemoryEventStore(), MemoryIncidentTable()
    handlers = IncidentHandlers(store, table=table)
    violation = await _stored(store, _violation("r1", 3))
    async with begin(store) as uow:
        await handlers.open_for_violation(uow, violation)
    iid = incident_id_for("v-1")
    async with served(incident_rpc(_server("incident"), handlers)) as broker:
        acked = await call(
            broker, "mc.rpc.incident.acknowledge", {"tenant_id": T, "incident_id": iid, "by": "ann"}
        )
        assert acked["result"]["status"] == "acknowledged"
        resolved = await call(
            broker,
            "mc.rpc.incident.resolve",
            {"tenant_id": T, "incident_id": iid, "by": "ann", "resolution": "budget raised"},
        )
        assert resolved["result"]["status"] == "resolved"
        got = await call(broker, "mc.rpc.incident.get", {"tenant_id": T, "incident_id": iid})
        assert got["result"]["resolution"] == "budget raised"
        bad_id = await call(
            broker, "mc.rpc.incident.get", {"tenant_id": T, "incident_id": "not-a-uuid"}
        )
        assert bad_id["error"]["code"] == "invalid_input"
        assert bad_id["error"]["message"].startswith("incident_id:")


async def test_the_middleware_refuses_above_the_bound_and_skips_expired_requests() -> None:
    server = RpcServer(NATS(), "gated", max_in_flight=1)
    release = asyncio.Event()
    entered = asyncio.Event()
    runs = 0

    async def hold(payload: dict[str, Any], headers: dict[str, str]) -> Any:
        nonlocal runs
        runs += 1
        entered.set()
        await release.wait()
        return {"held": True}

    server.route("hold", hold)
    async with served(server) as broker:
        first = asyncio.create_task(call(broker, "mc.rpc.gated.hold", {}))
        await entered.wait()
        assert server.in_flight == 1
        second = await call(broker, "mc.rpc.gated.hold", {})
        assert second["error"]["code"] == "overloaded"
        release.set()
        assert (await first) == {"ok": True, "result": {"held": True}}
        past = str(int(time.time() * 1000) - 1000)
        expired = await call(broker, "mc.rpc.gated.hold", {}, headers={"Mc-Deadline": past})
        assert expired["error"]["code"] == "deadline_exceeded"
    assert (runs, server.refused, server.expired, server.in_flight) == (1, 1, 1, 0)


async def test_an_answer_too_large_for_the_bus_and_an_unexpected_failure() -> None:
    server = RpcServer(NATS(), "edge")

    @server.handler("huge")
    async def huge(body: dict[str, Any]) -> Any:
        return {"blob": "x" * server.nc.max_payload}

    @server.handler("boom")
    async def boom(body: dict[str, Any], headers: Headers) -> Any:
        raise RuntimeError("unexpected")

    async with served(server) as broker:
        too_large = await call(broker, "mc.rpc.edge.huge", {})
        assert too_large["error"]["code"] == "too_large"
        failed = await call(broker, "mc.rpc.edge.boom", {})
        assert failed["error"] == {"code": "internal", "message": "RuntimeError('unexpected')"}


async def test_a_route_works_in_a_span_of_the_callers_trace() -> None:
    configure_logging("test")  # installs the SDK tracer provider, as every service does
    server = RpcServer(NATS(), "traced")
    seen: dict[str, Any] = {}

    @server.handler("look")
    async def look(body: dict[str, Any], meta: Meta) -> Any:
        seen["span"] = trace.get_current_span().get_span_context()
        seen["traceparent"] = meta.trace_context.traceparent
        return {}

    with tracer("test").start_as_current_span("caller") as caller:
        headers = inject_headers()
    async with served(server) as broker:
        assert (await call(broker, "mc.rpc.traced.look", {}, headers=headers))["ok"]
    span = seen["span"]
    assert span.trace_id == caller.get_span_context().trace_id
    assert span.span_id != caller.get_span_context().span_id
    assert seen["traceparent"] == headers["traceparent"]
