"""The API's request models refuse what the services behind the gateway could not store."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from services.gateway.schemas import (
    AdmissionRequest,
    FinishRunRequest,
    ResolveRequest,
    SetPricesRequest,
    StartRunRequest,
    StepBatchRequest,
    StepFields,
)

pytestmark = pytest.mark.unit


def _fields(exc: ValidationError) -> set[str]:
    return {".".join(str(p) for p in e["loc"]) for e in exc.errors()}


def test_valid_requests_parse() -> None:
    assert StartRunRequest(agent_id="a", run_id="run-1.x:y_z").run_id == "run-1.x:y_z"
    req = AdmissionRequest.model_validate(
        {"step_index": 3, "estimate": {"input_tokens": 8000, "max_output_tokens": 1500}}
    )
    assert req.kind == "llm_call"
    assert req.estimate.input_tokens == 8000
    step = StepFields.model_validate(
        {"step_index": 1, "status": "error", "input": {"a": [1, "b"]}, "error": "boom"}
    )
    assert step.status == "error"


@pytest.mark.parametrize(
    ("model", "data", "field"),
    [
        (StartRunRequest, {"agent_id": ""}, "agent_id"),
        (StartRunRequest, {"agent_id": "a", "run_id": "has space"}, "run_id"),
        (StartRunRequest, {"agent_id": "a", "run_id": "x" * 101}, "run_id"),
        (StartRunRequest, {"agent_id": "a", "run_id": "a/b"}, "run_id"),
        (StartRunRequest, {"agent_id": "a\x00b"}, "agent_id"),
        (StartRunRequest, {"agent_id": "a\tb"}, "agent_id"),
        (StartRunRequest, {"agent_id": "a\\b"}, "agent_id"),
        (StartRunRequest, {"agent_id": "a", "surprise": 1}, "surprise"),
        (StartRunRequest, {"agent_id": "a", "labels": {"k": 1}}, "labels.k"),
        (AdmissionRequest, {"step_index": 0}, "step_index"),
        (AdmissionRequest, {"step_index": "three"}, "step_index"),
        (
            AdmissionRequest,
            {"step_index": 1, "estimate": {"input_tokens": -1}},
            "estimate.input_tokens",
        ),
        (StepFields, {"step_index": 1, "output_tokens": -5}, "output_tokens"),
        (StepFields, {"step_index": 1, "input_tokens": 2**70}, "input_tokens"),
        (StepFields, {"step_index": 1, "status": "exploded"}, "status"),
        (StepFields, {"step_index": 1, "duration_ms": float("nan")}, "duration_ms"),
        (StepFields, {"step_index": 1, "duration_ms": float("inf")}, "duration_ms"),
        (StepFields, {"step_index": 1, "output": {"x": ["\x00"]}}, "output"),
        (FinishRunRequest, {"status": "stopped_by_policy"}, "status"),
        (ResolveRequest, {"resolution": ""}, "resolution"),
        (ResolveRequest, {"resolution": "x" * 2001}, "resolution"),
        (SetPricesRequest, {"prices": []}, "prices"),
        (
            SetPricesRequest,
            {"prices": [{"model": "m", "input_per_token": -1, "output_per_token": 0}]},
            "prices.0.input_per_token",
        ),
    ],
)
def test_bad_input_is_refused_naming_the_field(
    model: type[Any], data: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValidationError) as info:
        model.model_validate(data)
    assert field in _fields(info.value)


def test_batch_size_is_bounded() -> None:
    item = {"run_id": "r", "step_index": 1}
    assert len(StepBatchRequest.model_validate({"items": [item] * 5000}).items) == 5000
    with pytest.raises(ValidationError) as info:
        StepBatchRequest.model_validate({"items": [item] * 5001})
    assert "items" in _fields(info.value)
    with pytest.raises(ValidationError):
        StepBatchRequest.model_validate({"items": []})
    with pytest.raises(ValidationError) as info:
        StepBatchRequest.model_validate({"items": [{"step_index": 1}]})
    assert "items.0.run_id" in _fields(info.value)


def test_text_fields_refuse_lone_surrogates_and_nul() -> None:
    from services.gateway.workflows import RegisterAgentRequest

    for bad in ("a\udc80b", "nul\x00"):
        with pytest.raises(ValidationError):
            RegisterAgentRequest(agent_id="ok-agent", description=bad)
    assert RegisterAgentRequest(agent_id="ok-agent", description="é ✓").description == "é ✓"
