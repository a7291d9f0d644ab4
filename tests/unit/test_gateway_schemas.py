"""The API's request models refuse what the services behind the gateway could not store."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from services.gateway.client import Requests
from services.gateway.entrypoints import map_exception
from services.gateway.schemas import (
    AdmissionRequest,
    FinishRunRequest,
    ResolveRequest,
    SetPricesRequest,
    StartRunRequest,
    StepBatchRequest,
    StepFields,
)
from services.workflow_engine.entrypoints import StepItem
from tests.unit.test_usage import _load, _usage

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


def test_a_step_carries_its_full_usage_and_the_provider_cost() -> None:
    usage = _usage(_load("anthropic_cache_write.json"))
    request = Requests.record_step("run-1", 2, model="claude-sonnet-4", provider_cost_usd="0.0137",
                                   **usage.fields())  # fmt: skip
    assert isinstance(request.body, StepFields)
    # What the gateway forwards is what the workflow-engine reads, field for field.
    forwarded = {"run_id": "run-1", **request.body.model_dump(mode="json")}
    item = StepItem.model_validate(forwarded)
    assert (item.input_tokens, item.cache_write_tokens, item.output_tokens) == (2069, 2048, 393)
    assert str(item.provider_cost_usd) == "0.0137"


@pytest.mark.parametrize(
    ("usage", "message"),
    [
        ({"input_tokens": 25, "cached_input_tokens": 2048}, "exceed input_tokens"),
        ({"input_tokens": 10, "cached_input_tokens": 6, "cache_write_tokens": 6}, "exceed"),
        ({"output_tokens": 100, "reasoning_tokens": 101}, "reasoning_tokens (101) exceed"),
    ],
)
def test_usage_that_does_not_add_up_is_a_422_naming_the_fields(
    usage: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        StepBatchRequest.model_validate({"items": [{"run_id": "r", "step_index": 1, **usage}]})
    raw = caught.value.errors()
    resp = map_exception(RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in raw]))
    assert resp.status_code == 422
    assert message in bytes(resp.body).decode()
    # The workflow-engine refuses the same counts from any other caller.
    with pytest.raises(ValidationError, match=message.split(" (")[0]):
        StepItem.model_validate({"run_id": "r", "step_index": 1, **usage})
    # And a negative provider cost is no cost.
    with pytest.raises(ValidationError, match="provider_cost_usd"):
        StepFields.model_validate({"step_index": 1, "provider_cost_usd": "-0.01"})


def test_text_fields_refuse_lone_surrogates_and_nul() -> None:
    from services.gateway.workflows import RegisterAgentRequest

    for bad in ("a\udc80b", "nul\x00"):
        with pytest.raises(ValidationError):
            RegisterAgentRequest(agent_id="ok-agent", description=bad)
    assert RegisterAgentRequest(agent_id="ok-agent", description="é ✓").description == "é ✓"
