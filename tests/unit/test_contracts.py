"""Event contracts: published schemas are frozen, upcasters chain, envelopes validate."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from pydantic import ValidationError

from libs.contracts import envelope_for
from libs.contracts.envelope import DomainEvent, EventEnvelope
from libs.contracts.events import (
    CostRecorded,
    CostRecordedV1,
    RunStarted,
    RunStartedV1,
    StepRecorded,
    StepRecordedV1,
    StepRecordedV2,
)
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


def _stored(event: DomainEvent) -> EventEnvelope:
    """``event`` as the store holds it, at the schema version it was written with."""
    return envelope_for(event, tenant_id="t1", stream_id="t1/run/r", correlation_id="c", actor="x")


def test_decode_returns_current_model() -> None:
    env = _stored(RunStartedV1(run_id="r", agent="a"))
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


@pytest.mark.parametrize("version", [1, 2])
def test_an_old_step_reads_with_zero_cache_and_reasoning_tokens(version: int) -> None:
    payload = {"run_id": "r", "agent_id": "a", "step_index": 1, "model": "gpt-4o",
               "input_tokens": 120, "output_tokens": 30}  # fmt: skip
    old = (
        StepRecordedV1(**payload)
        if version == 1
        else StepRecordedV2(**payload, irregularities=["duplicate"])
    )
    step = decode(_stored(old))
    assert isinstance(step, StepRecorded) and step.schema_version == 3
    assert (step.input_tokens, step.output_tokens) == (120, 30)
    assert (step.cached_input_tokens, step.cache_write_tokens, step.reasoning_tokens) == (0, 0, 0)
    assert step.provider_cost_usd is None
    assert step.irregularities == (["duplicate"] if version == 2 else [])


def test_an_old_cost_reads_with_zero_components_and_no_provider_figure() -> None:
    base = {"cost_id": "c", "run_id": "r", "agent_id": "a", "step_index": 1, "model": "gpt-4o",
            "input_tokens": 1000, "output_tokens": 100, "pricing_status": "priced",
            "input_cost_usd": "0.0025000000", "output_cost_usd": "0.0010000000",
            "total_cost_usd": "0.0035000000", "price_table_version": "builtin-2026.11"}  # fmt: skip
    cost = decode(_stored(CostRecordedV1.model_validate(base)))
    assert isinstance(cost, CostRecorded) and cost.schema_version == 2
    assert cost.total_cost_usd == Decimal("0.0035")
    assert (cost.cached_input_tokens, cost.cache_write_tokens, cost.reasoning_tokens) == (0, 0, 0)
    assert cost.cached_input_cost_usd == cost.cache_write_cost_usd == cost.reasoning_cost_usd == 0
    assert (cost.provider_cost_usd, cost.cost_difference_usd, cost.cost_mismatch) == (
        None, None, False,
    )  # fmt: skip
    unpriced = decode(
        _stored(
            CostRecordedV1.model_validate(
                {
                    **base,
                    "pricing_status": "unpriced",
                    "input_cost_usd": None,
                    "output_cost_usd": None,
                    "total_cost_usd": None,
                }
            )
        )
    )
    assert isinstance(unpriced, CostRecorded)
    # Unpriced stays unpriced: no component becomes a zero that reads as "free".
    assert unpriced.cached_input_cost_usd is None and unpriced.reasoning_cost_usd is None
