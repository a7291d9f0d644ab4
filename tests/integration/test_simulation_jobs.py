"""Policy simulation jobs on two policy-admission replicas against the real event store and NATS:
a job whose replica stopped beating its heartbeat is taken over (once) and finished; a job whose
heartbeat is fresh is left to its replica; a request is refused by name before any job exists."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from libs.errors import InvalidInput, NotFound
from libs.eventbus.db import transaction
from tests.conftest import System, wait_until
from tests.integration.test_admission import running_admission
from tests.integration.test_policy_bundles import Replicas

pytestmark = pytest.mark.integration

DIGEST = "sha256:" + "ab" * 32
REQUEST = {
    "bundle_digest": DIGEST,
    "since": "2026-11-01T00:00:00+00:00",
    "until": "2026-11-02T00:00:00+00:00",
    "environment": "production",
}


@pytest.fixture
async def replicas(system: System) -> AsyncIterator[Replicas]:
    async with running_admission(system) as a, running_admission(system) as b:
        yield Replicas(a, b)


async def _job(replicas: Replicas, tenant: str, *, stale: bool) -> str:
    """A job row as a replica leaves it while running: stale when that replica died."""
    simulation_id = str(uuid.uuid4())
    async with transaction(replicas.a.store.pool) as conn:
        await conn.execute(
            "INSERT INTO policy_admission.simulations "
            "(simulation_id, tenant_id, request, requested_by, status, heartbeat_at) "
            "VALUES (%s, %s, %s, 'user:admin', 'running', now() - %s::interval)",
            (simulation_id, tenant, orjson.dumps(REQUEST).decode(), "1 hour" if stale else "0"),
        )
    return simulation_id


async def _get(replicas: Replicas, tenant: str, simulation_id: str) -> dict[str, Any]:
    view: dict[str, Any] = await replicas.call(
        "get_simulation", tenant, simulation_id=simulation_id
    )
    return view


async def test_a_job_left_by_a_dead_replica_is_taken_over_and_finished(
    replicas: Replicas, tenant: str
) -> None:
    stale = await _job(replicas, tenant, stale=True)
    fresh = await _job(replicas, tenant, stale=False)

    async def finished() -> bool:
        return (await _get(replicas, tenant, stale))["status"] == "failed"

    # One of the replicas' followers claims it within its interval and runs it to the end:
    # here it fails by name, since the tenant never uploaded that bundle.
    await wait_until(finished, timeout=30, what="the stale job taken over")
    view = await _get(replicas, tenant, stale)
    assert view["error"].startswith("bundle_not_found: ")
    # Finished jobs are never claimed again; the fresh one stays with its own replica.
    for admission in (replicas.a, replicas.b):
        jobs = admission.service.simulations
        assert jobs is not None
        assert stale not in await jobs.take_over()
        assert fresh not in await jobs.take_over()
    assert (await _get(replicas, tenant, fresh))["status"] == "running"

    # Another tenant cannot read it.
    with pytest.raises(NotFound):
        await _get(replicas, f"{tenant}x", stale)


async def test_a_simulation_is_refused_by_name_before_any_job_is_recorded(
    replicas: Replicas, tenant: str
) -> None:
    for body, problem in (
        ({**REQUEST, "until": REQUEST["since"]}, "simulation_window_inverted"),
        ({**REQUEST, "until": "2026-12-31T00:00:00+00:00"}, "simulation_window_too_long"),
    ):
        with pytest.raises(InvalidInput, match=f"^{problem}: "):
            await replicas.call("start_simulation", tenant, actor="user:admin", **body)
    with pytest.raises(NotFound, match=r"^bundle_not_found: "):
        await replicas.call("start_simulation", tenant, actor="user:admin", **REQUEST)
    async with transaction(replicas.a.store.pool) as conn:
        cur = await conn.execute(
            "SELECT count(*) AS n FROM policy_admission.simulations WHERE tenant_id = %s",
            (tenant,),
        )
        row = await cur.fetchone()
    assert row is not None and row["n"] == 0
