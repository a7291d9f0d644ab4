"""The control lane: stops and incidents are projected while bulk step events are held up."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import wait_until
from tests.integration.test_projections import Audit, audit, entity_rows
from tests.unit.test_audit_domain import bundle_event, flow

pytestmark = pytest.mark.integration

__all__ = ["audit"]  # the fixture, shared with the projection tests


async def test_an_incident_is_queryable_while_the_bulk_lane_cannot_write(
    audit: Audit, unique: Any
) -> None:
    tenant, run = unique("acme"), unique("run")
    projector = audit.service.projector
    assert projector is not None
    bulk = projector._lanes["bulk"]
    # Holding the bulk lane's write lock stands for a backlog of step events ahead of the stop:
    # nothing of that lane reaches ClickHouse until it is released.
    async with bulk.write_lock:
        last = await audit.append([bundle_event(), *flow(tenant, run)])

        async def incident_visible() -> bool:
            return bool((await audit.call("incidents", tenant, run_id=run))["incidents"])

        await wait_until(incident_visible, timeout=30, what="the incident to be queryable")
        stopped = await audit.call("run", tenant, run_id=run)
        assert stopped["status"] == "stopped_by_policy"
        assert stopped["stopped_at_step"] == 3
        assert stopped["tokens_used"] == 0  # no step has been written yet
        trace = await audit.call("trace", tenant, run_id=run)
        assert [(s["step_index"], s["status"]) for s in trace["steps"]] == [(3, "denied")]
        assert await projector.refresh_position() < last

    # The steps arrive after the stop they preceded: the run is re-folded, and ends up exactly
    # as a rebuild from the store makes it.
    await audit.projected(last)
    done = await audit.call("run", tenant, run_id=run)
    assert done["tokens_used"] == 430
    assert done["last_step_index"] == 2
    assert done["status"] == "stopped_by_policy"
    trace = await audit.call("trace", tenant, run_id=run)
    assert [s["step_index"] for s in trace["steps"]] == [1, 2, 3]
    live = await entity_rows(audit, tenant)
    await projector.rebuild(audit.store)
    assert await entity_rows(audit, tenant) == live
    assert await audit.call("run", tenant, run_id=run) == done


async def test_decisions_alone_wait_for_the_relaxed_flush_a_violation_does_not(
    audit: Audit, unique: Any
) -> None:
    """Admission decisions are as frequent as steps; a control buffer holding only decisions is
    written at the relaxed interval, and one holding a violation at the short one."""
    tenant, run = unique("acme"), unique("run")
    projector = audit.service.projector
    assert projector is not None
    control = projector._lanes["control"]
    assert control.lane.relaxed_events == frozenset({"admission.decided"})
    assert control.lane.relaxed_interval > control.lane.flush_interval
    events = flow(tenant, run)
    started = [e for e in events if e.event_type == "run.started"]
    decisions = [e for e in events if e.event_type == "admission.decided"]
    violation = [e for e in events if e.event_type == "policy.violation_detected"]
    assert started and decisions and violation
    await audit.projected(await audit.append([bundle_event(), *started]))
    # Holding the lane's write lock keeps its buffer unwritten while we look at it.
    async with control.write_lock:
        await audit.append(decisions)
        await wait_until(lambda: control.count > 0, what="the decisions to be buffered")
        assert not control.urgent
        last = await audit.append(violation)
        await wait_until(lambda: control.urgent, what="the violation to make the buffer urgent")
    await audit.projected(last)
    assert not control.urgent
