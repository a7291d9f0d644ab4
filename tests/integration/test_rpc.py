"""Request–reply: results, typed errors, deadlines, and context carried in headers."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import pytest
import structlog
from opentelemetry import trace

from libs.errors import DeadlineExceeded, NotFound, TransientError
from libs.eventbus.jetstream import connect
from libs.eventbus.rpc import RpcClient, RpcServer
from libs.observability import configure_logging, tracer

pytestmark = pytest.mark.integration


async def test_request_reply_results_errors_deadlines_and_headers(system, unique) -> None:
    configure_logging("test")
    service = unique("svc")
    nc = await connect(system.nats_url, "test")
    seen: dict[str, Any] = {}
    buf = io.StringIO()

    async def echo(payload: dict[str, Any], headers: dict[str, str]) -> Any:
        seen.update(headers)
        structlog.PrintLogger(buf).msg(json.dumps(structlog.contextvars.get_contextvars()))
        return {"echo": payload["x"]}

    async def missing(payload: dict[str, Any], headers: dict[str, str]) -> Any:
        raise NotFound(f"run {payload['run_id']} not found")

    async def slow(payload: dict[str, Any], headers: dict[str, str]) -> Any:
        await asyncio.sleep(1.0)  # the behaviour under test: a handler slower than the deadline
        return {}

    server = RpcServer(nc, service)
    server.route("echo", echo)
    server.route("missing", missing)
    server.route("slow", slow)
    await server.start()
    client = RpcClient(nc)
    try:
        with tracer("test").start_as_current_span("admit") as span:
            result = await client.call(
                service, "echo", {"x": 42}, headers={"Mc-Correlation-Id": "corr-123"}
            )
            trace_id = format(span.get_span_context().trace_id, "032x")
        assert result == {"echo": 42}
        assert seen["Mc-Correlation-Id"] == "corr-123"
        assert trace_id in seen["traceparent"]
        logged = json.loads(buf.getvalue().strip().splitlines()[-1])
        assert logged["correlation_id"] == "corr-123"
        assert logged["trace_id"] == trace_id

        with pytest.raises(NotFound, match="run r9 not found"):
            await client.call(service, "missing", {"run_id": "r9"})
        with pytest.raises(DeadlineExceeded):
            await client.call(service, "slow", {}, timeout=0.2)
        with pytest.raises(TransientError, match="no responders"):
            await client.call(unique("nobody"), "echo", {"x": 1}, timeout=1)
    finally:
        await server.stop()
        await nc.close()
    assert trace.get_tracer_provider() is not None


async def test_an_answer_too_large_for_the_bus_is_an_error_not_a_timeout(system, unique) -> None:
    from libs.errors import TooLarge

    service = unique("big")
    nc = await connect(system.nats_url, "test")

    async def huge(payload: dict[str, Any], headers: dict[str, str]) -> Any:
        return {"blob": "x" * (nc.max_payload + 10)}

    server = RpcServer(nc, service)
    server.route("huge", huge)
    await server.start()
    try:
        with pytest.raises(TooLarge, match="over the"):
            await RpcClient(nc).call(service, "huge", {}, timeout=5)
    finally:
        await server.stop()
        await nc.close()
