"""Requests that never reach a route still get the API's one error shape."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from libs.contracts.limits import MAX_JSON_DEPTH
from libs.errors import InvalidInput
from libs.settings import Settings
from services.gateway.bootstrap import create_app
from services.gateway.domain import check_tenant_id
from services.gateway.schemas import StepFields

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def client() -> TestClient:
    # No lifespan: these requests must be answered without any backend.
    return TestClient(create_app(Settings()), raise_server_exceptions=False)


def test_unknown_path_is_a_404_in_the_error_shape(client: TestClient) -> None:
    r = client.get("/v1/nope")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "http_error"
    assert "Not Found" in r.json()["error"]["message"]


def test_wrong_method_is_a_405_in_the_error_shape(client: TestClient) -> None:
    r = client.delete("/v1/runs/r1")
    assert r.status_code == 405
    assert "Method Not Allowed" in r.json()["error"]["message"]


def test_the_system_tenant_id_is_reserved() -> None:
    with pytest.raises(InvalidInput, match="reserved"):
        check_tenant_id("system")
    assert check_tenant_id("systems") == "systems"


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b'{"agent_id": "\xff\xfe"}', "not valid UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"agent_id": ', "invalid JSON"),
    ],
)
def test_a_body_that_is_not_json_is_the_documented_422(
    client: TestClient, body: bytes, problem: str
) -> None:
    r = client.post("/v1/runs", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "invalid_input"
    assert problem in r.json()["error"]["message"]


def test_json_nested_past_the_limit_is_refused_naming_the_field() -> None:
    deep: object = 1
    for _ in range(MAX_JSON_DEPTH):
        deep = [deep]
    StepFields.model_validate({"step_index": 1, "input": deep[0]})  # type: ignore[index]
    with pytest.raises(ValidationError, match=f"deeper than {MAX_JSON_DEPTH}") as info:
        StepFields.model_validate({"step_index": 1, "input": deep})
    assert info.value.errors()[0]["loc"] == ("input",)


def test_every_operation_documents_its_success_and_error_bodies(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path, item in spec["paths"].items():
        for method, op in item.items():
            responses = op["responses"]
            where = f"{method.upper()} {path}"
            ok = next(code for code in responses if code.startswith("2"))
            schema = responses[ok]["content"]["application/json"]["schema"]
            assert schema.get("$ref") or schema.get("properties"), where
            for code in ("401", "422", "429", "503", "504"):
                assert responses[code]["content"]["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/ErrorResponse"
                }, where
            assert "Retry-After" in responses["429"]["headers"], where
