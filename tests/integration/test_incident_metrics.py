"""The incident service's application metrics, read from its table, on real NATS and PostgreSQL."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

import pytest
from prometheus_client import generate_latest
from psycopg_pool import AsyncConnectionPool

from libs.contracts import envelope_for, stream_id_for
from libs.contracts.events import PolicyViolationDetected
from libs.contracts.subjects import EVENTS_STREAM, event_subject
from libs.eventbus.jetstream import connect, ensure_streams
from libs.eventbus.rpc import RpcClient
from libs.runtime.service_host import ServiceContext
from libs.settings import get_settings
from services.incident.bootstrap import IncidentService
from services.incident.domain import incident_id_for
from services.incident.entrypoints import violation_consumer_spec
from tests.conftest import System, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
async def incident(
    system: System, pool: AsyncConnectionPool, tenant: str, unique: Callable[[str], str]
) -> AsyncIterator[IncidentService]:
    nc = await connect(system.nats_url, "test-incident-metrics")
    js = nc.jetstream()
    await ensure_streams(js)
    spec = violation_consumer_spec(durable=unique("inc-metrics-"), tenant_id=tenant)
    svc = IncidentService(violation_spec=spec)
    await svc.start(ServiceContext.wire(svc.name, get_settings(), nc, pool))
    await wait_until(svc.ready, what="incident ready")
    yield svc
    await svc.stop()
    with contextlib.suppress(Exception):
        await js.delete_consumer(EVENTS_STREAM, spec.durable)
    await nc.close()


def _metrics(svc: IncidentService) -> dict[str, float]:
    assert svc.ctx is not None
    text = generate_latest(svc.ctx.registry).decode()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("mc_incident")
    }


async def test_opened_acknowledged_and_time_to_ack_are_counted(
    incident: IncidentService, pool: AsyncConnectionPool, tenant: str, unique: Callable[[str], str]
) -> None:
    assert incident.metrics is not None and incident.ctx is not None
    await incident.metrics.refresh(pool)
    before = _metrics(incident)
    opened = 'mc_incidents_opened_total{severity="critical"}'
    acked = 'mc_incidents_acknowledged_total{severity="critical"}'
    to_ack = 'mc_incident_time_to_acknowledge_seconds_count{severity="critical"}'
    assert {opened, acked, to_ack} <= set(before)

    vid = unique("v-")
    env = envelope_for(
        PolicyViolationDetected(
            violation_id=vid,
            decision_id="d-1",
            run_id="run-1",
            agent_id="agent-1",
            step_index=3,
            policy_id="token_limit",
            severity="critical",
            message="step would exceed the token budget",
            bundle_digest="sha256:test",
        ),
        tenant_id=tenant,
        stream_id=stream_id_for(tenant, "decisions", "run-1"),
        correlation_id="corr-violation",
        actor="service:policy-admission",
    )
    (stored,) = await incident.ctx.store.append(env.stream_id, [env])
    await incident.ctx.js.publish(
        event_subject(tenant, stored.event_type),
        stored.model_dump_json().encode(),
        headers={"Nats-Msg-Id": str(stored.event_id)},
    )

    async def counted_open() -> bool:
        assert incident.metrics is not None
        await incident.metrics.refresh(pool)
        return _metrics(incident)[opened] == before[opened] + 1

    await wait_until(counted_open, what="the new incident counted")
    assert _metrics(incident)[acked] == before[acked]

    iid = incident_id_for(vid)
    rpc = RpcClient(incident.ctx.nc)
    await rpc.call("incident", "acknowledge", {"tenant_id": tenant, "incident_id": iid, "by": "a"})
    # Acknowledging again changes nothing, and counts nothing.
    await rpc.call("incident", "acknowledge", {"tenant_id": tenant, "incident_id": iid, "by": "a"})
    await incident.metrics.refresh(pool)
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
