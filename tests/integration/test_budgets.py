"""Budgets on real NATS and PostgreSQL: halting before the first step, reserving at dispatch,
settling to the cost service's figures, releasing on failure, alerts and their incident, and
no overspend under 100 concurrent executions of a 10-step DAG on two engine replicas."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig
from psycopg_pool import AsyncConnectionPool

from libs.contracts.envelope import EventEnvelope
from libs.contracts.subjects import WORK_STREAM, work_subject
from libs.eventbus.db import open_pool
from libs.eventbus.jetstream import connect, ensure_streams
from libs.eventbus.relay import Relay
from libs.eventbus.rpc import RpcClient
from libs.eventbus.store import EventStore
from libs.runtime.service_host import ServiceContext
from libs.settings import get_settings
from services.cost.bootstrap import CostService
from services.incident.bootstrap import IncidentService
from services.incident.entrypoints import budget_consumer_spec, violation_consumer_spec
from services.workflow_engine.bootstrap import WorkflowEngineService
from services.workflow_engine.entrypoints import (
    cost_consumer_spec,
    dispatch_consumer_spec,
    execution_consumer_spec,
)
from services.workflow_engine.entrypoints import (
    violation_consumer_spec as run_violation_spec,
)
from tests.conftest import System, wait_until

pytestmark = pytest.mark.integration

MODEL = "gpt-4o-mini"


class Stack:
    """Engine replicas, the cost and incident services and a relay on one test's own servers."""

    def __init__(self, system: System, pool: AsyncConnectionPool, tenant: str, unique: Any):
        self.system, self.pool, self.tenant, self.unique = system, pool, tenant, unique
        self.engines: list[WorkflowEngineService] = []
        self.others: list[Any] = []
        self.conns: list[NATS] = []
        self.relay: Relay | None = None
        self.relay_task: asyncio.Task[None] | None = None
        self.calls = 0

    async def start(self, replicas: int) -> Stack:
        nc = await self._connect()
        js = nc.jetstream()
        await ensure_streams(js)
        self.relay = Relay(self.system.service_url, js, name=self.unique("relay-"), idle_wait=0.1)
        self.relay_task = asyncio.create_task(self.relay.run(), name=self.unique("relay-"))
        t, u = self.tenant, self.unique
        # One set of durable names: the replicas share each consumer, as in production.
        specs = (
            run_violation_spec(durable=u("v-"), tenant_id=t),
            execution_consumer_spec(durable=u("x-"), tenant_id=t),
            dispatch_consumer_spec(durable=u("d-"), tenant_id=t),
            cost_consumer_spec(durable=u("c-"), tenant_id=t),
        )
        for _ in range(replicas):
            engine = WorkflowEngineService(*specs)
            await engine.start(await self._ctx(engine.name))
            self.engines.append(engine)
        cost = CostService(durable=u("cost-"))
        await cost.start(await self._ctx(cost.name))
        incident = IncidentService(
            violation_consumer_spec(durable=u("iv-"), tenant_id=t),
            budget_consumer_spec(durable=u("ib-"), tenant_id=t),
        )
        await incident.start(await self._ctx(incident.name))
        self.others = [cost, incident]
        for svc in [*self.engines, *self.others]:
            await wait_until(svc.ready, what=f"{svc.name} ready")
        return self

    async def _connect(self) -> NATS:
        nc = await connect(self.system.nats_url, self.unique("budgets-"))
        self.conns.append(nc)
        return nc

    async def _ctx(self, name: str) -> ServiceContext:
        return ServiceContext.wire(name, get_settings(), await self._connect(), self.pool)

    async def stop(self) -> None:
        for svc in [*self.engines, *self.others]:
            await svc.stop()
        if self.relay is not None and self.relay_task is not None:
            self.relay.stop()
            await asyncio.wait_for(self.relay_task, 10)
        for nc in self.conns:
            await nc.close()

    async def call(self, method: str, **body: Any) -> Any:
        """A workflow-engine request, sent through each replica's connection in turn."""
        engine = self.engines[self.calls % len(self.engines)]
        self.calls += 1
        assert engine.ctx is not None
        payload = {"tenant_id": self.tenant, **body}
        return await RpcClient(engine.ctx.nc).call("workflow", method, payload, timeout=30)

    async def queue(self, agent: str) -> Any:
        js = self.conns[0].jetstream()
        durable = f"w-{self.tenant}-{agent}"
        await js.add_consumer(
            WORK_STREAM,
            ConsumerConfig(
                durable_name=durable,
                ack_policy=AckPolicy.EXPLICIT,
                filter_subject=work_subject(self.tenant, agent),
            ),
        )
        return await js.pull_subscribe_bind(durable, stream=WORK_STREAM)

    async def budget(self, budget_id: str, execution_id: str | None = None) -> dict[str, Any]:
        body = {"execution_id": execution_id} if execution_id else {}
        listed = await self.call("list_budgets", **body)
        return next(b for b in listed["budgets"] if b["budget_id"] == budget_id)

    async def events(self, event_type: str) -> list[EventEnvelope]:
        out: list[EventEnvelope] = []
        async for batch in EventStore(self.pool).iter_all():
            out += [e for e in batch if e.tenant_id == self.tenant and e.event_type == event_type]
        return out


@pytest.fixture
async def pool(own_system: System) -> AsyncIterator[AsyncConnectionPool]:
    pool = await open_pool(own_system.service_url, max_size=12)
    yield pool
    await pool.close()


@pytest.fixture
async def stack(
    own_system: System, pool: AsyncConnectionPool, tenant: str, unique: Callable[[str], str]
) -> AsyncIterator[Stack]:
    s = await Stack(own_system, pool, tenant, unique).start(replicas=1)
    yield s
    await s.stop()


async def take(sub: Any, n: int, timeout: float = 20) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    deadline = asyncio.get_running_loop().time() + timeout
    while len(got) < n and asyncio.get_running_loop().time() < deadline:
        with contextlib.suppress(NatsTimeout):
            for m in await sub.fetch(n - len(got), timeout=1):
                await m.ack()
                got.append(orjson.loads(m.data))
    assert len(got) == n, f"expected {n} work items, got {got}"
    return got


async def scalar(pool: AsyncConnectionPool, sql: str, *args: Any) -> Any:
    async with pool.connection() as conn:
        cur = await conn.execute(sql, args)
        row = await cur.fetchone()
    return next(iter(row.values())) if row else None


async def record(s: Stack, run_id: str, input_tokens: int, output_tokens: int) -> None:
    item = {"run_id": run_id, "step_index": 1, "model": MODEL, "input_tokens": input_tokens,
            "output_tokens": output_tokens}  # fmt: skip
    await s.call("record_steps", items=[item])


async def finish(s: Stack, run_id: str, status: str = "completed") -> None:
    await s.call("finish_run", run_id=run_id, status=status, reason="worker said so")


async def setup(s: Stack, doc: dict[str, Any], *budgets: tuple[str, str, str, str]) -> None:
    await s.call("register_agent", agent_id="bot")
    await s.call("save_workflow", document=doc)
    for scope, subject, window, cap in budgets:
        await s.call("set_budget", scope=scope, subject=subject, window=window, cap_usd=cap)


async def status_of(s: Stack, eid: str) -> str:
    return str((await s.call("get_execution", execution_id=eid))["status"])


def step(sid: str, cost: str, *deps: str, **extra: Any) -> dict[str, Any]:
    return {"id": sid, "agent": "bot", "depends_on": list(deps),
            "estimate": {"cost_usd": cost}, **extra}  # fmt: skip


async def test_an_execution_over_a_cap_is_halted_before_its_first_step(stack: Stack) -> None:
    sub = await stack.queue("bot")
    doc = {"name": "big", "steps": [step("a", "0.2"), step("b", "0.2", "a")]}
    await setup(stack, doc, ("workflow", "big", "execution", "0.3"))
    started = await stack.call("start_execution", workflow_id="big")
    assert started["status"] == "failed"
    assert started["reason"] == (
        "budget workflow:big:execution (each execution): the execution's estimate $0.4 exceeds "
        "the cap $0.3"
    )
    assert all(st["state"] == "waiting" and st["run_id"] is None for st in started["steps"])
    (halted,) = await stack.events("execution.budget_exceeded")
    assert halted.payload["step_id"] is None and halted.payload["estimate_usd"] == "0.4"
    with pytest.raises(NatsTimeout):
        await sub.fetch(1, timeout=1)
    # An execution's own budget given at start is checked the same way.
    await stack.call("set_budget", scope="workflow", subject="big", window="execution",
                     cap_usd="1")  # fmt: skip
    own = await stack.call("start_execution", workflow_id="big", budget_usd="0.39")
    assert own["status"] == "failed" and "budget execution:" in own["reason"]
    fits = await stack.call("start_execution", workflow_id="big", budget_usd="0.4")
    assert fits["status"] == "running"
    got = await stack.budget(f"execution:{fits['execution_id']}:execution")
    assert (got["reserved_usd"], got["remaining_usd"]) == ("0.2", "0.2")


async def test_reservations_settle_to_the_recorded_cost_and_release_on_failure(
    stack: Stack,
) -> None:
    sub = await stack.queue("bot")
    doc = {"name": "chain", "steps": [step("a", "0.02", retries=1, retry_backoff_s=0),
                                      step("b", "0.03", "a")]}  # fmt: skip
    await setup(stack, doc, ("tenant", "", "day", "1"), ("agent", "bot", "month", "1"))
    eid = (await stack.call("start_execution", workflow_id="chain"))["execution_id"]
    (a1,) = await take(sub, 1)
    day = await stack.budget("tenant:day")
    assert (day["reserved_usd"], day["spent_usd"], day["remaining_usd"]) == ("0.02", "0", "0.98")

    # The first attempt records a step (10k in + 10k out of gpt-4o-mini: $0.0075) and fails.
    await record(stack, a1["run_id"], 10_000, 10_000)
    await finish(stack, a1["run_id"], "failed")
    (a2,) = await take(sub, 1)
    assert a2["attempt"] == 2

    async def settled(reserved: str, spent: str) -> bool:
        got = [await stack.budget(b) for b in ("tenant:day", "agent:bot:month")]
        return all((g["reserved_usd"], g["spent_usd"]) == (reserved, spent) for g in got)

    # The failed attempt's hold is gone (its cost spent, the rest released); the retry holds.
    await wait_until(lambda: settled("0.02", "0.0075"), what="first attempt settled")

    # The retry completes without recording anything: its hold is released, b's is taken.
    await finish(stack, a2["run_id"])
    (b,) = await take(sub, 1)
    await wait_until(lambda: settled("0.03", "0.0075"), what="retry released")
    # b costs more than its estimate: everything it cost is spent all the same.
    await record(stack, b["run_id"], 100_000, 50_000)  # $0.045
    await finish(stack, b["run_id"])
    await wait_until(lambda: settled("0", "0.0525"), what="b settled")

    async def completed() -> bool:
        return await status_of(stack, eid) == "completed"

    await wait_until(completed, what="completed")
    costs = await stack.events("cost.recorded")
    assert sum(Decimal(c.payload["total_cost_usd"]) for c in costs) == Decimal("0.0525")


async def test_a_timeout_and_an_abort_release_the_holds_of_their_attempts(
    stack: Stack,
) -> None:
    sub = await stack.queue("bot")
    doc = {"name": "slow", "steps": [step("s", "0.04", timeout_s=1), step("t", "0.02")]}
    await setup(stack, doc, ("tenant", "", "month", "1"))
    eid = (await stack.call("start_execution", workflow_id="slow"))["execution_id"]
    other = (await stack.call("start_execution", workflow_id="slow"))["execution_id"]
    await take(sub, 4)
    assert (await stack.budget("tenant:month"))["reserved_usd"] == "0.12"
    # The abort ends the other execution's two attempts: their holds go in the same transaction.
    await stack.call("abort_execution", execution_id=other, reason="not needed")
    assert (await stack.budget("tenant:month"))["reserved_usd"] == "0.06"

    # Nobody finishes s: its deadline fails it and the execution, ending t's attempt too.
    async def ended() -> bool:
        return await status_of(stack, eid) == "failed"

    await wait_until(ended, what="timed out")
    got = await stack.budget("tenant:month")
    assert (got["reserved_usd"], got["spent_usd"], got["remaining_usd"]) == ("0", "0", "1")


async def test_a_step_that_does_not_fit_fails_its_execution_and_100_percent_opens_an_incident(
    stack: Stack, pool: AsyncConnectionPool
) -> None:
    sub = await stack.queue("bot")
    fan = {"name": "fan", "steps": [step("x", "0.02"), step("y", "0.02")]}
    await setup(stack, fan, ("tenant", "", "day", "0.05"))
    await stack.call("set_budget_timezone", timezone="Pacific/Auckland")
    first = await stack.call("start_execution", workflow_id="fan")
    assert first["status"] == "running"
    x, y = await take(sub, 2)
    # $0.04 of $0.05 is committed: 80 % was announced.
    alerts = await stack.events("budget.threshold_crossed")
    assert [a.payload["threshold_pct"] for a in alerts] == [80]
    day = await stack.budget("tenant:day")
    assert day["window_key"] == alerts[0].payload["window_key"]  # the Auckland day

    second = await stack.call("start_execution", workflow_id="fan")
    assert second["status"] == "failed"
    assert second["reason"] == (
        f"budget tenant:day (day {day['window_key']}): step 'x' estimate $0.02 does not fit; "
        "$0.04 of the cap $0.05 is already spent or reserved"
    )
    assert {st["step_id"]: st["state"] for st in second["steps"]} == {
        "x": "blocked",
        "y": "waiting",
    }
    exceeded = await stack.events("execution.budget_exceeded")
    assert [e.payload["step_id"] for e in exceeded] == ["x"]
    assert exceeded[0].payload["committed_usd"] == "0.04"
    with pytest.raises(NatsTimeout):
        await sub.fetch(1, timeout=1)
    assert (await stack.budget("tenant:day"))["reserved_usd"] == "0.04"

    # Raising the cap lets the next one through; spending it all opens an incident.
    await stack.call("set_budget", scope="tenant", window="day", cap_usd="0.06")
    third = await stack.call("start_execution", workflow_id="fan")
    assert third["status"] == "failed"  # $0.04 + $0.04 > $0.06: the second step does not fit
    await record(stack, x["run_id"], 10_000, 10_000)
    await record(stack, y["run_id"], 100_000, 80_000)  # $0.0075 + $0.063: over the cap
    await finish(stack, x["run_id"])
    await finish(stack, y["run_id"])

    async def incident_opened() -> bool:
        sql = "SELECT count(*) FROM incident.incidents WHERE tenant_id = %s"
        return bool(await scalar(pool, sql, stack.tenant) == 1)

    await wait_until(incident_opened, what="budget incident")

    async def released() -> bool:
        return (await stack.budget("tenant:day"))["reserved_usd"] == "0"

    await wait_until(released, what="holds released")
    alerts = await stack.events("budget.threshold_crossed")
    assert [a.payload["threshold_pct"] for a in alerts] == [80, 90, 100]
    got = await stack.budget("tenant:day")
    assert (got["spent_usd"], got["reserved_usd"], got["remaining_usd"]) == ("0.0705", "0", "0")


async def test_100_concurrent_executions_on_two_engine_replicas_never_overspend(
    own_system: System, pool: AsyncConnectionPool, tenant: str, unique: Callable[[str], str]
) -> None:
    n, cap = 100, Decimal("2.5")
    s = await Stack(own_system, pool, tenant, unique).start(replicas=2)
    try:
        sub = await s.queue("bot")
        # Ten steps: a fan-out of three and its fan-in, then a fan-out of four and its fan-in;
        # each step estimated at $0.01, each costing $0.0045 when it runs (10k input and 5k
        # output tokens of gpt-4o-mini). $2.5 holds every first step at once but not every
        # execution's ten ($4.5 spent, more reserved): the later steps fit only as costs settle,
        # so the cap decides how far each execution gets.
        steps = [step("a", "0.01"), *(step(f"b{i}", "0.01", "a") for i in (1, 2, 3)),
                 step("c", "0.01", "b1", "b2", "b3"),
                 *(step(f"d{i}", "0.01", "c") for i in (1, 2, 3, 4)),
                 step("e", "0.01", "d1", "d2", "d3", "d4")]  # fmt: skip
        assert len(steps) == 10
        doc = {"name": "burst", "steps": steps}
        await setup(s, doc, ("tenant", "", "day", str(cap)), ("agent", "bot", "day", "5"))
        taken: list[str] = []
        peak = Decimal(0)
        done = asyncio.Event()

        async def work() -> None:
            while not done.is_set():
                try:
                    msgs = await sub.fetch(20, timeout=0.5)
                except (NatsTimeout, TimeoutError):
                    continue

                async def one(msg: Any) -> None:
                    await msg.ack()
                    item = orjson.loads(msg.data)
                    taken.append(item["run_id"])
                    await record(s, item["run_id"], 10_000, 5_000)
                    await finish(s, item["run_id"])

                await asyncio.gather(*(one(m) for m in msgs))

        async def watch() -> None:
            nonlocal peak
            while not done.is_set():
                committed = await scalar(
                    pool,
                    "SELECT max(reserved_usd + spent_usd) FROM workflow.budget_windows"
                    " WHERE tenant_id = %s AND budget_id = 'tenant:day'",
                    tenant,
                )
                peak = max(peak, committed or Decimal(0))
                await asyncio.sleep(0.02)  # a sampling interval, not a synchronisation

        helpers = [asyncio.create_task(work()) for _ in range(4)] + [asyncio.create_task(watch())]
        started = await asyncio.gather(
            *(s.call("start_execution", workflow_id="burst") for _ in range(n))
        )
        ids = {x["execution_id"] for x in started}

        async def all_ended() -> bool:
            ended = await scalar(
                pool,
                "SELECT count(*) FROM workflow.executions WHERE tenant_id = %s"
                " AND status IN ('completed', 'failed')",
                tenant,
            )
            return bool(ended == n)

        await wait_until(all_ended, timeout=240, interval=0.5, what="every execution ended")

        async def settled() -> bool:
            day = await s.budget("tenant:day")
            costs = await s.events("cost.recorded")
            spent = sum((Decimal(c.payload["total_cost_usd"]) for c in costs), Decimal(0))
            return day["reserved_usd"] == "0" and Decimal(day["spent_usd"]) == spent

        await wait_until(settled, timeout=60, interval=0.5, what="every hold settled")
        done.set()
        await asyncio.gather(*helpers)

        day = await s.budget("tenant:day")
        spent = Decimal(day["spent_usd"])
        assert spent <= cap, f"overspent: {spent} > {cap}"
        assert peak <= cap, f"committed {peak} > {cap} at some moment"
        dispatched = await s.events("execution.step_dispatched")
        run_ids = [e.payload["run_id"] for e in dispatched]
        assert len(run_ids) == len(set(run_ids)) == len(taken) == len(set(taken))
        completed = await s.events("execution.step_completed")
        assert sorted(e.payload["run_id"] for e in completed) == sorted(run_ids)
        # No step of an execution was dispatched twice (each is its first and only attempt).
        steps_run = [(e.payload["execution_id"], e.payload["step_id"]) for e in dispatched]
        assert len(steps_run) == len(set(steps_run))
        assert all(e.payload["attempt"] == 1 for e in dispatched)
        assert spent == Decimal("0.0045") * len(run_ids)
        statuses: dict[str, int] = {}
        for eid in ids:
            got = await s.call("get_execution", execution_id=eid)
            statuses[got["status"]] = statuses.get(got["status"], 0) + 1
            if got["status"] == "failed":
                assert got["reason"].startswith("budget tenant:day (day ")
            else:  # every step of a completed execution ran, once
                assert [st["state"] for st in got["steps"]] == ["completed"] * 10
        # The cap was what stopped executions, and it let work through: every first step fits
        # at once and the headroom left takes more. How many executions finish all ten steps
        # depends on how reservations and settlements interleave (each step reserves on its
        # own, so a fan-out can be cut short in every execution), so none is required to.
        assert statuses.get("failed", 0) > 0, statuses
        assert len(run_ids) > n, len(run_ids)
        assert len(await s.events("execution.budget_exceeded")) == statuses["failed"]
    finally:
        await s.stop()
