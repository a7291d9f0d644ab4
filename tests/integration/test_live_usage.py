"""Live usage on real NATS and PostgreSQL: a worker's streamed usage priced and published on
MC_LIVE, a budget stopping the step mid-way (the stop in the log, the step blocked, the run
ended, the execution failed with the reason, the hold released), every later report told to
abort, and bad reports refused naming the problem."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import orjson
import pytest
from nats.aio.msg import Msg
from psycopg_pool import AsyncConnectionPool

from libs import errors
from libs.contracts.subjects import LIVE_STREAM, live_filter, live_subject
from libs.eventbus.db import open_pool
from tests.conftest import System, wait_until
from tests.integration.test_budgets import MODEL, Stack, setup, step, take

pytestmark = pytest.mark.integration


@pytest.fixture
async def live_pool(own_system: System) -> AsyncIterator[AsyncConnectionPool]:
    pool = await open_pool(own_system.service_url, max_size=8)
    yield pool
    await pool.close()


@pytest.fixture
async def live_stack(
    own_system: System, live_pool: AsyncConnectionPool, tenant: str, unique: Callable[[str], str]
) -> AsyncIterator[Stack]:
    s = await Stack(own_system, live_pool, tenant, unique).start(replicas=1)
    yield s
    await s.stop()


class LiveTap:
    """Everything published on MC_LIVE under one filter, through an ephemeral consumer."""

    def __init__(self) -> None:
        self.got: list[tuple[str, dict[str, Any]]] = []
        self.sub: Any = None

    async def start(self, s: Stack, subject: str) -> LiveTap:
        js = s.conns[0].jetstream()

        async def on(msg: Msg) -> None:
            self.got.append((msg.subject, orjson.loads(msg.data)))

        self.sub = await js.subscribe(subject, stream=LIVE_STREAM, cb=on, ordered_consumer=True)
        return self

    async def stop(self) -> None:
        await self.sub.unsubscribe()


def usage(output: int, *, inp: int = 1000, reasoning: int = 0, cached: int = 0) -> dict[str, Any]:
    return {"model": MODEL, "input_tokens": inp, "cached_input_tokens": cached,
            "output_tokens": output, "reasoning_tokens": reasoning}  # fmt: skip


async def test_a_budget_stops_a_step_mid_way_on_its_streamed_usage(live_stack: Stack) -> None:
    s = live_stack
    sub = await s.queue("bot")
    doc = {"name": "w", "steps": [step("a", "0.01", timeout_s=60)]}
    await setup(s, doc, ("workflow", "w", "execution", "0.02"))
    eid = (await s.call("start_execution", workflow_id="w"))["execution_id"]
    (item,) = await take(sub, 1)
    run_id = item["run_id"]
    tap = await LiveTap().start(s, live_filter(s.tenant, execution_id=eid))
    try:
        # gpt-4o-mini: $0.15/M input, $0.075/M cached, $0.60/M output. 1,000 in (200 cached) and
        # 500 out: 800 x 0.15 + 200 x 0.075 + 500 x 0.60 = $0.000435.
        first = await s.call("report_usage", run_id=run_id, step_index=1,
                             **usage(500, cached=200))  # fmt: skip
        assert first == {"abort": False, "reason": None, "cost_usd": "0.000435",
                         "pricing_status": "priced"}  # fmt: skip
        await wait_until(lambda: len(tap.got) == 1, what="the report published on MC_LIVE")
        subject, body = tap.got[0]
        assert subject == live_subject(s.tenant, eid, run_id)
        assert (body["run_id"], body["execution_id"], body["step_id"]) == (run_id, eid, "a")
        assert (body["output_tokens"], body["cached_input_tokens"]) == (500, 200)
        assert body["cost_usd"] == "0.000435" and body["abort"] is False

        # 40,000 output tokens cost $0.024 + $0.00015: more than the $0.02 cap can take.
        stop = await s.call("report_usage", run_id=run_id, step_index=1,
                            **usage(40_000, reasoning=10_000))  # fmt: skip
        assert stop["abort"] is True and stop["cost_usd"] == "0.02415"
        assert stop["reason"] == (
            "budget workflow:w:execution (" + eid + "): step 'a' was stopped mid-way: its "
            "streamed cost $0.02415 does not fit; $0 of the cap $0.02 is already spent or "
            "reserved"
        )
        await wait_until(lambda: len(tap.got) == 2, what="the stopping report published")
        assert tap.got[1][1]["abort"] is True and tap.got[1][1]["reason"] == stop["reason"]

        # Every later report is told to abort, with the same reason; nothing is stopped twice.
        again = await s.call("report_usage", run_id=run_id, step_index=1, **usage(40_001))
        assert again["abort"] is True and again["reason"] == stop["reason"]
    finally:
        await tap.stop()

    (stopped,) = await s.events("execution.step_stopped")
    p = stopped.payload
    assert stopped.stream_id == f"{s.tenant}/execution/{eid}"
    assert (p["step_id"], p["attempt"], p["run_id"], p["step_index"]) == ("a", 1, run_id, 1)
    assert (p["output_tokens"], p["reasoning_tokens"], p["model"]) == (40_000, 10_000, MODEL)
    figures = [Decimal(p[k]) for k in ("streamed_cost_usd", "cap_usd", "committed_usd")]
    assert figures == [Decimal("0.02415"), Decimal("0.02"), Decimal(0)]
    assert p["budget_id"] == "workflow:w:execution" and p["reason"] == stop["reason"]

    execution = await s.call("get_execution", execution_id=eid)
    assert execution["status"] == "failed" and execution["reason"] == stop["reason"]
    assert execution["steps"][0]["state"] == "blocked"
    run = await s.call("get_run", run_id=run_id)
    assert run["status"] == "failed" and run["end_reason"] == stop["reason"]
    # The worker's own finish comes too late: the run has ended.
    with pytest.raises(errors.Conflict):
        await s.call("finish_run", run_id=run_id, status="failed", reason="stopped")

    async def released() -> bool:
        b = await s.budget("workflow:w:execution", eid)
        return (b["reserved_usd"], b["spent_usd"]) == ("0", "0")

    await wait_until(released, what="the stopped attempt's hold released")


async def test_reports_of_free_runs_unknown_runs_and_bad_counts(live_stack: Stack) -> None:
    s = live_stack
    run_id = (await s.call("start_run", agent_id="free", run_id="free.run-1"))["run_id"]
    tap = await LiveTap().start(s, live_filter(s.tenant, run_id=run_id))
    try:
        got = await s.call("report_usage", run_id=run_id, step_index=3, model="no-such-model",
                           input_tokens=10, output_tokens=5)  # fmt: skip
        assert got == {"abort": False, "reason": None, "cost_usd": None,
                       "pricing_status": "unpriced"}  # fmt: skip
        await wait_until(lambda: len(tap.got) == 1, what="the free run's report published")
        assert tap.got[0][0] == f"mc.live.{s.tenant}._.free%2Erun-1"
        assert tap.got[0][1]["execution_id"] is None and tap.got[0][1]["step_index"] == 3
    finally:
        await tap.stop()
    await s.call("finish_run", run_id=run_id, status="completed")
    ended = await s.call("report_usage", run_id=run_id, step_index=3)
    assert ended["abort"] is True and "has ended (completed)" in ended["reason"]

    with pytest.raises(errors.NotFound, match="run nope not found"):
        await s.call("report_usage", run_id="nope", step_index=1)
    with pytest.raises(errors.InvalidInput, match="cached_input_tokens"):
        await s.call("report_usage", run_id=run_id, step_index=1, input_tokens=1,
                     cached_input_tokens=2)  # fmt: skip
    with pytest.raises(errors.InvalidInput, match="step_index"):
        await s.call("report_usage", run_id=run_id, step_index=0)
    with pytest.raises(errors.InvalidInput, match="output_tokens"):
        await s.call("report_usage", run_id=run_id, step_index=1, output_tokens=-1)
