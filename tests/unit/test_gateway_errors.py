"""The gateway's one error mapping, and the typed client's reading of error answers."""

from __future__ import annotations

import json

import httpx
import orjson
import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from structlog.testing import capture_logs

from libs import errors
from services.gateway.client import ApiError, ApiRequest, Requests, read_response
from services.gateway.entrypoints import (
    PayloadTooLarge,
    batch_chunks,
    export_response,
    map_exception,
)
from services.gateway.schemas import StepBatchRequest

pytestmark = pytest.mark.unit


def _body(resp: object) -> dict[str, object]:
    return json.loads(resp.body)  # type: ignore[attr-defined,no-any-return]


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (errors.NotFound("run r1 not found"), 404, "not_found"),
        (errors.Conflict("run is stopped"), 409, "conflict"),
        (errors.ConcurrencyError("s", 1, 2), 409, "concurrency_conflict"),
        (errors.InvalidInput("bad"), 422, "invalid_input"),
        (errors.Unauthorized("no key"), 401, "unauthorized"),
        (errors.TransientError("workflow is not available"), 503, "unavailable"),
        (errors.DeadlineExceeded("too slow"), 504, "deadline_exceeded"),
        (PayloadTooLarge("too big"), 413, "payload_too_large"),
    ],
)
def test_project_errors_keep_their_status_code_and_message(
    exc: errors.MissionControlError, status: int, code: str
) -> None:
    resp = map_exception(exc)
    assert resp.status_code == status
    assert _body(resp) == {"error": {"code": code, "message": str(exc)}}


def test_unauthorized_tells_the_client_how_to_authenticate() -> None:
    assert map_exception(errors.Unauthorized("x")).headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "exc", [RuntimeError("secret internals"), errors.MissionControlError("KeyError('x')")]
)
def test_unexpected_errors_are_a_logged_generic_500(exc: Exception) -> None:
    with capture_logs() as logs:
        resp = map_exception(exc)
    assert [e["event"] for e in logs] == ["gateway.unhandled_error"]
    assert logs[0]["log_level"] == "error"
    assert resp.status_code == 500
    body = _body(resp)
    assert body["error"]["code"] == "internal"  # type: ignore[index]
    assert str(exc) not in json.dumps(body)


def test_validation_errors_are_422_naming_each_field() -> None:
    try:
        StepBatchRequest.model_validate(
            {"items": [{"run_id": "r", "step_index": 1, "input_tokens": -1, "status": "weird"}]}
        )
    except ValidationError as exc:
        raw = exc.errors()
    resp = map_exception(RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in raw]))
    assert resp.status_code == 422
    message = _body(resp)["error"]["message"]  # type: ignore[index]
    assert "body.items.0.input_tokens" in message
    assert "body.items.0.status" in message


def test_invalid_json_is_reported_as_such() -> None:
    exc = RequestValidationError(
        [
            {
                "type": "json_invalid",
                "loc": ("body", 3),
                "msg": "JSON decode error",
                "ctx": {"error": "Expecting value"},
            }
        ]
    )
    message = _body(map_exception(exc))["error"]["message"]  # type: ignore[index]
    assert "invalid JSON" in message


def test_export_sets_content_type_and_disposition() -> None:
    csv = export_response(
        "r1", "csv", {"content_type": "text/csv; charset=utf-8", "body": "a,b\n1,2\n"}
    )
    assert csv.headers["content-type"].startswith("text/csv")
    assert csv.headers["content-disposition"] == 'attachment; filename="run-r1.csv"'
    assert csv.body == b"a,b\n1,2\n"
    doc = export_response("r1", "json", {"events": [1]})
    assert doc.headers["content-type"] == "application/json"
    assert json.loads(bytes(doc.body)) == {"events": [1]}


def test_client_raises_api_error_with_the_server_code_and_message() -> None:
    request = Requests.run("r1")
    response = httpx.Response(404, json={"error": {"code": "not_found", "message": "no run r1"}})
    with pytest.raises(ApiError) as info:
        read_response(request, response)
    assert (info.value.status, info.value.code, info.value.message) == (
        404,
        "not_found",
        "no run r1",
    )
    with pytest.raises(ApiError) as info:
        read_response(request, httpx.Response(502, text="bad gateway"))
    assert (info.value.status, info.value.message) == (502, "bad gateway")


def test_client_builds_requests_the_server_accepts() -> None:
    req = Requests.admit("run 1/x", 3, model="m", input_tokens=8000, max_output_tokens=1500)
    kwargs = req.to_httpx()
    # Path segments are escaped, so an id can never address another resource.
    assert kwargs["url"] == "/v1/runs/run%201%2Fx/admissions"
    assert json.loads(kwargs["content"]) == {
        "step_index": 3,
        "kind": "llm_call",
        "model": "m",
        "estimate": {"input_tokens": 8000, "max_output_tokens": 1500},
    }
    typed = read_response(
        req,
        httpx.Response(
            200,
            json={
                "decision_id": "d",
                "outcome": "deny",
                "bundle_digest": "x",
                "reasons": [{"policy_id": "token_limit", "severity": "high", "message": "m"}],
            },
        ),
    )
    assert typed.outcome == "deny"
    assert typed.reasons[0].policy_id == "token_limit"
    assert Requests.runs(status="live").to_httpx()["params"] == {
        "status": "live",
        "limit": 100,
        "offset": 0,
    }
    same = Requests.admit(
        "run 1/x", 3, model="m", estimate={"input_tokens": 8000, "max_output_tokens": 1500}
    )
    assert same.to_httpx() == kwargs
    raw: ApiRequest[bytes] = Requests.export("r", "csv")
    assert read_response(raw, httpx.Response(200, content=b"a,b")) == b"a,b"
    with pytest.raises(ValidationError):
        Requests.record_step("r", 1, input_tokens=-1)


def test_batches_are_forwarded_in_order_in_bounded_chunks() -> None:
    items = [{"run_id": "r", "step_index": i, "input": "x" * 100} for i in range(1, 2501)]
    chunks = batch_chunks(items)
    assert [len(c) for c in chunks] == [1000, 1000, 500]
    assert [i for c in chunks for i in c] == items
    by_size = batch_chunks(items[:10], max_bytes=500)
    assert all(len(orjson.dumps(c)) <= 600 for c in by_size)
    assert [i for c in by_size for i in c] == items[:10]
    # One item larger than the byte budget still goes, alone.
    assert batch_chunks([{"input": "x" * 1000}], max_bytes=10) == [[{"input": "x" * 1000}]]
