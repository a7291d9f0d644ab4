"""Requests that never reach a route still get the API's one error shape."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from libs.errors import InvalidInput
from libs.settings import Settings
from services.gateway.bootstrap import create_app
from services.gateway.domain import check_tenant_id

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
