"""The handlers of workflow-engine, incident, cost and admission on the in-memory event store.

The same handlers run on PostgreSQL in ``tests/integration``; the twin passes the same event
store contract, so these check the handlers' own logic quickly and without servers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest

from libs.contracts import envelope_for, stream_id_for
from libs.contracts.envelope import DomainEvent, EventEnvelope
from libs.contracts.events import (
    CostRecorded,
    PolicyViolationDetected,
    RunStarted,
    RunStoppedByPolicy,
    StepRecorded,
)
from libs.contracts.registry import decode
from libs.errors import Conflict, NotFound
from libs.eventbus.memory import InMemoryEventStore
from libs.eventbus.repository import begin
from libs.eventbus.rpc import RequestMeta
from libs.eventbus.uow import UnitOfWork
from services.cost.handlers import CostHandlers, cost_stream
from services.incident.domain import Incident, incident_id_for
from services.incident.handlers import IncidentHandlers
from services.policy_admission.bundle import load_bundle
from services.policy_admission.handlers import BUNDLE_STREAM, AdmissionHandler, activate_bundle
from services.workflow_engine.domain import RecordStep
from services.workflow_engine.handlers import WorkflowHandlers

pytestmark = pytest.mark.unit

T = "acme"
META = RequestMeta.from_headers({"Mc-Correlation-Id": "corr-1"})


def _envelope(event: DomainEvent, stream_id: str, tenant: str = T) -> EventEnvelope:
    return envelope_for(
        event, tenant_id=tenant, stream_id=stream_id, correlation_id="corr-v", actor="test"
    )


def _violation(run_id: str, step: int, violation_id: str = "v-1") -> EventEnvelope:
    return _envelope(
        PolicyViolationDetected(
            violation_id=violation_id,
            decision_id=violation_id,
            run_id=run_id,
            agent_id="a1",
            step_index=step,
            policy_id="token_limit",
            severity="high",
            message="over the budget",
            bundle_digest="sha256:x",
        ),
        stream_id_for(T, "decisions", run_id),
    )


async def _stored(store: InMemoryEventStore, env: EventEnvelope) -> EventEnvelope:
    (out,) = await store.append(env.stream_id, [env])
    return out


async def _consume(
    store: InMemoryEventStore, handler: Callable[[UnitOfWork, Any], Any], arg: Any
) -> None:
    """What the consumer does: the effect in one transaction (its applied record goes there too)."""
    async with begin(store) as uow:
        await handler(uow, arg)


# --- workflow-engine -----------------------------------------------------------------------------


async def test_workflow_start_record_finish_with_positions_and_actors() -> None:
    store = InMemoryEventStore()
    wf = WorkflowHandlers(store)
    started = await wf.start_run(T, "r1", "agent-1", {"env": "ci"}, META)
    assert started["status"] == "running" and len(started["positions"]) == 1
    items = [RecordStep(run_id="r1", step_index=i, input_tokens=10) for i in (2, 1)]
    rec = await wf.record_steps(T, items, META)
    assert rec["recorded"] == 2
    done = await wf.finish_run(T, "r1", "completed", None, META)
    assert done["status"] == "completed"
    with pytest.raises(Conflict, match="is completed"):
        await wf.record_steps(T, [RecordStep(run_id="r1", step_index=3)], META)
    events = await store.read_stream(stream_id_for(T, "run", "r1"))
    assert [e.position for e in events[1:3]] == rec["positions"]
    assert [decode(e).step_index for e in events[1:3]] == [2, 1]  # type: ignore[attr-defined]
    assert {e.actor for e in events} == {"agent:agent-1"}
    assert {e.correlation_id for e in events} == {"corr-1"}
    state = await wf.get_run(T, "r1")
    assert (state.tokens_used, state.version, state.labels) == (20, 4, {"env": "ci"})
    with pytest.raises(NotFound):
        await wf.get_run("other", "r1")


async def test_workflow_batch_over_runs_is_all_or_nothing() -> None:
    store = InMemoryEventStore()
    wf = WorkflowHandlers(store)
    for r in ("a", "b"):
        await wf.start_run(T, r, "agent-1", {}, META)
    await wf.finish_run(T, "b", "failed", "boom", META)
    with pytest.raises(Conflict, match="is failed"):
        await wf.record_steps(
            T, [RecordStep(run_id="a", step_index=1), RecordStep(run_id="b", step_index=1)], META
        )
    assert (await wf.get_run(T, "a")).steps == frozenset()


async def test_workflow_stale_replica_never_writes_past_the_end_of_a_run() -> None:
    store = InMemoryEventStore()
    live, stale = WorkflowHandlers(store), WorkflowHandlers(store, max_retries=0)
    await live.start_run(T, "r1", "a", {}, META)
    await stale.get_run(T, "r1")
    await live.finish_run(T, "r1", "failed", None, META)
    with pytest.raises(Conflict, match="is failed"):
        await stale.record_steps(T, [RecordStep(run_id="r1", step_index=1)], META)
    assert len(await store.read_stream(stream_id_for(T, "run", "r1"))) == 2


async def test_workflow_stops_a_run_once_however_often_violations_arrive() -> None:
    store = InMemoryEventStore()
    wf = WorkflowHandlers(store)
    await wf.start_run(T, "r1", "a1", {}, META)
    violation = await _stored(store, _violation("r1", 3))
    await _consume(store, wf.stop_for_violation, violation)
    await _consume(store, wf.stop_for_violation, violation)
    await _consume(store, wf.stop_for_violation, await _stored(store, _violation("r1", 4, "v-2")))
    events = await store.read_stream(stream_id_for(T, "run", "r1"))
    stops = [e for e in events if e.event_type == "run.stopped_by_policy"]
    assert len(stops) == 1
    assert stops[0].causation_id == str(violation.event_id)
    assert stops[0].correlation_id == "corr-v"
    assert stops[0].actor == "service:workflow-engine"
    stop = decode(stops[0])
    assert isinstance(stop, RunStoppedByPolicy) and stop.step_index == 3
    state = await wf.get_run(T, "r1")
    assert (state.status, state.stopped_at_step) == ("stopped_by_policy", 3)
    # Steps admitted before the stop may still report; the stopped one may not.
    await wf.record_steps(T, [RecordStep(run_id="r1", step_index=2)], META)
    with pytest.raises(Conflict, match="stopped_by_policy at step 3"):
        await wf.record_steps(T, [RecordStep(run_id="r1", step_index=3)], META)


# --- incident ------------------------------------------------------------------------------------


class MemoryIncidentTable:
    """The twin of ``incident.incidents``: one row per violation."""

    def __init__(self) -> None:
        self.rows: dict[str, Incident] = {}

    async def insert(self, uow: UnitOfWork, incident: Incident) -> bool:
        if any(r.violation_id == incident.violation_id for r in self.rows.values()):
            return False
        self.rows[incident.incident_id] = incident
        return True

    async def update(self, uow: UnitOfWork, incident: Incident) -> None:
        known = self.rows.get(incident.incident_id)
        if known is not None and known.version < incident.version:
            self.rows[incident.incident_id] = incident


async def test_incident_one_per_violation_then_acknowledged_and_resolved() -> None:
    store, table = InMemoryEventStore(), MemoryIncidentTable()
    handlers = IncidentHandlers(store, table=table)
    violation = await _stored(store, _violation("r1", 3))
    for _ in range(3):
        await _consume(store, handlers.open_for_violation, violation)
    iid = incident_id_for("v-1")
    events = await store.read_stream(stream_id_for(T, "incident", iid))
    assert [e.event_type for e in events] == ["incident.opened"]
    assert events[0].causation_id == str(violation.event_id)
    assert list(table.rows) == [iid] and table.rows[iid].status == "open"

    acked = await handlers.acknowledge(T, iid, "alice", META)
    again = await handlers.acknowledge(T, iid, "bob", META)
    assert acked.status == again.status == "acknowledged" and again.acknowledged_by == "alice"
    resolved = await handlers.resolve(T, iid, "alice", "raised the budget", META)
    assert resolved.status == "resolved" and table.rows[iid].status == "resolved"
    with pytest.raises(Conflict, match="is resolved"):
        await handlers.acknowledge(T, iid, "bob", META)
    assert [e.actor for e in await store.read_stream(stream_id_for(T, "incident", iid))] == [
        "service:incident",
        "user:alice",
        "user:alice",
    ]
    with pytest.raises(NotFound):
        await handlers.get("other", iid)


async def test_incident_replicas_racing_on_one_violation_open_one_incident() -> None:
    store, table = InMemoryEventStore(), MemoryIncidentTable()
    replicas = [IncidentHandlers(store, table=table) for _ in range(4)]
    violation = await _stored(store, _violation("r1", 3))
    await asyncio.gather(*(_consume(store, r.open_for_violation, violation) for r in replicas))
    events = await store.read_stream(stream_id_for(T, "incident", incident_id_for("v-1")))
    assert len(events) == 1 and len(table.rows) == 1


# --- cost ----------------------------------------------------------------------------------------


def _recorded_step(run_id: str, i: int, model: str | None, tin: int, tout: int) -> EventEnvelope:
    return _envelope(
        StepRecorded(
            run_id=run_id,
            agent_id="a1",
            step_index=i,
            model=model,
            input_tokens=tin,
            output_tokens=tout,
        ),
        stream_id_for(T, "run", run_id),
    )


async def test_cost_prices_steps_with_the_tenants_table_in_one_append() -> None:
    store = InMemoryEventStore()
    cost = CostHandlers(store)
    published = await cost.set_prices(
        T,
        [{"model": "custom-1", "input_per_token": "0.000001", "output_per_token": "0.000002"}],
        correlation_id="c",
        actor="admin",
    )
    assert published == {"version": 1, "price_table_version": "builtin-2026.11+tenant.1"}
    steps = [
        await _stored(store, _recorded_step("r1", 1, "custom-1", 1000, 200)),
        await _stored(store, _recorded_step("r1", 2, "mystery-9", 10, 10)),
    ]
    await _consume(store, cost.cost_steps, steps)
    out = await store.read_stream(cost_stream(T, "r1"))
    costs = [decode(e) for e in out]
    assert all(isinstance(c, CostRecorded) for c in costs)
    first, second = costs
    assert isinstance(first, CostRecorded) and isinstance(second, CostRecorded)
    assert first.total_cost_usd == Decimal("0.0014")
    assert first.price_table_version == "builtin-2026.11+tenant.1"
    assert second.pricing_status == "unpriced" and second.total_cost_usd is None
    assert [e.causation_id for e in out] == [str(s.event_id) for s in steps]
    listing = await cost.prices(T)
    assert listing["version"] == 1


async def test_cost_concurrent_price_changes_get_consecutive_versions() -> None:
    store = InMemoryEventStore()
    cost = CostHandlers(store)

    async def publish(price: str) -> Any:
        return await cost.set_prices(
            T,
            [{"model": "m", "input_per_token": price, "output_per_token": price}],
            correlation_id="c",
            actor="test",
        )

    results = await asyncio.gather(publish("0.1"), publish("0.2"), publish("0.3"))
    assert sorted(r["version"] for r in results) == [1, 2, 3]
    assert (await cost.price_table(T)).version == "builtin-2026.11+tenant.3"


# --- admission -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle() -> Any:
    return load_bundle()


async def _run(store: InMemoryEventStore, run_id: str, *events: DomainEvent) -> None:
    sid = stream_id_for(T, "run", run_id)
    await store.append(sid, [_envelope(e, sid) for e in events])


def _ask(step: int, tin: int, tout: int) -> dict[str, Any]:
    return {
        "run_id": "r1",
        "step_index": step,
        "model": "gpt-4o",
        "estimate": {"input_tokens": tin, "max_output_tokens": tout},
    }


async def test_admission_parallel_admissions_cannot_overrun_the_token_limit(bundle: Any) -> None:
    store = InMemoryEventStore()
    # Two replicas sharing one store, as two processes share PostgreSQL.
    replicas = [AdmissionHandler(store, bundle), AdmissionHandler(store, bundle)]
    await _run(store, "r1", RunStarted(run_id="r1", agent_id="a1"))
    answers = await asyncio.gather(
        *(replicas[i % 2].admit(T, _ask(i, 1000, 1000), {}) for i in range(1, 11))
    )
    assert [a["outcome"] for a in answers].count("allow") == 5
    decisions = await store.read_stream(stream_id_for(T, "decisions", "r1"))
    violations = [e for e in decisions if e.event_type == "policy.violation_detected"]
    # The first denial is the run's violation; the rest are refused for the run's state.
    assert len(violations) == 1
    # A violation is caused by the decision recorded just before it.
    by_id = {str(e.event_id): e for e in decisions}
    assert all(by_id[v.causation_id or ""].event_type == "admission.decided" for v in violations)


async def test_admission_reads_its_own_writes_and_releases_reservations(bundle: Any) -> None:
    store = InMemoryEventStore()
    admission = AdmissionHandler(store, bundle)
    with pytest.raises(NotFound):
        await admission.admit(T, _ask(1, 1, 1), {})
    await _run(store, "r1", RunStarted(run_id="r1", agent_id="a1"))
    first = await admission.admit(T, _ask(1, 3000, 3000), {"Mc-Correlation-Id": "c-1"})
    assert first["outcome"] == "allow"
    second = await admission.admit(T, _ask(2, 2000, 2000), {})
    assert second["context"]["tokens_reserved"] == 6000
    step1 = StepRecorded(run_id="r1", agent_id="a1", step_index=1, model="gpt-4o", input_tokens=600)
    await _run(store, "r1", step1)
    third = await admission.admit(T, _ask(3, 2000, 2000), {})
    assert third["context"]["tokens_used"] == 600
    assert third["context"]["tokens_reserved"] == 4000
    # A cold replica folds the same history to the same context; the warm one then sees the
    # cold one's decision too.
    cold = await AdmissionHandler(store, bundle).admit(T, _ask(4, 1, 1), {})
    warm = await admission.admit(T, _ask(5, 1, 1), {})
    assert (cold["context"]["tokens_reserved"], warm["context"]["tokens_reserved"]) == (8000, 8002)
    assert cold["context"]["tokens_used"] == warm["context"]["tokens_used"] == 600
    (decided, *_) = await store.read_stream(stream_id_for(T, "decisions", "r1"))
    assert (decided.correlation_id, decided.actor) == ("c-1", "service:policy-admission")


async def test_bundle_activation_is_recorded_once_per_digest(bundle: Any) -> None:
    store = InMemoryEventStore()
    results = await asyncio.gather(*(activate_bundle(store, bundle) for _ in range(3)))
    assert sorted(results) == [False, False, True]
    assert await activate_bundle(store, bundle) is False
    assert len(await store.read_stream(BUNDLE_STREAM)) == 1


class CountingBegins(InMemoryEventStore):
    """The twin, counting the transactions begun on it."""

    def __init__(self) -> None:
        super().__init__()
        self.begins = 0

    def begin(self):  # type: ignore[no-untyped-def]
        self.begins += 1
        return super().begin()


async def test_admission_group_commits_waiting_decisions_and_answers_after_the_commit(
    bundle: Any,
) -> None:
    store = CountingBegins()
    admission = AdmissionHandler(store, bundle)
    for run in ("r1", "r2", "r3"):
        await _run(store, run, RunStarted(run_id=run, agent_id="a1"))
    store.begins = 0
    asks = [{**_ask(i, 1000, 1000), "run_id": f"r{1 + i % 3}"} for i in range(1, 10)] + [
        {**_ask(1, 1, 1), "run_id": "missing"}
    ]
    pending = [asyncio.ensure_future(admission.admit(T, a, {})) for a in asks]
    answered: list[str] = []
    for next_done in asyncio.as_completed(pending[:-1]):
        answer = await next_done
        # Durable before answered: the decision is already in the committed store.
        decided = [
            e.payload["decision_id"]
            for run in ("r1", "r2", "r3")
            for e in await store.read_stream(stream_id_for(T, "decisions", run))
        ]
        assert answer["decision_id"] in decided
        answered.append(answer["outcome"])
    with pytest.raises(NotFound):  # one bad request fails alone, not its batch
        await pending[-1]
    assert answered == ["allow"] * 9
    assert store.begins == 1  # ten requests, one transaction
    # Within the batch each decision saw the ones before it on the same run.
    contexts = [(await p)["context"]["tokens_reserved"] for p in pending[:-1]]
    assert sorted(contexts) == [0, 0, 0, 2000, 2000, 2000, 4000, 4000, 4000]
