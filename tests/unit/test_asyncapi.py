"""The checked-in AsyncAPI document (docs/asyncapi.json) matches the code."""

from __future__ import annotations

import json

import pytest

from scripts.gen_asyncapi import DOC, render

pytestmark = pytest.mark.unit


def test_the_asyncapi_document_is_up_to_date() -> None:
    assert DOC.read_text() == render(), (
        "docs/asyncapi.json differs from the routes and event models: "
        "run python scripts/gen_asyncapi.py"
    )


def test_it_names_every_route_and_every_current_event_with_its_schema() -> None:
    document = json.loads(render())
    channels = document["channels"]
    assert "mc.rpc.admission.admit" in channels
    assert "mc.evt.{tenant_id}.run.started" in channels
    schemas = document["components"]["schemas"]
    # A request's schema is its handler's pydantic argument ...
    assert "estimate" in schemas["AdmitCall"]["properties"]
    # ... and an event's is the envelope with the current version of its model as payload.
    envelope = schemas["RunStartedEnvelope"]
    assert envelope["properties"]["payload"] == {"$ref": "#/components/schemas/RunStarted"}
