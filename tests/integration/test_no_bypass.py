"""No bypass, end to end through the real services: a step recorded without an allowed admission,
twice, or out of order is kept, marked, and judged a violation of ``admission_required``, which
stops the run and opens an incident (``enforce``) or is only recorded (``warn``, per tenant in the
bundle's ``data.json``). Admitted steps are unaffected.

workflow-engine, policy-admission and incident run in-process with their production consumers,
on servers of this module alone, with the outbox relay publishing the store to JetStream: the
judgement travels the same stop → incident path as any violation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from libs.contracts import stream_id_for
from libs.contracts.events import PolicyViolationDetected, StepRecorded
from libs.contracts.registry import decode
from libs.eventbus.db import open_pool
from libs.eventbus.jetstream import connect, ensure_streams
from libs.eventbus.relay import Relay
from libs.eventbus.rpc import RpcClient
from libs.eventbus.store import EventStore
from libs.runtime.service_host import Service, ServiceContext
from libs.settings import Settings
from services.incident.bootstrap import IncidentService
from services.policy_admission.bootstrap import PolicyAdmissionService
from services.policy_admission.bundle import DEFAULT_BUNDLE_DIR
from services.workflow_engine.bootstrap import WorkflowEngineService
from tests.conftest import start_system, wait_until

pytestmark = pytest.mark.integration

WARN_TENANT = "lax"
ESTIMATE = {"input_tokens": 10, "max_output_tokens": 10}


@dataclass
class Bed:
    rpc: RpcClient
    store: EventStore
    pool: AsyncConnectionPool
    admin_url: str

    async def call(self, service: str, method: str, tenant: str, **body: Any) -> Any:
        return await self.rpc.call(service, method, {"tenant_id": tenant, **body})

    async def start(self, tenant: str) -> str:
        started = await self.call("workflow", "start_run", tenant, agent_id="agent-1")
        return str(started["run_id"])

    async def admit(self, tenant: str, run_id: str, step: int) -> str:
        answer = await self.call(
            "admission", "admit", tenant, run_id=run_id, step_index=step, estimate=ESTIMATE
        )
        return str(answer["outcome"])

    async def record(self, tenant: str, run_id: str, *steps: int) -> None:
        items = [{"run_id": run_id, "step_index": i, "input_tokens": 5} for i in steps]
        done = await self.call("workflow", "record_steps", tenant, items=items)
        assert done["recorded"] == len(steps)

    async def run(self, tenant: str, run_id: str) -> dict[str, Any]:
        return dict(await self.call("workflow", "get_run", tenant, run_id=run_id))

    async def steps(self, tenant: str, run_id: str) -> list[StepRecorded]:
        envs = await self.store.read_stream(stream_id_for(tenant, "run", run_id))
        return [e for e in (decode(env) for env in envs) if isinstance(e, StepRecorded)]

    async def violations(self, tenant: str, run_id: str) -> list[PolicyViolationDetected]:
        envs = await self.store.read_stream(stream_id_for(tenant, "decisions", run_id))
        return [e for e in (decode(env) for env in envs) if isinstance(e, PolicyViolationDetected)]

    async def query(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        async with await psycopg.AsyncConnection.connect(
            self.admin_url, row_factory=dict_row
        ) as conn:
            cur = await conn.execute(sql, args)
            return list(await cur.fetchall())

    async def incidents(self, tenant: str, run_id: str) -> list[dict[str, Any]]:
        return await self.query(
            "SELECT policy_id, step_index FROM incident.incidents "
            "WHERE tenant_id = %s AND run_id = %s",
            tenant,
            run_id,
        )

    async def seen_by_incident(self, event_ids: list[Any]) -> bool:
        """Whether the incident service's consumer has handled every one of ``event_ids``."""
        rows = await self.query(
            "SELECT count(*) AS n FROM incident.applied_events WHERE event_id = ANY(%s)",
            event_ids,
        )
        return bool(rows[0]["n"] == len(event_ids))


@pytest.fixture(scope="module")
async def bed() -> AsyncIterator[Bed]:
    base = Path(tempfile.mkdtemp(prefix="mc-bypass-"))
    system = start_system(base / "sys")
    # The shipped bundle, with one tenant set to warn: the setting is data, per tenant.
    bundle = base / "bundle"
    shutil.copytree(DEFAULT_BUNDLE_DIR, bundle)
    data = json.loads((bundle / "data.json").read_text())
    data["missioncontrol"]["config"]["tenants"][WARN_TENANT] = {"admission_required": "warn"}
    (bundle / "data.json").write_text(json.dumps(data))
    settings = Settings(
        nats_url=system.nats_url,
        database_url=system.service_url,
        MC_DATA_DIR=str(base / "data"),
    ).model_copy(update={"policy_bundle_dir": bundle})
    pool = await open_pool(system.service_url, max_size=8)
    nc = await connect(system.nats_url, "test-bypass")
    js = nc.jetstream()
    await ensure_streams(js)
    relay = Relay(system.service_url, js, idle_wait=0.05)
    relay_task = asyncio.create_task(relay.run())
    services: list[Service] = [
        WorkflowEngineService(),
        IncidentService(),
        PolicyAdmissionService(),
    ]
    for svc in services:
        await svc.start(ServiceContext.wire(svc.name, settings, nc, pool))
        await wait_until(svc.ready, what=f"{svc.name} ready")
    try:
        yield Bed(RpcClient(nc), EventStore(pool), pool, system.admin_url)
    finally:
        for svc in services:
            await svc.stop()
        relay.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(relay_task, 10)
        await nc.close()
        await pool.close()
        system.stop()
        shutil.rmtree(base, ignore_errors=True)


async def _stopped(bed: Bed, tenant: str, run_id: str, step: int) -> None:
    async def stopped() -> bool:
        run = await bed.run(tenant, run_id)
        return bool(run["status"] == "stopped_by_policy")

    await wait_until(stopped, timeout=30, what=f"run {run_id} stopped")
    run = await bed.run(tenant, run_id)
    assert run["violation_policy_id"] == "admission_required"
    assert run["stopped_at_step"] == step

    async def opened() -> bool:
        return bool(await bed.incidents(tenant, run_id))

    await wait_until(opened, timeout=30, what=f"incident of run {run_id}")
    assert await bed.incidents(tenant, run_id) == [
        {"policy_id": "admission_required", "step_index": step}
    ]


async def test_an_unadmitted_step_is_kept_marked_and_stops_the_run_with_an_incident(
    bed: Bed, tenant: str
) -> None:
    run_id = await bed.start(tenant)
    await bed.record(tenant, run_id, 1)  # never admitted
    (step,) = await bed.steps(tenant, run_id)
    assert step.irregularities == ["unadmitted"]
    await _stopped(bed, tenant, run_id, 1)
    (violation,) = await bed.violations(tenant, run_id)
    assert violation.enforcement == "enforce"
    # The stopped run admits nothing more.
    assert await bed.admit(tenant, run_id, 2) == "deny"


async def test_a_duplicate_step_index_stops_the_run_with_an_incident(bed: Bed, tenant: str) -> None:
    run_id = await bed.start(tenant)
    for i in (1, 2):
        assert await bed.admit(tenant, run_id, i) == "allow"
        await bed.record(tenant, run_id, i)
    assert await bed.admit(tenant, run_id, 2) == "allow"  # asked again: still a duplicate
    await bed.record(tenant, run_id, 2)
    marks = [s.irregularities for s in await bed.steps(tenant, run_id)]
    assert marks == [[], [], ["duplicate"]]
    await _stopped(bed, tenant, run_id, 2)


async def test_an_out_of_order_step_index_stops_the_run_with_an_incident(
    bed: Bed, tenant: str
) -> None:
    run_id = await bed.start(tenant)
    for i in (1, 3):
        assert await bed.admit(tenant, run_id, i) == "allow"
        await bed.record(tenant, run_id, i)
    assert await bed.admit(tenant, run_id, 2) == "allow"  # admitted after 3 was recorded
    await bed.record(tenant, run_id, 2)
    marks = [s.irregularities for s in await bed.steps(tenant, run_id)]
    assert marks == [[], [], ["out_of_order"]]
    await _stopped(bed, tenant, run_id, 2)


async def test_warn_records_the_violation_and_the_run_goes_on(bed: Bed) -> None:
    run_id = await bed.start(WARN_TENANT)
    await bed.record(WARN_TENANT, run_id, 1)  # unadmitted
    assert await bed.admit(WARN_TENANT, run_id, 1) == "allow"
    await bed.record(WARN_TENANT, run_id, 1)  # duplicate

    async def judged() -> bool:
        return len(await bed.violations(WARN_TENANT, run_id)) == 2

    await wait_until(judged, timeout=30, what="both steps judged")
    violations = await bed.violations(WARN_TENANT, run_id)
    assert [v.enforcement for v in violations] == ["warn", "warn"]
    assert [v.policy_id for v in violations] == ["admission_required"] * 2
    # A warning stops nothing: the next step is admitted and the run finishes on its own.
    assert await bed.admit(WARN_TENANT, run_id, 2) == "allow"
    await bed.record(WARN_TENANT, run_id, 2)
    done = await bed.call("workflow", "finish_run", WARN_TENANT, run_id=run_id, status="completed")
    assert done["status"] == "completed"
    # The incident service handled both warnings and opened nothing.
    envs = await bed.store.read_stream(stream_id_for(WARN_TENANT, "decisions", run_id))
    ids = [e.event_id for e in envs if e.event_type == "policy.violation_detected"]
    await wait_until(lambda: bed.seen_by_incident(ids), timeout=30, what="warnings handled")
    assert await bed.incidents(WARN_TENANT, run_id) == []
    assert (await bed.run(WARN_TENANT, run_id))["status"] == "completed"


async def test_admitted_steps_are_unaffected(bed: Bed, tenant: str) -> None:
    run_id = await bed.start(tenant)
    assert [await bed.admit(tenant, run_id, i) for i in (1, 2)] == ["allow", "allow"]
    await bed.record(tenant, run_id, 2, 1)  # run in parallel, finished in any order
    assert await bed.admit(tenant, run_id, 3) == "allow"
    await bed.record(tenant, run_id, 3)
    assert [s.irregularities for s in await bed.steps(tenant, run_id)] == [[], [], []]
    done = await bed.call("workflow", "finish_run", tenant, run_id=run_id, status="completed")
    assert done["status"] == "completed"
    assert await bed.violations(tenant, run_id) == []
