"""The gateway's event streams over a real socket (uvicorn), with the real workflow-engine and
NATS behind: the bound per tenant (429) and per process (503), slots and consumers given back
when a client leaves, and a usage report reaching a viewer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from libs.contracts.subjects import EVENTS_STREAM, LIVE_STREAM
from libs.eventbus.jetstream import connect
from services.gateway.client import AsyncMissionControlClient
from tests.conftest import System, wait_until
from tests.integration.test_gateway import Gateway, over_a_socket, serve_gateway

pytestmark = pytest.mark.integration


@pytest.fixture
async def served(system: System, tmp_path: Path) -> AsyncIterator[tuple[Gateway, str]]:
    limits = {"MC_SSE_MAX_STREAMS_PER_TENANT": 1, "MC_SSE_MAX_STREAMS": 2}
    async with (
        serve_gateway(system, tmp_path / "gw", None, "gw-live", **limits) as gw,
        over_a_socket(gw.app) as url,
    ):
        yield gw, url


class Stream:
    """One open event stream, read line by line in a task."""

    def __init__(self, http: httpx.AsyncClient, path: str, key: str) -> None:
        self.http, self.path, self.key = http, path, key
        self.lines: list[str] = []
        self.status = 0
        self._stack = contextlib.AsyncExitStack()
        self._task: asyncio.Task[None] | None = None

    async def open(self) -> Stream:
        headers = {"Authorization": f"Bearer {self.key}"}
        resp = await self._stack.enter_async_context(
            self.http.stream("GET", self.path, headers=headers, timeout=30)
        )
        self.status = resp.status_code
        if resp.status_code == 200:
            self._task = asyncio.create_task(self._read(resp))
        else:
            await resp.aread()
            self.body = orjson.loads(resp.content)
            self.headers = resp.headers
            await self.close()
        return self

    async def _read(self, resp: httpx.Response) -> None:
        async for line in resp.aiter_lines():
            self.lines.append(line)

    def saw(self, prefix: str) -> bool:
        return any(line.startswith(prefix) for line in self.lines)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                await self._task
        await self._stack.aclose()


async def _ephemeral(system: System) -> int:
    nc = await connect(system.nats_url, "live-count")
    try:
        js = nc.jetstream()
        infos = [*await js.consumers_info(EVENTS_STREAM), *await js.consumers_info(LIVE_STREAM)]
        return sum(1 for i in infos if not i.config.durable_name)
    finally:
        await nc.close()


async def test_streams_are_bounded_and_give_back_what_they_hold(
    served: tuple[Gateway, str], system: System, unique: Any
) -> None:
    gw, url = served
    keys, runs = {}, {}
    async with httpx.AsyncClient(base_url=url) as http:
        for name in ("a", "b", "c"):
            keys[name] = await gw.tenant_key(unique(f"lv{name}"))
            started = await http.post(
                "/v1/runs", json={"agent_id": "bot"},
                headers={"Authorization": f"Bearer {keys[name]}"},
            )  # fmt: skip
            assert started.status_code == 201, started.text
            runs[name] = started.json()["run_id"]
        baseline = await _ephemeral(system)

        def stream(name: str) -> Stream:
            return Stream(http, f"/v1/runs/{runs[name]}/events?heartbeat_s=1", keys[name])

        a1 = await stream("a").open()
        assert a1.status == 200
        await wait_until(lambda: a1.saw("event: snapshot"), what="a's snapshot")
        a2 = await stream("a").open()
        assert a2.status == 429 and a2.headers["Retry-After"] == "1"
        assert a2.body["error"]["code"] == "overloaded"
        assert "has 1 event streams open, its limit" in a2.body["error"]["message"]
        b1 = await stream("b").open()
        assert b1.status == 200
        c1 = await stream("c").open()
        assert c1.status == 503 and "serves 2 event streams" in c1.body["error"]["message"]
        assert await _ephemeral(system) == baseline + 4

        # A report through the gateway reaches the viewer of its run.
        async with AsyncMissionControlClient(url, keys["b"]) as client:
            verdict = await client.report_usage(
                runs["b"], 1, model="gpt-4o-mini", input_tokens=10, output_tokens=7
            )
        assert verdict.abort is False and verdict.pricing_status == "priced"
        await wait_until(lambda: b1.saw("event: usage"), what="b's usage")
        assert '"output_tokens":7' in b1.lines[b1.lines.index("event: usage") + 1]
        await wait_until(lambda: b1.saw(": heartbeat"), what="b's heartbeat")

        # A client that leaves gives its slot back (to its tenant and to the process), and its
        # consumers go.
        async def reopens(name: str) -> bool:
            again = await stream(name).open()
            await again.close()
            return again.status == 200

        await a1.close()
        await wait_until(lambda: reopens("a"), what="a's slot given back")
        await b1.close()
        await wait_until(lambda: reopens("c"), what="the process's slot given back")

        async def consumers_gone() -> bool:
            return await _ephemeral(system) == baseline

        await wait_until(consumers_gone, timeout=30, what="the streams' consumers deleted")
