"""Event contracts: published schemas are frozen, upcasters chain, envelopes validate."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from libs.contracts import envelope_for
from libs.contracts.envelope import EventEnvelope
from libs.contracts.events import RunStarted, RunStartedV1, StepRecorded
from libs.contracts.registry import all_models, decode, upcast
from libs.contracts.schemas import SCHEMA_DIR, render, schema_file_name, schema_for
from libs.errors import UnknownEventType

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("model", all_models(), ids=lambda m: f"{m.event_type}.v{m.schema_version}")
def test_published_schema_is_unchanged(model: Any) -> None:
    path = SCHEMA_DIR / schema_file_name(model.event_type, model.schema_version)
    assert path.exists(), f"{path.name} is not exported: run python -m libs.contracts.schemas"
    assert path.read_text() == render(schema_for(model)), (
        f"{model.event_type} v{model.schema_version} changed after it was published; "
        "add a new version with an upcaster instead"
    )


def test_every_published_schema_still_has_a_reader() -> None:
    registered = {schema_file_name(m.event_type, m.schema_version) for m in all_models()}
    published = {p.name for p in SCHEMA_DIR.glob("*.json")}
    assert published <= registered, f"schemas without a model: {published - registered}"


def test_events_are_frozen() -> None:
    e = RunStarted(run_id="r", agent_id="a")
    with pytest.raises(ValidationError):
        e.run_id = "other"  # type: ignore[misc]


def test_upcast_v1_to_current() -> None:
    assert upcast("run.started", 1, {"run_id": "r", "agent": "x"}) == {
        "run_id": "r",
        "agent_id": "x",
        "labels": {},
    }


def test_newer_version_than_this_build_is_refused() -> None:
    with pytest.raises(UnknownEventType):
        upcast("run.started", 99, {})


def test_decode_returns_current_model() -> None:
    env = envelope_for(
        RunStartedV1(run_id="r", agent="a"),
        tenant_id="t1",
        stream_id="t1/run/r",
        correlation_id="c",
        actor="x",
    )
    assert decode(env) == RunStarted(run_id="r", agent_id="a")


@pytest.mark.parametrize("tenant", ["", "A", "a.b", "a*", "a>", "x" * 64, "-a"])
def test_tenant_ids_that_would_escape_a_subject_are_rejected(tenant: str) -> None:
    with pytest.raises(ValidationError):
        envelope_for(
            StepRecorded(run_id="r", agent_id="a", step_index=1),
            tenant_id=tenant,
            stream_id="s",
            correlation_id="c",
            actor="x",
        )


def test_envelope_round_trips_through_json() -> None:
    env = envelope_for(
        StepRecorded(run_id="r", agent_id="a", step_index=1, input={"k": [1, 2.5]}),
        tenant_id="t1",
        stream_id="t1/run/r",
        correlation_id="c",
        actor="x",
    )
    assert EventEnvelope.model_validate_json(env.model_dump_json()) == env
