"""What FastStream adds to a request: a trivial handler on raw nats-py and on FastStream.

One embedded nats-server; the server and the caller each have their own connection, in one
process. Every variant answers the same trivial admission-shaped request and is called through
the same client (:class:`~libs.eventbus.rpc.RpcClient`), in interleaved rounds so that drift in
the machine's load hits them alike:

* ``floor``: a bare nats-py responder echoing the bytes, called with a bare ``nc.request``;
* ``raw nats-py``: the previous server (nats-py callback, a task per request, the in-flight bound,
  ``Mc-Deadline``, JSON decode, envelope, size check), rebuilt here as the baseline;
* ``faststream``: :class:`~libs.eventbus.rpc.RpcServer` as the services run it (FastStream
  subscriber, OpenTelemetry middleware, request middleware), the body parsed into a pydantic model;
* ``faststream, no otel``: the same without the OpenTelemetry middleware, to show its share;
* ``hot route``: the same handler registered ``hot=True`` (what admission's ``admit`` uses):
  bare nats-py with the same parsing, answers, bounds and a span of its own.

Then the same under 32 concurrent callers: requests/s and p99.

    python scripts/bench_rpc.py [--requests 2000] [--rounds 5] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from pydantic import BaseModel, ConfigDict, Field

from libs import errors
from libs.contracts.subjects import rpc_subject
from libs.eventbus.jetstream import connect
from libs.eventbus.rpc import Headers, RpcClient, RpcServer
from libs.observability import bind_from_headers
from libs.runtime.embedded import start_nats

BODY = {
    "tenant_id": "acme",
    "run_id": "run-1",
    "step_index": 3,
    "model": "gpt-4o",
    "estimate": {"input_tokens": 1200, "output_tokens": 300},
}
ANSWER = {"outcome": "allow", "reasons": []}


class Estimate(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    input_tokens: int = Field(ge=0)
    output_tokens: int = Field(ge=0)


class Admit(BaseModel):
    """The shape of ``admission.admit`` (the real model also checks the tenant alphabet)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant_id: str
    run_id: str = Field(min_length=1, max_length=200)
    step_index: int = Field(ge=1)
    model: str | None = None
    estimate: Estimate


class RawServer:
    """The previous request server on bare nats-py, reduced to one route."""

    def __init__(self, nc: NATS, service: str, max_in_flight: int = 64) -> None:
        self.nc, self.service, self.max_in_flight = nc, service, max_in_flight
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self, method: str) -> None:
        await self.nc.subscribe(rpc_subject(self.service, method), queue=self.service, cb=self.cb)

    async def cb(self, msg: Msg) -> None:
        if len(self.tasks) >= self.max_in_flight:
            await msg.respond(b'{"ok":false,"error":{"code":"overloaded","message":""}}')
            return
        task = asyncio.create_task(self.handle(msg))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def handle(self, msg: Msg) -> None:
        headers = dict(msg.headers or {})
        bind_from_headers(headers)
        deadline = headers.get("Mc-Deadline")
        if deadline and deadline.isdigit() and int(deadline) < time.time() * 1000:
            await msg.respond(b'{"ok":false,"error":{"code":"deadline_exceeded","message":""}}')
            return
        try:
            payload = orjson.loads(msg.data)
            req = Admit.model_validate(payload)
            body = orjson.dumps({"ok": True, "result": {**ANSWER, "run_id": req.run_id}})
        except errors.MissionControlError as exc:
            body = orjson.dumps({"ok": False, "error": {"code": exc.code, "message": str(exc)}})
        if len(body) > self.nc.max_payload - 4096:
            body = b'{"ok":false,"error":{"code":"too_large","message":""}}'
        await msg.respond(body)


def faststream_server(
    nc: NATS, service: str, *, telemetry: bool = True, hot: bool = False
) -> RpcServer:
    server = RpcServer(nc, service, telemetry=telemetry)

    @server.handler("admit", hot=hot)
    async def admit(body: Admit, headers: Headers) -> dict[str, Any]:
        return {**ANSWER, "run_id": body.run_id}

    return server


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


Call = Callable[[], Awaitable[Any]]


async def until_answered(call: Call, timeout: float = 10.0) -> None:
    """Call until a responder answers: a fresh subscription can take a moment to be routed."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await call()
            return
        except (errors.TransientError, NoRespondersError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def sequential(call: Call, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await call()
        out.append((time.perf_counter() - t) * 1000)
    return out


async def concurrent(call: Call, callers: int, seconds: float) -> tuple[float, float]:
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def caller() -> None:
        while time.perf_counter() < stop:
            t = time.perf_counter()
            await call()
            latencies.append((time.perf_counter() - t) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return len(latencies) / (time.perf_counter() - started), pct(latencies, 99)


async def main(requests: int, rounds: int, callers: int) -> None:
    trace.set_tracer_provider(TracerProvider())  # as configure_logging does in every service
    data = Path(tempfile.mkdtemp(prefix="mc-bench-rpc-"))
    nats = start_nats(data)
    try:
        server_nc = await connect(nats.url, "bench-server")
        client_nc = await connect(nats.url, "bench-client")
        client = RpcClient(client_nc)
        body = orjson.dumps(BODY)

        async def bare_echo(msg: Msg) -> None:
            await msg.respond(msg.data)

        await server_nc.subscribe("bench.floor", queue="floor", cb=bare_echo)
        await RawServer(server_nc, "raw").start("admit")
        fast = faststream_server(server_nc, "fast")
        plain = faststream_server(server_nc, "plain", telemetry=False)
        hot = faststream_server(server_nc, "hot", hot=True)
        await fast.start()
        await plain.start()
        await hot.start()
        await server_nc.flush()  # every subscription is known to the server before the first call

        async def floor() -> Any:
            return await client_nc.request("bench.floor", body, timeout=5)

        def via(service: str) -> Call:
            async def call() -> Any:
                result = await client.call(service, "admit", BODY)
                assert result["run_id"] == "run-1", result
                return result

            return call

        variants: dict[str, Call] = {
            "floor (bare nats-py echo)": floor,
            "raw nats-py (previous)": via("raw"),
            "faststream": via("fast"),
            "faststream, no otel": via("plain"),
            "hot route (bare nats-py)": via("hot"),
        }
        for call in variants.values():  # warm up connections, caches and pydantic
            await until_answered(call)
            await sequential(call, 200)
        samples: dict[str, list[float]] = {name: [] for name in variants}
        per_round = max(1, requests // rounds)
        for _ in range(rounds):
            for name, call in variants.items():
                samples[name] += await sequential(call, per_round)
        print(f"one request at a time, {per_round * rounds} requests each (ms)")
        print(f"{'variant':30} {'p50':>7} {'p99':>7} {'mean':>7}")
        for name, values in samples.items():
            print(
                f"{name:30} {pct(values, 50):7.3f} {pct(values, 99):7.3f} "
                f"{statistics.fmean(values):7.3f}"
            )
        print(f"\n{callers} concurrent callers, 3 s each")
        print(f"{'variant':30} {'req/s':>8} {'p99 ms':>8}")
        for name, call in variants.items():
            rate, p99 = await concurrent(call, callers, 3.0)
            print(f"{name:30} {rate:8.0f} {p99:8.2f}")
        await fast.stop()
        await plain.stop()
        await hot.stop()
        await server_nc.close()
        await client_nc.close()
    finally:
        nats.stop()
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    asyncio.run(main(args.requests, args.rounds, args.concurrency))
