"""workflow-engine on real NATS and PostgreSQL: RPCs, optimistic concurrency, stop on violation."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from nats.js import JetStreamContext
from psycopg_pool import AsyncConnectionPool

from libs.contracts import envelope_for, stream_id_for
from libs.contracts.envelope import EventEnvelope
from libs.contracts.events import PolicyViolationDetected, StepRecorded
from libs.contracts.registry import decode
from libs.contracts.subjects import EVENTS_STREAM, event_subject
from libs.errors import Conflict, InvalidInput, NotFound
from libs.eventbus.jetstream import connect, ensure_streams
from libs.eventbus.rpc import RequestMeta, RpcClient
from libs.eventbus.store import EventStore
from libs.runtime.service_host import ServiceContext
from libs.settings import get_settings
from services.workflow_engine.bootstrap import WorkflowEngineService
from services.workflow_engine.domain import RecordStep
from services.workflow_engine.entrypoints import violation_consumer_spec
from services.workflow_engine.handlers import WorkflowHandlers
from tests.conftest import System, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
async def workflow(
    system: System, pool: AsyncConnectionPool, tenant: str, unique: Callable[[str], str]
) -> AsyncIterator[WorkflowEngineService]:
    nc = await connect(system.nats_url, "test-workflow")
    js = nc.jetstream()
    await ensure_streams(js)
    # The production consumer, narrowed to this test's tenant under a durable of its own.
    spec = violation_consumer_spec(durable=unique("wf-violations-"), tenant_id=tenant)
    svc = WorkflowEngineService(violation_spec=spec)
    ctx = ServiceContext.wire(svc.name, get_settings(), nc, pool)
    await svc.start(ctx)
    await wait_until(svc.ready, what="workflow-engine ready")
    yield svc
    await svc.stop()
    with contextlib.suppress(Exception):
        await js.delete_consumer(EVENTS_STREAM, spec.durable)
    await nc.close()


def _rpc(svc: WorkflowEngineService) -> RpcClient:
    assert svc.ctx is not None
    return RpcClient(svc.ctx.nc)


async def _call(svc: WorkflowEngineService, method: str, tenant: str, **body: Any) -> Any:
    return await _rpc(svc).call("workflow", method, {"tenant_id": tenant, **body})


def _item(run_id: str, step: int, **extra: Any) -> dict[str, Any]:
    return {"run_id": run_id, "step_index": step, "model": "gpt-x", "input_tokens": 10, **extra}


async def _events(pool: AsyncConnectionPool, tenant: str, run_id: str) -> list[EventEnvelope]:
    return await EventStore(pool).read_stream(stream_id_for(tenant, "run", run_id))


async def test_start_record_finish_and_get_a_run(
    workflow: WorkflowEngineService, pool: AsyncConnectionPool, tenant: str
) -> None:
    started = await _call(workflow, "start_run", tenant, agent_id="agent-1", labels={"env": "ci"})
    run_id = started["run_id"]
    assert started["status"] == "running"
    assert len(run_id) == 36 and run_id[14] == "7"  # a generated UUIDv7
    assert len(started["positions"]) == 1

    rec = await _call(
        workflow,
        "record_steps",
        tenant,
        items=[_item(run_id, 1, output_tokens=5), _item(run_id, 2)],
    )
    assert rec["recorded"] == 2
    assert rec["positions"] == sorted(rec["positions"])
    assert rec["positions"][0] > started["positions"][0]

    got = await _call(workflow, "get_run", tenant, run_id=run_id)
    assert (got["status"], got["steps"], got["tokens_used"], got["version"]) == (
        "running",
        [1, 2],
        25,
        3,
    )
    assert got["labels"] == {"env": "ci"}

    done = await _call(workflow, "finish_run", tenant, run_id=run_id, status="completed")
    assert done["status"] == "completed"
    with pytest.raises(Conflict, match="is completed"):
        await _call(workflow, "record_steps", tenant, items=[_item(run_id, 3)])
    with pytest.raises(Conflict, match="is completed"):
        await _call(workflow, "finish_run", tenant, run_id=run_id, status="failed")

    stored = await _events(pool, tenant, run_id)
    assert [e.event_type for e in stored] == [
        "run.started",
        "run.step_recorded",
        "run.step_recorded",
        "run.completed",
    ]
    assert [e.stream_version for e in stored] == [1, 2, 3, 4]
    # The step events carry the run's agent, taken from the run state.
    assert decode(stored[1]).agent_id == "agent-1"  # type: ignore[attr-defined]


async def test_start_with_a_given_id_twice_is_a_conflict(
    workflow: WorkflowEngineService, tenant: str, unique: Callable[[str], str]
) -> None:
    run_id = unique("run-")
    assert (await _call(workflow, "start_run", tenant, run_id=run_id, agent_id="a"))[
        "run_id"
    ] == run_id
    with pytest.raises(Conflict, match="already exists"):
        await _call(workflow, "start_run", tenant, run_id=run_id, agent_id="a")


async def test_a_duplicate_step_is_kept_and_marked(
    workflow: WorkflowEngineService,
    pool: AsyncConnectionPool,
    tenant: str,
    unique: Callable[[str], str],
) -> None:
    run_id = unique("run-")
    await _call(workflow, "start_run", tenant, run_id=run_id, agent_id="a")
    await _call(workflow, "record_steps", tenant, items=[_item(run_id, i) for i in (1, 2, 3)])
    await _call(workflow, "record_steps", tenant, items=[_item(run_id, 3)])
    events = await _events(pool, tenant, run_id)
    assert len(events) == 5
    again = decode(events[-1])
    assert isinstance(again, StepRecorded)
    assert again.step_index == 3
    assert again.irregularities == ["unadmitted", "duplicate"]


async def test_unknown_run_and_other_tenants_run_are_not_found(
    workflow: WorkflowEngineService, tenant: str, unique: Callable[[str], str]
) -> None:
    run_id = unique("run-")
    await _call(workflow, "start_run", tenant, run_id=run_id, agent_id="a")
    other = unique("other")
    with pytest.raises(NotFound):
        await _call(workflow, "get_run", other, run_id=run_id)
    with pytest.raises(NotFound):
        await _call(workflow, "record_steps", other, items=[_item(run_id, 1)])
    with pytest.raises(NotFound):
        await _call(workflow, "get_run", tenant, run_id=unique("nope-"))


async def test_batch_across_three_runs_is_one_all_or_nothing_transaction(
    workflow: WorkflowEngineService,
    pool: AsyncConnectionPool,
    tenant: str,
    unique: Callable[[str], str],
) -> None:
    runs = [unique(f"run{i}-") for i in range(3)]
    for r in runs:
        await _call(workflow, "start_run", tenant, run_id=r, agent_id=f"agent-{r}")
    items = [_item(runs[i % 3], i // 3 + 1) for i in range(9)]  # interleaved runs
    rec = await _call(workflow, "record_steps", tenant, items=items)
    assert rec["recorded"] == 9
    assert len(set(rec["positions"])) == 9
    # positions[i] is the position of items[i]'s event.
    by_position = {}
    for r in runs:
        for e in await _events(pool, tenant, r):
            by_position[e.position] = e
    for item, pos in zip(items, rec["positions"], strict=True):
        event = decode(by_position[pos])
        assert (event.run_id, event.step_index) == (item["run_id"], item["step_index"])  # type: ignore[attr-defined]
        assert event.agent_id == f"agent-{item['run_id']}"  # type: ignore[attr-defined]

    # One bad item rejects the whole batch: nothing of it is stored for any run.
    await _call(workflow, "finish_run", tenant, run_id=runs[2], status="completed")
    bad = [_item(runs[0], 4), _item(runs[1], 4), _item(runs[2], 4)]
    with pytest.raises(Conflict, match="is completed"):
        await _call(workflow, "record_steps", tenant, items=bad)
    assert [len(await _events(pool, tenant, r)) for r in runs] == [4, 4, 5]


async def test_invalid_requests_name_the_field(
    workflow: WorkflowEngineService, tenant: str, unique: Callable[[str], str]
) -> None:
    with pytest.raises(InvalidInput, match="agent_id"):
        await _call(workflow, "start_run", tenant)
    with pytest.raises(InvalidInput, match=r"items\.0\.step_index"):
        await _call(workflow, "record_steps", tenant, items=[_item("r1", 0)])
    with pytest.raises(InvalidInput, match=r"items\.1\.input_tokens"):
        await _call(
            workflow,
            "record_steps",
            tenant,
            items=[_item("r1", 1), _item("r1", 2, input_tokens=-1)],
        )
    with pytest.raises(InvalidInput, match="items"):
        await _call(workflow, "record_steps", tenant, items=[])
    with pytest.raises(InvalidInput, match="status"):
        await _call(workflow, "finish_run", tenant, run_id="r1", status="stopped_by_policy")
    with pytest.raises(InvalidInput, match="tenant_id"):
        await _rpc(workflow).call("workflow", "get_run", {"tenant_id": "Bad.Tenant", "run_id": "r"})


async def test_envelopes_carry_request_metadata(
    workflow: WorkflowEngineService,
    pool: AsyncConnectionPool,
    tenant: str,
    unique: Callable[[str], str],
) -> None:
    run_id = unique("run-")
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    await _rpc(workflow).call(
        "workflow",
        "start_run",
        {"tenant_id": tenant, "run_id": run_id, "agent_id": "agent-9"},
        headers={"Mc-Correlation-Id": "corr-1", "traceparent": traceparent},
    )
    await _rpc(workflow).call(
        "workflow",
        "record_steps",
        {"tenant_id": tenant, "items": [_item(run_id, 1)]},
        headers={"Mc-Correlation-Id": "corr-2", "Mc-Actor": "user:alice"},
    )
    started, step = await _events(pool, tenant, run_id)
    assert (started.correlation_id, started.actor) == ("corr-1", "agent:agent-9")
    assert started.trace_context.traceparent == traceparent
    assert (step.correlation_id, step.actor) == ("corr-2", "user:alice")


async def test_concurrent_record_steps_on_one_run_lose_and_duplicate_nothing(
    workflow: WorkflowEngineService,
    pool: AsyncConnectionPool,
    tenant: str,
    unique: Callable[[str], str],
) -> None:
    run_id = unique("run-")
    await _call(workflow, "start_run", tenant, run_id=run_id, agent_id="a")
    store = EventStore(pool)
    # Five writers (as five replicas would be), each with a cache warmed at the same version, so
    # all but one of them must hit the optimistic-concurrency check and retry. Three of them race
    # for the same step: the first to land records it, the others are kept marked duplicate.
    writers = [WorkflowHandlers(store) for _ in range(5)]
    for w in writers:
        await w.get_run(tenant, run_id)
    meta = RequestMeta.from_headers({})
    wanted = [1, 2, 3, 3, 3]

    async def record(i: int) -> int | Conflict:
        step = RecordStep(run_id=run_id, step_index=wanted[i])
        try:
            await writers[i].record_steps(tenant, [step], meta)
        except Conflict as exc:
            return exc
        return wanted[i]

    results = await asyncio.gather(*(record(i) for i in range(5)))
    recorded = sorted(r for r in results if isinstance(r, int))
    conflicts = [r for r in results if isinstance(r, Conflict)]
    assert recorded, "at least the first writer must get through"
    assert len(recorded) + len(conflicts) == 5  # a writer that gave up was told so
    events = await _events(pool, tenant, run_id)
    assert [e.stream_version for e in events] == list(range(1, len(events) + 1))
    stored = [decode(e) for e in events[1:]]
    steps = sorted(s.step_index for s in stored)  # type: ignore[attr-defined]
    assert steps == recorded  # every acknowledged step stored exactly once, and nothing else
    threes = [s for s in stored if s.step_index == 3]  # type: ignore[attr-defined]
    duplicates = ["duplicate" in s.irregularities for s in threes]  # type: ignore[attr-defined]
    assert duplicates == [False] + [True] * (len(threes) - 1)
    assert workflow.handlers is not None
    state = await workflow.handlers.get_run(tenant, run_id)
    assert sorted(state.steps) == sorted(set(recorded))


async def test_a_stale_cache_never_writes_past_the_end_of_a_run(
    workflow: WorkflowEngineService,
    pool: AsyncConnectionPool,
    tenant: str,
    unique: Callable[[str], str],
) -> None:
    run_id = unique("run-")
    await _call(workflow, "start_run", tenant, run_id=run_id, agent_id="a")
    stale = WorkflowHandlers(EventStore(pool))
    assert (await stale.get_run(tenant, run_id)).status == "running"  # cached as running
    await _call(workflow, "finish_run", tenant, run_id=run_id, status="failed", reason="boom")
    with pytest.raises(Conflict, match="is failed"):
        await stale.record_steps(
            tenant, [RecordStep(run_id=run_id, step_index=1)], RequestMeta.from_headers({})
        )
    assert len(await _events(pool, tenant, run_id)) == 2


async def test_a_batch_on_runs_another_replica_changed_catches_up_instead_of_conflicting(
    pool: AsyncConnectionPool, tenant: str, unique: Callable[[str], str]
) -> None:
    # Two replicas on one database, each with its own cache. Replica A starts six runs (and caches
    # them), replica B then records a step on each, so A's cache is behind on all six. Nothing is
    # concurrent: A's batch must catch up and succeed. No retry budget at all on A, so the stale
    # cache refresh may not count as a concurrency retry.
    store = EventStore(pool)
    a = WorkflowHandlers(store, max_retries=0)
    b = WorkflowHandlers(store)
    meta = RequestMeta.from_headers({})
    run_ids = [unique(f"run{i}-") for i in range(6)]
    for run_id in run_ids:
        await a.start_run(tenant, run_id, "agent-1", {}, meta)
    await b.record_steps(tenant, [RecordStep(run_id=r, step_index=1) for r in run_ids], meta)
    for run_id in run_ids:  # A's cache is behind on every run of its coming batch
        cached = a.runs.cached(tenant, run_id)
        assert cached is not None and cached.version == 1

    # Two steps for the first run, interleaved, so positions must map back per item.
    items = [RecordStep(run_id=r, step_index=2) for r in run_ids]
    items.insert(2, RecordStep(run_id=run_ids[0], step_index=3))
    reply = await a.record_steps(tenant, items, meta)

    assert reply["recorded"] == 7
    for run_id in run_ids:
        events = await _events(pool, tenant, run_id)
        want = [1, 2, 3] if run_id == run_ids[0] else [1, 2]
        assert [e.stream_version for e in events] == list(range(1, len(want) + 2))
        assert [decode(e).step_index for e in events[1:]] == want  # type: ignore[attr-defined]
        state = a.runs.cached(tenant, run_id)
        assert state is not None and state.version == len(events)  # caught up, not ahead
        assert state == await b.get_run(tenant, run_id)
    by_position = {
        e.position: (decode(e).run_id, decode(e).step_index)  # type: ignore[attr-defined]
        for r in run_ids
        for e in (await _events(pool, tenant, r))[1:]  # the steps, after run.started
    }
    assert [by_position[p] for p in reply["positions"]] == [(i.run_id, i.step_index) for i in items]


def _violation(tenant: str, run_id: str, step: int, unique: Callable[[str], str]) -> EventEnvelope:
    return envelope_for(
        PolicyViolationDetected(
            violation_id=unique("v-"),
            decision_id=unique("d-"),
            run_id=run_id,
            agent_id="a",
            step_index=step,
            policy_id="token_limit",
            severity="high",
            message="step would exceed the token budget",
            bundle_digest="sha256:test",
        ),
        tenant_id=tenant,
        stream_id=stream_id_for(tenant, "decisions", run_id),
        correlation_id="corr-violation",
        actor="service:policy-admission",
    )


async def _publish(js: JetStreamContext, env: EventEnvelope, msg_id: str) -> None:
    # What the relay does; no relay runs on the shared system (it holds a global lock).
    await js.publish(
        event_subject(env.tenant_id, env.event_type),
        env.model_dump_json().encode(),
        headers={"Nats-Msg-Id": msg_id},
    )


async def test_a_violation_stops_the_run_at_its_step_exactly_once(
    workflow: WorkflowEngineService,
    pool: AsyncConnectionPool,
    tenant: str,
    unique: Callable[[str], str],
) -> None:
    run_id = unique("run-")
    await _call(workflow, "start_run", tenant, run_id=run_id, agent_id="a")
    await _call(workflow, "record_steps", tenant, items=[_item(run_id, 1), _item(run_id, 2)])
    env = _violation(tenant, run_id, 3, unique)
    (stored,) = await EventStore(pool).append(env.stream_id, [env])
    assert workflow.ctx is not None and workflow.handlers is not None
    assert workflow.consumer is not None
    js, handlers, consumer = workflow.ctx.js, workflow.handlers, workflow.consumer
    await _publish(js, stored, str(stored.event_id))

    async def stopped() -> bool:
        return (await handlers.get_run(tenant, run_id)).status == "stopped_by_policy"

    await wait_until(stopped, what="run stopped_by_policy")
    got = await _call(workflow, "get_run", tenant, run_id=run_id)
    assert (got["stopped_at_step"], got["violation_policy_id"]) == (3, "token_limit")
    stop = (await _events(pool, tenant, run_id))[-1]
    assert stop.event_type == "run.stopped_by_policy"
    assert stop.causation_id == str(stored.event_id)
    assert stop.correlation_id == "corr-violation"
    assert decode(stop).decision_id == stored.payload["decision_id"]  # type: ignore[attr-defined]

    with pytest.raises(Conflict, match="stopped_by_policy at step 3"):
        await _call(workflow, "record_steps", tenant, items=[_item(run_id, 3)])

    # Redelivery: the same event under another message id gets past JetStream's dedup window.
    await _publish(js, stored, f"{stored.event_id}-again")
    await wait_until(lambda: consumer.stats.duplicates >= 1, what="redelivery handled")
    # A second, distinct violation for the stopped run changes nothing either.
    second = _violation(tenant, run_id, 4, unique)
    (second_stored,) = await EventStore(pool).append(second.stream_id, [second])
    await _publish(js, second_stored, str(second_stored.event_id))
    await wait_until(lambda: consumer.stats.applied >= 2, what="second violation handled")
    types = [e.event_type for e in await _events(pool, tenant, run_id)]
    assert types.count("run.stopped_by_policy") == 1
    assert consumer.stats.dead_lettered == 0


async def test_workflow_definitions_over_the_bus(
    workflow: WorkflowEngineService, tenant: str
) -> None:
    await _call(workflow, "register_agent", tenant, agent_id="fetcher")
    document = {
        "name": "triage",
        "steps": [
            {"id": "fetch", "agent": "fetcher"},
            {"id": "act", "agent": "fetcher", "depends_on": ["fetch"]},
        ],
    }
    saved = await _call(workflow, "save_workflow", tenant, document=document)
    assert (saved["version"], saved["created"]) == (1, True)
    fetch, act = document["steps"]
    cyclic = {**document, "steps": [{**fetch, "depends_on": ["act"]}, act]}
    with pytest.raises(InvalidInput, match=r"cycle: (act → fetch → act|fetch → act → fetch)"):
        await _call(workflow, "save_workflow", tenant, document=cyclic)
    unknown = {**document, "steps": [{"id": "x", "agent": "nobody"}]}
    with pytest.raises(InvalidInput, match="agent 'nobody'"):
        await _call(workflow, "save_workflow", tenant, document=unknown)
    listed = await _call(workflow, "list_workflows", tenant)
    assert [w["workflow_id"] for w in listed["workflows"]] == ["triage"]
    got = await _call(workflow, "get_workflow", tenant, workflow_id="triage")
    assert got["document"]["steps"][1]["depends_on"] == ["fetch"]
    with pytest.raises(NotFound):
        await _call(workflow, "get_workflow", "someone-else", workflow_id="triage")
