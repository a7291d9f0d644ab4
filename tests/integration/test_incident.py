"""incident on real NATS and PostgreSQL: one incident per violation, acknowledge and resolve."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import pytest
from prometheus_client import generate_latest
from psycopg_pool import AsyncConnectionPool

from libs.contracts import envelope_for, stream_id_for
from libs.contracts.envelope import EventEnvelope
from libs.contracts.events import BudgetThresholdCrossed, PolicyViolationDetected
from libs.contracts.subjects import EVENTS_STREAM, event_subject
from libs.errors import Conflict, InvalidInput, NotFound
from libs.eventbus.jetstream import connect, ensure_streams
from libs.eventbus.rpc import RpcClient
from libs.eventbus.store import EventStore
from libs.runtime.service_host import ServiceContext
from libs.settings import get_settings
from services.incident.bootstrap import IncidentService
from services.incident.domain import incident_id_for
from services.incident.entrypoints import budget_consumer_spec, violation_consumer_spec
from tests.conftest import System, wait_until

pytestmark = pytest.mark.integration

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture
async def incident(
    system: System, pool: AsyncConnectionPool, tenant: str, unique: Callable[[str], str]
) -> AsyncIterator[IncidentService]:
    nc = await connect(system.nats_url, "test-incident")
    js = nc.jetstream()
    await ensure_streams(js)
    # The production consumer, narrowed to this test's tenant under a durable of its own.
    spec = violation_consumer_spec(durable=unique("inc-violations-"), tenant_id=tenant)
    budgets = budget_consumer_spec(durable=unique("inc-budgets-"), tenant_id=tenant)
    svc = IncidentService(violation_spec=spec, budget_spec=budgets)
    ctx = ServiceContext.wire(svc.name, get_settings(), nc, pool)
    await svc.start(ctx)
    await wait_until(svc.ready, what="incident ready")
    yield svc
    await svc.stop()
    with contextlib.suppress(Exception):
        await js.delete_consumer(EVENTS_STREAM, spec.durable)
    with contextlib.suppress(Exception):
        await js.delete_consumer(EVENTS_STREAM, budgets.durable)
    await nc.close()


async def _call(svc: IncidentService, method: str, tenant: str, **body: Any) -> Any:
    assert svc.ctx is not None
    return await RpcClient(svc.ctx.nc).call("incident", method, {"tenant_id": tenant, **body})


def _violation(tenant: str, violation_id: str, run_id: str = "run-1") -> EventEnvelope:
    return envelope_for(
        PolicyViolationDetected(
            violation_id=violation_id,
            decision_id="d-1",
            run_id=run_id,
            agent_id="agent-1",
            step_index=3,
            policy_id="token_limit",
            severity="critical",
            message="step would exceed the token budget",
            bundle_digest="sha256:test",
        ),
        tenant_id=tenant,
        stream_id=stream_id_for(tenant, "decisions", run_id),
        correlation_id="corr-violation",
        actor="service:policy-admission",
        trace_context={"traceparent": TRACEPARENT},  # type: ignore[arg-type]
    )


async def _append_and_publish(svc: IncidentService, env: EventEnvelope) -> EventEnvelope:
    assert svc.ctx is not None
    (stored,) = await svc.ctx.store.append(env.stream_id, [env])
    await _publish(svc, stored, str(stored.event_id))
    return stored


async def _publish(svc: IncidentService, env: EventEnvelope, msg_id: str) -> None:
    # What the relay does; no relay runs on the shared system (it holds a global lock).
    assert svc.ctx is not None
    await svc.ctx.js.publish(
        event_subject(env.tenant_id, env.event_type),
        env.model_dump_json().encode(),
        headers={"Nats-Msg-Id": msg_id},
    )


async def _rows(pool: AsyncConnectionPool, violation_id: str) -> list[dict[str, Any]]:
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT * FROM incident.incidents WHERE violation_id = %s", (violation_id,)
        )
        return [dict(r) for r in await cur.fetchall()]


async def _opened_events(pool: AsyncConnectionPool, tenant: str) -> list[EventEnvelope]:
    return [
        e
        for e in await EventStore(pool).read_all(tenant_id=tenant)
        if e.event_type == "incident.opened"
    ]


async def test_a_violation_opens_exactly_one_incident(
    incident: IncidentService, pool: AsyncConnectionPool, tenant: str, unique: Callable[[str], str]
) -> None:
    vid = unique("v-")
    iid = incident_id_for(vid)
    stored = await _append_and_publish(incident, _violation(tenant, vid))

    async def row_exists() -> bool:
        return len(await _rows(pool, vid)) == 1

    await wait_until(row_exists, what="incident row")
    got = await _call(incident, "get", tenant, incident_id=iid)
    assert got["status"] == "open"
    assert got["severity"] == "critical"
    assert got["title"] == "token_limit denied step 3 of run run-1"
    assert got["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"  # from the violation's trace
    (opened,) = await _opened_events(pool, tenant)
    assert opened.stream_id == stream_id_for(tenant, "incident", iid)
    assert opened.causation_id == str(stored.event_id)
    assert opened.correlation_id == "corr-violation"

    consumer = incident.consumer
    assert consumer is not None
    # Redelivery of the same event (another message id gets past JetStream's dedup window).
    await _publish(incident, stored, f"{stored.event_id}-again")
    await wait_until(lambda: consumer.stats.duplicates >= 1, what="redelivery handled")
    # A distinct event about the same violation (say, re-appended upstream) is applied, and
    # still opens nothing new.
    await _append_and_publish(incident, _violation(tenant, vid))
    await wait_until(lambda: consumer.stats.applied >= 2, what="second event applied")

    assert len(await _opened_events(pool, tenant)) == 1
    rows = await _rows(pool, vid)
    assert len(rows) == 1
    assert (str(rows[0]["incident_id"]), rows[0]["status"], rows[0]["tenant_id"]) == (
        iid,
        "open",
        tenant,
    )
    assert consumer.stats.dead_lettered == 0


async def test_acknowledge_then_resolve_and_tenant_isolation(
    incident: IncidentService, pool: AsyncConnectionPool, tenant: str, unique: Callable[[str], str]
) -> None:
    vid = unique("v-")
    iid = incident_id_for(vid)
    await _append_and_publish(incident, _violation(tenant, vid))

    async def row_exists() -> bool:
        return len(await _rows(pool, vid)) == 1

    await wait_until(row_exists, what="incident row")

    other = unique("other")
    with pytest.raises(NotFound):
        await _call(incident, "acknowledge", other, incident_id=iid, by="mallory")
    with pytest.raises(NotFound):
        await _call(incident, "get", other, incident_id=iid)

    acked = await _call(incident, "acknowledge", tenant, incident_id=iid, by="alice")
    assert (acked["status"], acked["acknowledged_by"]) == ("acknowledged", "alice")
    assert acked["acknowledged_at"] is not None
    again = await _call(incident, "acknowledge", tenant, incident_id=iid, by="bob")
    assert again["acknowledged_by"] == "alice"  # idempotent: nothing new recorded
    assert again["version"] == 2

    with pytest.raises(InvalidInput, match="resolution"):
        await _call(incident, "resolve", tenant, incident_id=iid, by="alice", resolution="")
    with pytest.raises(NotFound):
        await _call(incident, "resolve", other, incident_id=iid, by="m", resolution="mine now")
    resolved = await _call(
        incident, "resolve", tenant, incident_id=iid, by="alice", resolution="raised the budget"
    )
    assert (resolved["status"], resolved["resolution"], resolved["version"]) == (
        "resolved",
        "raised the budget",
        3,
    )
    with pytest.raises(Conflict, match="already resolved"):
        await _call(incident, "resolve", tenant, incident_id=iid, by="alice", resolution="again")
    with pytest.raises(Conflict, match="resolved"):
        await _call(incident, "acknowledge", tenant, incident_id=iid, by="alice")

    events = await EventStore(pool).read_stream(stream_id_for(tenant, "incident", iid))
    assert [e.event_type for e in events] == [
        "incident.opened",
        "incident.acknowledged",
        "incident.resolved",
    ]
    assert events[1].actor == "user:alice"
    (row,) = await _rows(pool, vid)
    assert (row["status"], row["acknowledged_by"], row["resolved_by"], row["version"]) == (
        "resolved",
        "alice",
        "alice",
        3,
    )
    assert row["resolution"] == "raised the budget"


async def test_bad_requests_name_the_field(incident: IncidentService, tenant: str) -> None:
    with pytest.raises(InvalidInput, match="incident_id"):
        await _call(incident, "get", tenant, incident_id="not-a-uuid")
    with pytest.raises(InvalidInput, match="by"):
        await _call(incident, "acknowledge", tenant, incident_id=incident_id_for("x"))
    with pytest.raises(NotFound):
        await _call(incident, "get", tenant, incident_id=incident_id_for("never-opened"))


# --- application metrics --------------------------------------------------------------------------


def _metrics(svc: IncidentService) -> dict[str, float]:
    assert svc.ctx is not None
    text = generate_latest(svc.ctx.registry).decode()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("mc_incident")
    }


async def test_metrics_count_opened_and_acknowledged_incidents_and_time_to_ack(
    incident: IncidentService, pool: AsyncConnectionPool, tenant: str, unique: Callable[[str], str]
) -> None:
    metrics = incident.metrics
    assert metrics is not None
    await metrics.refresh(pool)
    before = _metrics(incident)
    opened = 'mc_incidents_opened_total{severity="critical"}'
    acked = 'mc_incidents_acknowledged_total{severity="critical"}'
    to_ack = 'mc_incident_time_to_acknowledge_seconds_count{severity="critical"}'
    assert {opened, acked, to_ack} <= set(before)

    vid = unique("v-")
    await _append_and_publish(incident, _violation(tenant, vid))

    async def counted_open() -> bool:
        await metrics.refresh(pool)
        return _metrics(incident)[opened] == before[opened] + 1

    await wait_until(counted_open, what="the new incident counted")
    assert _metrics(incident)[acked] == before[acked]

    iid = incident_id_for(vid)
    await _call(incident, "acknowledge", tenant, incident_id=iid, by="alice")
    # Acknowledging again changes nothing, and counts nothing.
    await _call(incident, "acknowledge", tenant, incident_id=iid, by="alice")
    await metrics.refresh(pool)
    after = _metrics(incident)
    assert after[acked] == before[acked] + 1
    assert after[to_ack] == before[to_ack] + 1
    assert after[opened] == before[opened] + 1
    (inf,) = [
        value
        for series, value in after.items()
        if series.startswith("mc_incident_time_to_acknowledge_seconds_bucket")
        and 'severity="critical"' in series
        and 'le="+Inf"' in series
    ]
    assert inf == after[to_ack]


def _budget_alert(tenant: str, pct: int, window_key: str = "2026-11-30") -> EventEnvelope:
    return envelope_for(
        BudgetThresholdCrossed(
            budget_id="agent:writer:day",
            scope="agent",
            subject="writer",
            window="day",
            window_key=window_key,
            threshold_pct=pct,
            cap_usd=Decimal("2"),
            spent_usd=Decimal("1.5"),
            reserved_usd=Decimal("0.5"),
            run_id="e1:s:1",
        ),
        tenant_id=tenant,
        stream_id=stream_id_for(tenant, "budget", "agent:writer:day"),
        correlation_id="corr-budget",
        actor="service:workflow-engine",
    )


async def test_a_budget_at_100_percent_opens_one_incident_per_window(
    incident: IncidentService, pool: AsyncConnectionPool, tenant: str
) -> None:
    for pct in (80, 90, 100):
        await _append_and_publish(incident, _budget_alert(tenant, pct))
    vid = "budget:agent:writer:day:2026-11-30"

    async def row_exists() -> bool:
        return len(await _rows(pool, vid)) == 1

    await wait_until(row_exists, what="budget incident row")
    got = await _call(incident, "get", tenant, incident_id=incident_id_for(vid))
    assert got["status"] == "open" and got["policy_id"] == "budget"
    assert got["agent_id"] == "writer" and got["run_id"] == "e1:s:1"
    assert got["title"] == "budget agent:writer:day reached 100 % of its $2 cap (day 2026-11-30)"
    # The same window's alert again opens nothing new; the next day's window opens its own.
    await _append_and_publish(incident, _budget_alert(tenant, 100))
    await _append_and_publish(incident, _budget_alert(tenant, 100, "2026-12-01"))

    async def two_opened() -> bool:
        return len(await _opened_events(pool, tenant)) == 2

    await wait_until(two_opened, what="next window's incident")
    assert len(await _rows(pool, vid)) == 1
