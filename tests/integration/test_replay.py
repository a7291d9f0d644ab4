"""Replay from the event store and rebuild of the projections, against the live projections."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from libs.errors import Conflict, InvalidInput, NotFound, TransientError
from tests.conftest import wait_until
from tests.integration.test_projections import Audit, audit, snapshot
from tests.unit.test_audit_domain import bundle_event, flow

pytestmark = pytest.mark.integration

__all__ = ["audit"]  # the fixture, shared with the projection tests


async def test_replay_at_the_last_position_equals_the_projection(audit: Audit, unique: Any) -> None:
    tenant, run = unique("acme"), unique("run")
    envs = flow(tenant, run)
    last = await audit.append([bundle_event(), *envs])
    # Events of another run after it must not change its replay.
    last = max(last, await audit.append(flow(tenant, unique("later"))))
    await audit.projected(last)

    projected = await audit.call("run", tenant, run_id=run)
    replay = await audit.call("replay", tenant, run_id=run)
    assert replay["state"] == projected
    assert replay["events_applied"] == len(envs)
    assert replay["inflection_point"]["step_index"] == 3
    assert (
        replay["inflection_point"]
        == (await audit.call("trace", tenant, run_id=run))["inflection_point"]
    )
    at_last = await audit.call("replay", tenant, run_id=run, at_position=replay["at_position"])
    assert at_last == replay


async def test_replay_at_an_earlier_point_shows_the_run_still_running(
    audit: Audit, unique: Any
) -> None:
    tenant, run = unique("acme"), unique("run")
    envs = flow(tenant, run)
    positions = [await audit.append([e]) for e in envs]
    # envs[2] is step 1 recorded: the run stream is at version 2 there.
    early = await audit.call("replay", tenant, run_id=run, at_position=positions[2])
    assert early["state"]["status"] == "running"
    assert early["state"]["tokens_used"] == 150
    assert early["inflection_point"] is None
    assert early["at_position"] == positions[2]
    by_version = await audit.call("replay", tenant, run_id=run, at_version=2)
    assert by_version == early


async def test_rebuild_from_the_store_gives_identical_answers(audit: Audit, unique: Any) -> None:
    tenant, run = unique("acme"), unique("run")
    last = await audit.append([bundle_event(), *flow(tenant, run), *flow(tenant, unique("r"))])
    await audit.projected(last)
    before = await snapshot(audit, tenant, run)

    result = await audit.call("rebuild", tenant)
    assert result["events"] == last  # a fresh store: positions start at 1
    assert result["position"] == last
    assert result["rows"]["events"] == last
    assert await snapshot(audit, tenant, run) == before
    lag = await audit.call("lag", tenant)
    assert lag["lag_events"] == 0


async def test_queries_answer_unavailable_while_a_rebuild_runs(audit: Audit, unique: Any) -> None:
    tenant, run = unique("acme"), unique("run")
    last = await audit.append([bundle_event(), *flow(tenant, run)])
    await audit.projected(last)
    before = await snapshot(audit, tenant, run)
    projector = audit.service.projector
    assert projector is not None
    # Holding the projector's lock keeps the rebuild at its start (it is rebuilding, the tables
    # are about to be dropped) for as long as the test needs, without timing anything.
    async with projector._lock:
        rebuild = asyncio.create_task(audit.call("rebuild", tenant))
        await wait_until(lambda: projector.rebuilding, what="the rebuild to start")
        for method, params in (
            ("runs", {}),
            ("run", {"run_id": run}),
            ("trace", {"run_id": run}),
            ("incidents", {}),
            ("incident", {"incident_id": f"{run}-i1"}),
            ("policies", {}),
            ("costs", {"group_by": "run"}),
            ("export", {"run_id": run, "format": "csv"}),
        ):
            with pytest.raises(TransientError, match="projections are being rebuilt"):
                await audit.call(method, tenant, **params)
        with pytest.raises(Conflict, match="already running"):
            await projector.rebuild(audit.store)
        # Replay reads the event store, not the projections; lag tells what is going on.
        assert (await audit.call("replay", tenant, run_id=run))["state"]["status"] == (
            "stopped_by_policy"
        )
        assert (await audit.call("lag", tenant))["rebuilding"] is True
    assert (await rebuild)["position"] == last
    assert await snapshot(audit, tenant, run) == before


async def test_replay_to_a_step_and_the_runs_event_count(audit: Audit, unique: Any) -> None:
    tenant, run = unique("acme"), unique("run")
    envs = flow(tenant, run)
    positions = [await audit.append([e]) for e in envs]
    # The run stream holds started, step 1, step 2 and the stop: every answer says 4.
    whole = await audit.call("replay", tenant, run_id=run)
    assert whole["events_total"] == 4
    assert whole["at_version"] == 4
    assert whole["at_step"] == 3
    early = await audit.call("replay", tenant, run_id=run, at_version=2)
    assert early["events_total"] == 4
    assert early["at_step"] == 1

    # Step 1 ends with its cost (envs[3]), before step 2's admission.
    step1 = await audit.call("replay", tenant, run_id=run, at_step=1)
    assert step1 == await audit.call("replay", tenant, run_id=run, at_position=positions[3])
    assert step1["at_step"] == 1
    assert step1["at_version"] == 2
    assert step1["state"]["cost_usd"] == "0.0007500000"
    # The denied step ends with its stop and incident: the whole run here.
    assert await audit.call("replay", tenant, run_id=run, at_step=3) == whole
    start = await audit.call("replay", tenant, run_id=run, at_step=0)
    assert start["events_applied"] == 1  # run.started alone
    assert start["at_step"] == 0
    assert start["state"]["status"] == "running"

    with pytest.raises(InvalidInput, match=f"at_step 4 does not exist in run {run}"):
        await audit.call("replay", tenant, run_id=run, at_step=4)
    with pytest.raises(InvalidInput, match="at_step and at_version both choose the point"):
        await audit.call("replay", tenant, run_id=run, at_step=1, at_version=2)
    with pytest.raises(InvalidInput, match="at_step and at_position both choose the point"):
        await audit.call("replay", tenant, run_id=run, at_step=1, at_position=positions[3])
    with pytest.raises(InvalidInput, match="at_step must be an integer >= 0"):
        await audit.call("replay", tenant, run_id=run, at_step=-1)
    with pytest.raises(NotFound):
        await audit.call("replay", tenant, run_id=unique("none"), at_step=1)
