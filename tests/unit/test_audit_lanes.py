"""Which lane each event type takes into the audit projections."""

from __future__ import annotations

import pytest

from libs.contracts.registry import all_models
from libs.contracts.subjects import event_subject
from services.audit_replay.lanes import BULK, BULK_EVENTS, CONTROL, LANES, lane_of

pytestmark = pytest.mark.unit


def test_every_event_type_travels_in_exactly_one_lane() -> None:
    for model in all_models():
        holders = [lane.name for lane in LANES if model.event_type in lane.event_types]
        assert holders == [lane_of(model.event_type).name], model.event_type


def test_stops_violations_incidents_and_decisions_are_in_the_control_lane() -> None:
    for event_type in (
        "policy.violation_detected",
        "run.stopped_by_policy",
        "incident.opened",
        "incident.acknowledged",
        "incident.resolved",
        "admission.decided",
        "run.started",
        "run.completed",
    ):
        assert lane_of(event_type) is CONTROL, event_type
    assert {lane_of(t) for t in BULK_EVENTS} == {BULK}
    # A type this build does not know is not held behind bulk events either.
    assert lane_of("agent.something_new") is CONTROL


def test_each_lane_consumer_filters_exactly_its_own_subjects() -> None:
    for lane in LANES:
        spec = lane.spec()
        for event_type in lane.event_types:
            subject = event_subject("acme", event_type)
            prefix, _, rest = subject.partition(".acme.")
            assert f"{prefix}.*.{rest}" in spec.filter_subjects
        assert len(spec.filter_subjects) == len(lane.event_types)
    assert CONTROL.flush_interval < BULK.flush_interval
    assert {lane.durable for lane in LANES} == {"audit-control", "audit-bulk"}
