"""Request–reply: results, typed errors, deadlines, and context carried in headers."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import pytest
import structlog
from opentelemetry import trace
from pydantic import BaseModel, Field

from libs.contracts.subjects import rpc_subject
from libs.errors import (
    DeadlineExceeded,
    InvalidInput,
    NotFound,
    Overloaded,
    TooLarge,
    TransientError,
)
from libs.eventbus import rpc
from libs.eventbus.jetstream import connect
from libs.eventbus.rpc import PART_ERROR_HEADER, Meta, RpcClient, RpcServer
from libs.observability import configure_logging, tracer
from tests.conftest import wait_until

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
    """For a caller that takes no answers in parts (see the test below for those that do)."""
    service = unique("big")
    nc = await connect(system.nats_url, "test")

    async def huge(payload: dict[str, Any], headers: dict[str, str]) -> Any:
        return {"blob": "x" * (nc.max_payload + 10)}

    server = RpcServer(nc, service)
    server.route("huge", huge)
    await server.start()
    try:
        with pytest.raises(TooLarge, match="over the"):
            await RpcClient(nc).call(service, "huge", {}, timeout=5, chunked=False)
    finally:
        await server.stop()
        await nc.close()


class _Step(BaseModel):
    """A request body for the hot-route test (module level: handlers' hints are resolved)."""

    run_id: str
    step_index: int = Field(ge=1)


async def test_a_hot_route_parses_answers_bounds_and_traces_like_the_others(system, unique) -> None:
    configure_logging("test")
    service = unique("hot")
    nc = await connect(system.nats_url, "test")
    release = asyncio.Event()
    seen: dict[str, Any] = {}
    server = RpcServer(nc, service, max_in_flight=1)

    @server.handler("step", hot=True)
    async def step(body: _Step, meta: Meta) -> Any:
        seen["correlation_id"] = meta.correlation_id
        seen["span"] = trace.get_current_span().get_span_context()
        if body.run_id == "held":
            await release.wait()
        return {"run_id": body.run_id, "step_index": body.step_index}

    await server.start()
    client = RpcClient(nc, default_timeout=30)
    try:
        # Served on bare nats-py: FastStream's broker has no subscriber for it.
        assert server._broker is not None and not server._broker.subscribers
        with tracer("test").start_as_current_span("caller") as span:
            result = await client.call(
                service,
                "step",
                {"run_id": "r1", "step_index": 2},
                headers={"Mc-Correlation-Id": "corr-9"},
            )
        assert result == {"run_id": "r1", "step_index": 2}
        assert seen["correlation_id"] == "corr-9"
        # The work ran in a span of its own, in the caller's trace.
        assert seen["span"].trace_id == span.get_span_context().trace_id
        assert seen["span"].span_id != span.get_span_context().span_id

        with pytest.raises(InvalidInput, match=r"step_index: Input should be greater"):
            await client.call(service, "step", {"run_id": "r1", "step_index": 0})
        held = asyncio.create_task(
            client.call(service, "step", {"run_id": "held", "step_index": 1})
        )
        await wait_until(lambda: server.in_flight == 1, what="the held request in flight")
        with pytest.raises(Overloaded):
            await client.call(service, "step", {"run_id": "r2", "step_index": 1})
        release.set()
        assert (await held)["run_id"] == "held"
        assert server.refused == 1
    finally:
        release.set()
        await server.stop()
        await nc.close()


async def test_an_answer_larger_than_a_message_comes_in_parts_and_is_joined(system, unique) -> None:
    """Over NATS's max_payload, the caller gets the whole answer (its parts asked for one by one
    from the replica that holds them, then released); a caller that takes no parts gets
    too_large, and a part asked for after its answer was released is a transient error."""
    service = unique("svc")
    nc = await connect(system.nats_url, "test")
    size = 3 * nc.max_payload + 12_345
    big = "".join(chr(ord("a") + i % 26) for i in range(size))

    async def large(payload: dict[str, Any], headers: dict[str, str]) -> Any:
        return {"text": big, "n": payload["n"]}

    servers = [RpcServer(nc, service), RpcServer(nc, service)]
    for server in servers:
        server.route("large", large)
        await server.start()
    client = RpcClient(nc)
    try:
        # A replica subscribes to its parts' subject only once it has an answer in parts.
        assert all(s._part_sub is None for s in servers)
        with pytest.raises(TooLarge, match="takes no answers in parts"):
            await client.call(service, "large", {"n": 7}, chunked=False)
        assert all(s._part_sub is None for s in servers)
        for n in range(4):  # the replicas share the requests; each serves its own parts
            got = await client.call(service, "large", {"n": n}, timeout=30)
            assert got == {"text": big, "n": n}
        assert all(s._held_bytes == 0 and not s._held for s in servers)
        holder = next(s for s in servers if s._part_sub is not None)
        gone = await nc.request(
            holder.part_subject, json.dumps({"token": "nope", "index": 1}).encode()
        )
        assert gone.headers == {PART_ERROR_HEADER: "1"}
        assert b"parts are gone" in gone.data
        # A part before the second (the first came with the answer) is not a part to ask for.
        for index in (0, -1):
            bad = await nc.request(
                holder.part_subject, json.dumps({"token": "nope", "index": index}).encode()
            )
            assert bad.data == b"bad part request"
    finally:
        for server in servers:
            await server.stop()
        await nc.close()


async def test_an_answer_whose_caller_took_only_its_first_part_is_freed_at_its_deadline(
    system, unique, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller that asks for an answer in parts and goes away after the first leaves nothing held
    once the parts' time is up, with no other large answer coming to sweep it."""
    monkeypatch.setattr(rpc, "PART_TTL_S", 0.5)
    service = unique("svc")
    nc = await connect(system.nats_url, "test")
    big = "x" * (2 * nc.max_payload)

    async def large(payload: dict[str, Any], headers: dict[str, str]) -> Any:
        return {"text": big}

    server = RpcServer(nc, service)
    server.route("large", large)
    await server.start()
    try:
        first = await nc.request(
            rpc_subject(service, "large"),
            b"{}",
            timeout=10,
            headers={rpc.CHUNKS_REQUEST_HEADER: "1"},
        )
        assert first.headers is not None and int(first.headers[rpc.CHUNKS_HEADER]) >= 2
        assert server.held_bytes > 2 * nc.max_payload
        await wait_until(lambda: server.held_bytes == 0, timeout=10, what="the held answer freed")
        gone = await nc.request(
            first.headers[rpc.CHUNK_SUBJECT_HEADER],
            json.dumps({"token": first.headers[rpc.CHUNK_TOKEN_HEADER], "index": 1}).encode(),
        )
        assert b"parts are gone" in gone.data
    finally:
        await server.stop()
        await nc.close()
