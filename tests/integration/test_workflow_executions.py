"""Workflow executions on real NATS and PostgreSQL: dispatch through work queues, retries,
timeouts, aborts, and the index a restarted engine resumes from."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig
from psycopg_pool import AsyncConnectionPool

from libs.contracts import stream_id_for
from libs.contracts.subjects import WORK_STREAM, work_subject
from libs.errors import Conflict, Forbidden, InvalidInput
from libs.eventbus.db import open_pool
from libs.eventbus.jetstream import connect, ensure_streams
from libs.eventbus.relay import Relay
from libs.eventbus.rpc import RpcClient
from libs.eventbus.store import EventStore
from libs.runtime.service_host import ServiceContext
from libs.settings import get_settings
from services.workflow_engine.bootstrap import WorkflowEngineService
from services.workflow_engine.entrypoints import (
    dispatch_consumer_spec,
    execution_consumer_spec,
    violation_consumer_spec,
)
from tests.conftest import System, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
async def pool(own_system: System) -> AsyncIterator[AsyncConnectionPool]:
    pool = await open_pool(own_system.service_url, max_size=8)
    yield pool
    await pool.close()


# Its own servers: executions move only when their events come back through the relay, and a
# relay on the shared session system would republish every other test's events.
@pytest.fixture
async def engine(
    own_system: System, pool: AsyncConnectionPool, tenant: str, unique: Callable[[str], str]
) -> AsyncIterator[WorkflowEngineService]:
    async with running_engine(own_system, pool, tenant, unique) as svc:
        yield svc


@contextlib.asynccontextmanager
async def running_engine(
    own_system: System,
    pool: AsyncConnectionPool,
    tenant: str,
    unique: Callable[[str], str],
    run_ends_of: str | None = None,
) -> AsyncIterator[WorkflowEngineService]:
    """An engine and a relay; its consumer of run ends reads ``run_ends_of``'s (default: the
    test tenant's)."""
    nc = await connect(own_system.nats_url, "test-executions")
    js = nc.jetstream()
    await ensure_streams(js)
    relay = Relay(own_system.service_url, js, name=unique("relay-"), idle_wait=0.2)
    relay_task = asyncio.create_task(relay.run(), name=unique("executions-relay-"))
    specs = (
        violation_consumer_spec(durable=unique("v-"), tenant_id=tenant),
        execution_consumer_spec(durable=unique("x-"), tenant_id=run_ends_of or tenant),
        dispatch_consumer_spec(durable=unique("d-"), tenant_id=tenant),
    )
    svc = WorkflowEngineService(*specs)
    await svc.start(ServiceContext.wire(svc.name, get_settings(), nc, pool))
    await wait_until(svc.ready, what="workflow-engine ready")
    yield svc
    await svc.stop()
    relay.stop()
    await asyncio.wait_for(relay_task, 10)
    await nc.close()


async def call(svc: WorkflowEngineService, method: str, tenant: str, **body: Any) -> Any:
    assert svc.ctx is not None
    return await RpcClient(svc.ctx.nc).call("workflow", method, {"tenant_id": tenant, **body})


class Queue:
    """An agent's work queue, read as a worker would."""

    def __init__(self, nc: NATS, tenant: str, agent: str) -> None:
        self.nc, self.tenant, self.agent = nc, tenant, agent
        self.sub: Any = None

    async def open(self) -> Queue:
        js = self.nc.jetstream()
        durable = f"w-{self.tenant}-{self.agent}"
        await js.add_consumer(
            WORK_STREAM,
            ConsumerConfig(
                durable_name=durable,
                ack_policy=AckPolicy.EXPLICIT,
                filter_subject=work_subject(self.tenant, self.agent),
            ),
        )
        self.sub = await js.pull_subscribe_bind(durable, stream=WORK_STREAM)
        return self

    async def take(self, n: int, timeout: float = 15) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        loop_deadline = timeout
        while len(got) < n and loop_deadline > 0:
            try:
                msgs = await self.sub.fetch(n - len(got), timeout=1)
            except NatsTimeout:
                loop_deadline -= 1
                continue
            for m in msgs:
                await m.ack()
                got.append(orjson.loads(m.data))
        assert len(got) == n, f"expected {n} work items, got {got}"
        return got

    async def nothing_more(self) -> bool:
        try:
            msgs = await self.sub.fetch(1, timeout=1)
        except NatsTimeout:
            return True
        return not msgs


DOC = {
    "name": "fanout",
    "steps": [
        {"id": "a", "agent": "bot"},
        {"id": "b", "agent": "bot", "depends_on": ["a"]},
        {"id": "c", "agent": "bot", "depends_on": ["a"]},
        {"id": "d", "agent": "bot", "depends_on": ["b", "c"], "risk_tier": "write"},
    ],
}


async def setup_workflow(svc: WorkflowEngineService, tenant: str, doc: dict[str, Any]) -> None:
    await call(svc, "register_agent", tenant, agent_id="bot")
    await call(svc, "save_workflow", tenant, document=doc)


async def finish(svc: WorkflowEngineService, tenant: str, run_id: str, status: str) -> None:
    await call(svc, "finish_run", tenant, run_id=run_id, status=status, reason="worker said so")


async def test_a_dag_runs_each_step_once_through_the_work_queue(
    engine: WorkflowEngineService, pool: AsyncConnectionPool, tenant: str
) -> None:
    assert engine.ctx is not None
    queue = await Queue(engine.ctx.nc, tenant, "bot").open()
    await setup_workflow(engine, tenant, DOC)
    started = await call(engine, "start_execution", tenant, workflow_id="fanout", inputs={"k": 1})
    eid = started["execution_id"]
    assert started["status"] == "running"

    (a,) = await queue.take(1)
    assert (a["step_id"], a["attempt"], a["inputs"]) == ("a", 1, {"k": 1})
    await finish(engine, tenant, a["run_id"], "completed")
    b, c = sorted(await queue.take(2), key=lambda i: i["step_id"])
    assert (b["step_id"], c["step_id"]) == ("b", "c")
    await finish(engine, tenant, b["run_id"], "completed")
    await finish(engine, tenant, c["run_id"], "completed")
    (d,) = await queue.take(1)
    assert d["risk_tier"] == "write"
    await finish(engine, tenant, d["run_id"], "completed")

    async def completed() -> bool:
        got = await call(engine, "get_execution", tenant, execution_id=eid)
        return bool(got["status"] == "completed")

    await wait_until(completed, what="execution completed")
    assert await queue.nothing_more()
    events = await EventStore(pool).read_stream(stream_id_for(tenant, "execution", eid))
    dispatched = [e.payload["run_id"] for e in events if e.event_type.endswith("dispatched")]
    assert sorted(dispatched) == sorted(f"{eid}:{s}:1" for s in "abcd")
    listed = await call(engine, "list_executions", tenant)
    assert [x["status"] for x in listed["executions"]] == ["completed"]
    # The detail times every step and names the chain that decided the execution's duration:
    # a, then whichever of b and c ended last, then d.
    got = await call(engine, "get_execution", tenant, execution_id=eid)
    slow = max(("b", "c"), key=lambda s: {x["step_id"]: x for x in got["steps"]}[s]["finished_at"])
    assert got["critical_path"] == ["a", slow, "d"]
    assert [x["on_critical_path"] for x in got["steps"]] == [
        x["step_id"] in ("a", slow, "d") for x in got["steps"]
    ]
    assert all(x["started_at"] and x["finished_at"] and x["queued_ms"] == 0 for x in got["steps"])
    total_ms = sum(x["queued_ms"] + x["running_ms"] for x in got["steps"] if x["on_critical_path"])
    assert got["critical_path_ms"] == pytest.approx(total_ms, abs=0.01)
    # Each attempt is a governed run of its agent, labelled with its execution.
    run = await call(engine, "get_run", tenant, run_id=a["run_id"])
    assert run["agent_id"] == "bot" and run["labels"]["execution_id"] == eid


async def test_the_listing_filters_by_status_workflow_and_time_and_pages_with_a_cursor(
    engine: WorkflowEngineService, tenant: str
) -> None:
    await setup_workflow(engine, tenant, DOC)
    await call(engine, "save_workflow", tenant, document={**DOC, "name": "other"})
    started = []
    for name in ("fanout", "other", "fanout", "other", "fanout"):
        got = await call(engine, "start_execution", tenant, workflow_id=name)
        started.append(got["execution_id"])
    newest_first = list(reversed(started))
    await call(engine, "abort_execution", tenant, execution_id=started[0], reason="enough")

    seen: list[str] = []
    cursor = None
    for _ in range(5):
        page = await call(engine, "list_executions", tenant, limit=2,
                          **({"cursor": cursor} if cursor else {}))  # fmt: skip
        assert len(page["executions"]) <= 2
        seen += [x["execution_id"] for x in page["executions"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == newest_first  # every execution once, in order, and then no cursor

    def ids(page: dict[str, Any]) -> list[str]:
        return [x["execution_id"] for x in page["executions"]]

    by_wf = await call(engine, "list_executions", tenant, workflow_id="other")
    assert ids(by_wf) == [started[3], started[1]]
    aborted = await call(engine, "list_executions", tenant, status="aborted")
    assert ids(aborted) == [started[0]]
    third = await call(engine, "get_execution", tenant, execution_id=started[2])
    since = await call(engine, "list_executions", tenant, started_after=third["started_at"])
    assert ids(since) == newest_first[:3]
    before = await call(engine, "list_executions", tenant, started_before=third["started_at"])
    assert ids(before) == newest_first[3:]
    with pytest.raises(InvalidInput, match="cursor"):
        await call(engine, "list_executions", tenant, cursor="bm90LWEtY3Vyc29y")
    with pytest.raises(InvalidInput, match="time zone"):
        await call(engine, "list_executions", tenant, started_after="2026-01-01T00:00:00")


CHAIN = {
    "name": "chain",
    "steps": [{"id": "a", "agent": "bot"}, {"id": "b", "agent": "bot", "depends_on": ["a"]}],
}


async def test_a_finished_attempt_moves_its_execution_at_once_without_the_run_end_consumer(
    own_system: System, pool: AsyncConnectionPool, tenant: str, unique: Callable[[str], str]
) -> None:
    # The engine's consumer of run ends reads another tenant's: only the engine's own reaction
    # to the finish it serves can move this execution.
    async with running_engine(own_system, pool, tenant, unique, run_ends_of="nobody") as engine:
        assert engine.ctx is not None
        queue = await Queue(engine.ctx.nc, tenant, "bot").open()
        await setup_workflow(engine, tenant, CHAIN)
        eid = (await call(engine, "start_execution", tenant, workflow_id="chain"))["execution_id"]
        (a,) = await queue.take(1)
        await finish(engine, tenant, a["run_id"], "completed")
        (b,) = await queue.take(1)
        assert (b["step_id"], b["attempt"]) == ("b", 1)
        events = await EventStore(pool).read_stream(stream_id_for(tenant, "execution", eid))
        done = next(e for e in events if e.event_type == "execution.step_completed")
        runs = await EventStore(pool).read_stream(stream_id_for(tenant, "run", a["run_id"]))
        ended = next(e for e in runs if e.event_type == "run.completed")
        assert done.causation_id == str(
            ended.event_id
        )  # caused by the run's end, as by the consumer
        await finish(engine, tenant, b["run_id"], "completed")
        got = await call(engine, "get_execution", tenant, execution_id=eid)
        assert got["status"] == "completed"
        assert await queue.nothing_more()


async def test_the_run_end_consumer_moves_an_execution_the_engine_did_not_move_at_once(
    engine: WorkflowEngineService, tenant: str
) -> None:
    assert engine.ctx is not None and engine.handlers is not None
    engine.handlers.after_finish = None  # as when the engine dies right after the run's end
    queue = await Queue(engine.ctx.nc, tenant, "bot").open()
    await setup_workflow(engine, tenant, CHAIN)
    await call(engine, "start_execution", tenant, workflow_id="chain")
    (a,) = await queue.take(1)
    await finish(engine, tenant, a["run_id"], "completed")
    (b,) = await queue.take(1)  # through the relay and the consumer of run ends
    assert b["step_id"] == "b"
    assert await queue.nothing_more()


async def test_a_failed_attempt_is_retried_and_a_timed_out_one_is_ended(
    engine: WorkflowEngineService, tenant: str
) -> None:
    assert engine.ctx is not None
    queue = await Queue(engine.ctx.nc, tenant, "bot").open()
    doc = {
        "name": "flaky",
        "steps": [{"id": "s", "agent": "bot", "retries": 2, "retry_backoff_s": 0, "timeout_s": 1}],
    }
    await setup_workflow(engine, tenant, doc)
    eid = (await call(engine, "start_execution", tenant, workflow_id="flaky"))["execution_id"]
    (first,) = await queue.take(1)
    await finish(engine, tenant, first["run_id"], "failed")
    (second,) = await queue.take(1)
    assert second["attempt"] == 2
    # Nobody finishes the second attempt: its deadline fails it and the third goes out.
    (third,) = await queue.take(1, timeout=20)
    assert third["attempt"] == 3
    late = await call(engine, "get_run", tenant, run_id=second["run_id"])
    assert late["status"] == "failed"  # ended by the engine, so a late worker cannot go on
    await finish(engine, tenant, third["run_id"], "completed")

    async def completed() -> bool:
        got = await call(engine, "get_execution", tenant, execution_id=eid)
        return bool(got["status"] == "completed")

    await wait_until(completed, what="execution completed after retries")


async def test_abort_ends_the_running_attempts_runs(
    engine: WorkflowEngineService, tenant: str
) -> None:
    assert engine.ctx is not None
    queue = await Queue(engine.ctx.nc, tenant, "bot").open()
    await setup_workflow(engine, tenant, DOC)
    eid = (await call(engine, "start_execution", tenant, workflow_id="fanout"))["execution_id"]
    (a,) = await queue.take(1)
    aborted = await call(engine, "abort_execution", tenant, execution_id=eid, reason="wrong input")
    assert aborted["status"] == "aborted"
    run = await call(engine, "get_run", tenant, run_id=a["run_id"])
    assert run["status"] == "failed"
    assert await queue.nothing_more()


async def test_an_irreversible_step_waits_in_the_approval_queue_until_approved(
    engine: WorkflowEngineService, tenant: str
) -> None:
    assert engine.ctx is not None
    queue = await Queue(engine.ctx.nc, tenant, "bot").open()
    rules = {"irreversible": {"required": 2, "role": "approver", "sla_s": 600}}
    set_ = await call(engine, "set_approval_rules", tenant, rules=rules)
    assert set_["rules"]["irreversible"]["required"] == 2
    doc = {"name": "payout", "steps": [{"id": "pay", "agent": "bot", "risk_tier": "irreversible"}]}
    await setup_workflow(engine, tenant, doc)
    eid = (await call(engine, "start_execution", tenant, workflow_id="payout"))["execution_id"]
    assert await queue.nothing_more()
    (waiting,) = (await call(engine, "approval_queue", tenant))["approvals"]
    assert (waiting["execution_id"], waiting["step_id"], waiting["required"]) == (eid, "pay", 2)
    assert 0 < waiting["sla_left_s"] <= 600
    # Its age and the SLA left add up to the SLA (both measured at the same instant).
    assert waiting["age_s"] >= 0 and waiting["age_s"] + waiting["sla_left_s"] == pytest.approx(600)

    async def approve(who: str, role: str) -> Any:
        return await call(
            engine, "approve_step", tenant, execution_id=eid, step_id="pay",
            approver=who, role=role, reason="checked the amount",
        )  # fmt: skip

    with pytest.raises(Forbidden, match="needs the role approver"):
        await approve("user:olga", "operator")
    await approve("user:ann", "approver")
    assert await queue.nothing_more()
    with pytest.raises(Conflict, match="already approved"):
        await approve("user:ann", "approver")
    after = await approve("user:bob", "admin")
    assert after["steps"][0]["approval"]["approvers"] == ["user:ann", "user:bob"]
    (item,) = await queue.take(1)
    assert item["step_id"] == "pay"
    assert (await call(engine, "approval_queue", tenant))["approvals"] == []
