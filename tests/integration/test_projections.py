"""The audit projections end to end: store → relay → JetStream → projector → chDB → RPC queries."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry
from psycopg_pool import AsyncConnectionPool

from libs.contracts import envelope_for, stream_id_for
from libs.contracts.envelope import EventEnvelope
from libs.contracts.events import IncidentAcknowledged
from libs.errors import InvalidInput, NotFound
from libs.eventbus.db import open_pool
from libs.eventbus.jetstream import connect, ensure_streams
from libs.eventbus.relay import Relay
from libs.eventbus.rpc import RpcClient
from libs.eventbus.store import EventStore
from libs.runtime.service_host import ServiceContext
from libs.settings import Settings
from services.audit_replay import schema
from services.audit_replay.bootstrap import AuditReplayService
from services.audit_replay.clickhouse import Clickhouse, embedded_dsn
from services.audit_replay.handlers import Projector
from tests.conftest import System, wait_until
from tests.unit.test_audit_domain import POLICY, bundle_event, flow

pytestmark = pytest.mark.integration


@dataclass
class Audit:
    """A running audit service on servers of its own, plus the relay that feeds it."""

    nc: NATS
    js: JetStreamContext
    pool: AsyncConnectionPool
    store: EventStore
    ch: Clickhouse
    ctx: ServiceContext
    service: AuditReplayService
    rpc: RpcClient

    async def call(self, method: str, tenant: str, **params: Any) -> Any:
        return await self.rpc.call("audit", method, {"tenant_id": tenant, **params}, timeout=20)

    async def append(self, envs: list[EventEnvelope]) -> int:
        """Append one event at a time (keeping the given order); return the last position."""
        last = 0
        for e in envs:
            (out,) = await self.store.append(e.stream_id, [e])
            last = out.position or last
        return last

    async def projected(self, position: int) -> None:
        async def caught_up() -> bool:
            p = self.service.projector
            return p is not None and await p.refresh_position() >= position

        await wait_until(caught_up, timeout=30, what=f"projection to reach {position}")

    async def start_service(self) -> None:
        # A fresh registry: the gauges of a previous start are registered in the old one.
        self.ctx = replace(self.ctx, registry=CollectorRegistry(), tasks=[])
        self.service = AuditReplayService(self.ch)
        await self.service.start(self.ctx)
        await wait_until(self.service.ready, what="audit service ready")


@pytest.fixture
async def audit(own_system: System, tmp_path: Path) -> AsyncIterator[Audit]:
    nc = await connect(own_system.nats_url, "audit-test")
    js = nc.jetstream()
    await ensure_streams(js)
    pool = await open_pool(own_system.service_url, max_size=5)
    store = EventStore(pool)
    relay = Relay(own_system.service_url, js, idle_wait=0.2)
    relay_task = asyncio.create_task(relay.run())
    ch = Clickhouse(embedded_dsn(tmp_path / "clickhouse"))
    # Its own data dir: the evidence signing key is generated there. No answer cache: these
    # tests compare answers around writes made behind the service's back (a second projector);
    # tests/integration/test_console_insights.py starts the service with it.
    settings = Settings.model_validate(
        {"MC_DATA_DIR": str(tmp_path / "data"), "MC_ANSWER_CACHE_MB": "0"}
    )
    ctx = ServiceContext.wire("audit-replay", settings, nc, pool)
    a = Audit(nc, js, pool, store, ch, ctx, AuditReplayService(ch), RpcClient(nc))
    try:
        await a.start_service()
        yield a
    finally:
        await a.service.stop()
        relay.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(relay_task, 10)
        await ch.close()
        await nc.close()
        await pool.close()


GROUPS = ("run", "agent", "model", "workflow", "day")


async def snapshot(a: Audit, tenant: str, run_id: str) -> dict[str, Any]:
    """Every query's answer about one tenant, for comparisons."""
    return {
        "runs": await a.call("runs", tenant),
        "run": await a.call("run", tenant, run_id=run_id),
        "trace": await a.call("trace", tenant, run_id=run_id),
        "incidents": await a.call("incidents", tenant),
        "policies": await a.call("policies", tenant),
        "costs": {g: await a.call("costs", tenant, group_by=g) for g in GROUPS},
        "export": await a.call("export", tenant, run_id=run_id, format="csv"),
    }


async def test_a_stopped_run_is_queryable_by_its_tenant_only(audit: Audit, unique: Any) -> None:
    tenant, other = unique("acme"), unique("globex")
    run = unique("run")
    live = unique("live")
    last = await audit.append([bundle_event(), *flow(tenant, run), *flow(tenant, live)[:3]])
    await audit.projected(last)

    runs = (await audit.call("runs", tenant))["runs"]
    by_id = {r["run_id"]: r for r in runs}
    stopped = by_id[run]
    assert stopped["status"] == "stopped_by_policy"
    assert stopped["stopped_at_step"] == 3
    assert stopped["violation_policy_id"] == POLICY
    assert stopped["tokens_used"] == 100 + 50 + 200 + 80
    assert stopped["cost_usd"] == "0.0007500000"  # the priced step only; the other is counted:
    assert stopped["unpriced_steps"] == 1
    assert by_id[live]["status"] == "running"
    assert [r["run_id"] for r in (await audit.call("runs", tenant, status="live"))["runs"]] == [
        live
    ]
    completed = await audit.call("runs", tenant, status="completed")
    assert [r["run_id"] for r in completed["runs"]] == [run]
    assert (await audit.call("runs", tenant, agent_id="nobody"))["runs"] == []

    one = await audit.call("run", tenant, run_id=run)
    assert one["incident_ids"] == [f"{run}-i1"]

    trace = await audit.call("trace", tenant, run_id=run)
    assert trace["inflection_point"] == {
        "step_index": 3,
        "policy_id": POLICY,
        "decision_id": f"{run}-d3",
        "reason": "token budget 500 exceeded",
    }
    assert [(s["step_index"], s["status"]) for s in trace["steps"]] == [
        (1, "ok"),
        (2, "ok"),
        (3, "denied"),
    ]
    assert trace["steps"][2]["decision"]["outcome"] == "deny"
    assert trace["steps"][0]["cost"]["total_cost_usd"] == "0.0007500000"

    policies = await audit.call("policies", tenant)
    counts = {p["policy_id"]: p["incident_count"] for p in policies["policies"]}
    assert counts == {POLICY: 1, "no-shell": 0}
    assert {p["policy_id"]: p["open_incidents"] for p in policies["policies"]} == counts
    (incident,) = (await audit.call("incidents", tenant))["incidents"]
    assert incident["status"] == "open"
    assert (await audit.call("incident", tenant, incident_id=incident["incident_id"]))[
        "run_id"
    ] == run
    assert (await audit.call("incidents", tenant, status="resolved"))["incidents"] == []

    by_model = await audit.call("costs", tenant, group_by="model", run_id=run)
    assert {r["key"]: r["total_cost_usd"] for r in by_model["rows"]} == {
        "gpt-4o": "0.0007500000",
        "in-house-model": None,
    }
    assert by_model["totals"]["unpriced_steps"] == 1
    assert by_model["totals"]["total_cost_usd"] == "0.0007500000"

    csv = await audit.call("export", tenant, run_id=run, format="csv")
    assert csv["content_type"].startswith("text/csv")
    assert len(csv["body"].splitlines()) == 4
    js = await audit.call("export", tenant, run_id=run, format="json")
    assert js["content_type"] == "application/json"
    assert '"inflection_point"' in js["body"]

    # Another tenant sees none of it.
    assert (await audit.call("runs", other))["runs"] == []
    assert (await audit.call("incidents", other))["incidents"] == []
    assert (await audit.call("costs", other, group_by="run"))["rows"] == []
    assert all(p["incident_count"] == 0 for p in (await audit.call("policies", other))["policies"])
    for method, params in (
        ("run", {"run_id": run}),
        ("trace", {"run_id": run}),
        ("incident", {"incident_id": incident["incident_id"]}),
        ("replay", {"run_id": run}),
    ):
        with pytest.raises(NotFound):
            await audit.call(method, other, **params)

    # Bad parameters name the parameter.
    for method, params, name in (
        ("runs", {"limit": 501}, "limit"),
        ("runs", {"status": "sleeping"}, "status"),
        ("runs", {"offset": -1}, "offset"),
        ("run", {}, "run_id"),
        ("costs", {"group_by": "planet"}, "group_by"),
        ("export", {"run_id": run, "format": "xml"}, "format"),
        ("replay", {"run_id": run, "at_position": "x"}, "at_position"),
    ):
        with pytest.raises(InvalidInput, match=name):
            await audit.call(method, tenant, **params)
    with pytest.raises(InvalidInput, match="tenant_id"):
        await audit.rpc.call("audit", "runs", {})


async def test_redelivered_events_change_no_answer(audit: Audit, unique: Any) -> None:
    tenant, run = unique("acme"), unique("run")
    last = await audit.append([bundle_event(), *flow(tenant, run)])
    await audit.projected(last)
    before = await snapshot(audit, tenant, run)
    everything = await audit.store.read_all(0, 10_000)
    projector = audit.service.projector
    assert projector is not None
    # The same envelopes again, all of them, through the live projector...
    await projector.project_now(everything)
    assert await snapshot(audit, tenant, run) == before
    # ...and the early ones through a projector that has no cached state (as after a restart):
    # the run is read back from ClickHouse and the old events do not roll it back.
    fresh = Projector(audit.ch, audit.store)
    await fresh.project_now(everything[:3])
    assert await snapshot(audit, tenant, run) == before


async def test_projection_outage_catches_up_and_lag_is_measured(audit: Audit, unique: Any) -> None:
    tenant = unique("acme")
    first, second = unique("run"), unique("run")
    last = await audit.append([bundle_event(), *flow(tenant, first)])
    await audit.projected(last)
    await audit.service.stop()

    missed = flow(tenant, second)
    last = await audit.append(missed)
    lag_monitor = audit.service.lag
    assert lag_monitor is not None
    during = await lag_monitor.snapshot()
    assert during["lag_events"] == len(missed)
    assert during["lag_seconds"] > 0
    assert lag_monitor.lag_events._value.get() == len(missed)

    await audit.start_service()
    await audit.projected(last)
    runs = {r["run_id"]: r for r in (await audit.call("runs", tenant))["runs"]}
    assert runs[second]["status"] == "stopped_by_policy"
    assert runs[second]["tokens_used"] == 430
    assert runs[first]["status"] == "stopped_by_policy"
    lag = await audit.call("lag", tenant)
    assert lag["lag_events"] == 0
    assert lag["projected_position"] == lag["head_position"] == last
    metrics = audit.ctx.registry.get_sample_value("mc_projection_lag_events")
    assert metrics == 0


async def test_a_failed_write_is_redelivered_not_lost(audit: Audit, unique: Any) -> None:
    tenant, run = unique("acme"), unique("run")
    last = await audit.append([bundle_event()])
    await audit.projected(last)
    # A real ClickHouse failure: the steps table is gone, so every flush with a step fails.
    await audit.ch.command(f"DROP TABLE {schema.DATABASE}.steps SYNC")
    last = await audit.append(flow(tenant, run))
    consumers = audit.service.consumers
    await wait_until(
        lambda: any(c.stats.retried for c in consumers), what="a failed flush to be retried"
    )
    projector = audit.service.projector
    assert projector is not None
    assert await projector.refresh_position() < last
    assert not any(c.stats.dead_lettered for c in consumers)

    steps_ddl = next(m.sql for m in schema.MIGRATIONS if m.name == "steps")
    await audit.ch.command(steps_ddl)
    await audit.projected(last)
    trace = await audit.call("trace", tenant, run_id=run)
    assert [(s["step_index"], s["status"]) for s in trace["steps"]] == [
        (1, "ok"),
        (2, "ok"),
        (3, "denied"),
    ]
    assert (await audit.call("run", tenant, run_id=run))["tokens_used"] == 430


async def entity_rows(a: Audit, tenant: str) -> dict[str, list[dict[str, Any]]]:
    """The tenant's ``runs`` and ``incidents`` rows exactly as ClickHouse holds them."""
    return {
        table: await a.ch.query_all_tenants(
            f"SELECT * FROM {schema.DATABASE}.{table} FINAL WHERE tenant_id = {{t:String}} "
            f"ORDER BY {key}",
            {"t": tenant},
        )
        for table, key in (("runs", "run_id"), ("incidents", "incident_id"))
    }


async def test_events_delivered_late_are_refolded_and_match_a_rebuild(
    audit: Audit, unique: Any
) -> None:
    tenant, run = unique("acme"), unique("run")
    incident_id = f"{run}-i1"
    # Nothing else projects while the test delivers the stored events in an order of its own.
    await audit.service.stop()
    ack = envelope_for(
        IncidentAcknowledged(incident_id=incident_id, by="ann"),
        tenant_id=tenant,
        stream_id=stream_id_for(tenant, "incident", incident_id),
        correlation_id="c",
        actor="ann",
    )
    last = await audit.append([bundle_event(), *flow(tenant, run), ack])
    stored = await audit.store.read_all(0, 10_000)
    started = next(e for e in stored if e.event_type == "run.started")
    opened = next(e for e in stored if e.event_type == "incident.opened")
    rest = [e for e in stored if e.event_id not in (started.event_id, opened.event_id)]

    projector = Projector(audit.ch, audit.store)
    await projector.start()
    try:
        # Steps, the stop and the acknowledgement first (their batch got through)...
        await projector.project_now(rest)
        early = await entity_rows(audit, tenant)
        assert early["runs"][0]["started_at"] is None
        assert early["incidents"][0]["run_id"] == ""
        # ...then the retried run.started, onto the cached run state...
        await projector.project_now([started])
    finally:
        await projector.close()
    # ...and the retried incident.opened through a projector that reads the incident back from
    # ClickHouse (as after a restart).
    restarted = Projector(audit.ch, audit.store)
    await restarted.start()
    try:
        await restarted.project_now([opened])
        late = await entity_rows(audit, tenant)
        assert projector.refolds == 1
        assert restarted.refolds == 1
        (run_row,) = late["runs"]
        assert run_row["started_at"] is not None
        assert run_row["agent_id"] == "agent-1"
        assert run_row["status"] == "stopped_by_policy"
        assert run_row["version"] == max(
            e.position or 0 for e in stored if e.stream_id == started.stream_id
        )
        (incident_row,) = late["incidents"]
        assert incident_row["run_id"] == run
        assert incident_row["policy_id"] == POLICY
        assert incident_row["status"] == "acknowledged"
        assert incident_row["acknowledged_by"] == "ann"
        assert incident_row["version"] == ack_position(stored)

        await restarted.rebuild(audit.store)
        assert await entity_rows(audit, tenant) == late
    finally:
        await restarted.close()

    # The service catches up on the same events in order: proven duplicates, nothing changes,
    # and the query answers what a replay from the store answers.
    await audit.start_service()
    await audit.projected(last)
    assert await entity_rows(audit, tenant) == late
    replay = await audit.call("replay", tenant, run_id=run)
    assert await audit.call("run", tenant, run_id=run) == replay["state"]


def ack_position(envs: list[EventEnvelope]) -> int:
    """The store position of the (only) incident acknowledgement in ``envs``."""
    return next(e.position or 0 for e in envs if e.event_type == "incident.acknowledged")
