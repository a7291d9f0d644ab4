"""A value the API accepts fits every event it lands in: the limits add up, and the longest value
each request schema accepts makes a valid envelope."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from libs.contracts import EventEnvelope, stream_id_for
from libs.contracts.limits import (
    MAX_ACTOR,
    MAX_AGENT_ID,
    MAX_BY,
    MAX_RUN_ID,
    MAX_STREAM_ID,
    MAX_TENANT_ID,
    agent_actor,
    user_actor,
)
from libs.eventbus.rpc import RequestMeta
from services.gateway.schemas import AcknowledgeRequest, ResolveRequest, StartRunRequest
from services.incident.entrypoints import ResolveRequest as IncidentResolve
from services.workflow_engine.entrypoints import StartRunRequest as WorkflowStartRun

pytestmark = pytest.mark.unit


def _envelope(actor: str, stream_id: str = "t/run/r") -> EventEnvelope:
    return EventEnvelope(
        event_type="run.started",
        schema_version=1,
        tenant_id="t",
        stream_id=stream_id,
        correlation_id="c",
        actor=actor,
        payload={},
    )


def test_derived_limits_add_up() -> None:
    assert len(agent_actor("")) + MAX_AGENT_ID == MAX_ACTOR
    assert len(user_actor("")) + MAX_BY == MAX_ACTOR
    longest_run_stream = stream_id_for("t" * MAX_TENANT_ID, "run", "r" * MAX_RUN_ID)
    assert len(longest_run_stream) <= MAX_STREAM_ID


def test_the_longest_agent_id_the_api_accepts_makes_a_valid_actor() -> None:
    longest = "a" * MAX_AGENT_ID
    body = StartRunRequest(agent_id=longest)
    service_body = WorkflowStartRun(tenant_id="t", agent_id=body.agent_id)
    actor = RequestMeta.from_headers({}).actor_for(service_body.agent_id)
    assert _envelope(actor).actor == f"agent:{longest}"


def test_one_more_character_is_refused_at_the_edge() -> None:
    with pytest.raises(ValidationError):
        StartRunRequest(agent_id="a" * (MAX_AGENT_ID + 1))
    with pytest.raises(ValidationError):
        ResolveRequest(resolution="done", by="b" * (MAX_BY + 1))
    with pytest.raises(ValidationError):
        AcknowledgeRequest(by="b" * (MAX_BY + 1))


def test_the_longest_by_the_api_accepts_makes_a_valid_actor() -> None:
    longest = "b" * MAX_BY
    body = ResolveRequest(resolution="done", by=longest)
    assert body.by is not None
    service_body = IncidentResolve(
        tenant_id="t",
        incident_id="0192e0b2-0000-7000-8000-000000000000",  # type: ignore[arg-type]
        by=body.by,
        resolution=body.resolution,
    )
    assert _envelope(user_actor(service_body.by)).actor == f"user:{longest}"
