"""Generate ``docs/asyncapi.json``: every subject on the bus and what it carries.

FastStream writes the request subjects (``mc.rpc.<service>.<method>``) from the services'
routers: each route's request schema is its handler's pydantic argument. The event subjects
(``mc.evt.<tenant>.<type>`` on the ``MC_EVENTS`` JetStream stream) and the dead letters are
published by the outbox relay and the consumers, which FastStream does not run, so they are
declared here as publishers whose payload is the event envelope with the event model of the
current schema version (``libs/contracts``) in ``payload``.

    python scripts/gen_asyncapi.py          # rewrite docs/asyncapi.json
    python scripts/gen_asyncapi.py --check  # exit 1 when it differs from the code

``tests/unit/test_asyncapi.py`` fails when the checked-in document drifts from the code.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, cast

from faststream.nats import JStream, NatsBroker
from faststream.specification import AsyncAPI
from nats.aio.client import Client as NATS
from pydantic import BaseModel, create_model

from libs.contracts import events as _events  # noqa: F401 - registers every model
from libs.contracts.envelope import EventEnvelope
from libs.contracts.registry import all_models, current_version
from libs.contracts.subjects import (
    DLQ_PREFIX,
    DLQ_STREAM,
    EVENTS_PREFIX,
    EVENTS_STREAM,
    LIVE_PREFIX,
    LIVE_STREAM,
)
from libs.eventbus.rpc import RpcServer
from services.audit_replay.entrypoints import AuditQueries
from services.audit_replay.entrypoints import rpc_server as audit_rpc
from services.audit_replay.evidence_queries import EvidenceQueries
from services.cost.entrypoints import build_rpc_server as cost_rpc
from services.incident.entrypoints import RPC_SERVICE as INCIDENT
from services.incident.entrypoints import build_rpc as incident_rpc
from services.policy_admission.entrypoints import diff_routes, simulation_routes
from services.policy_admission.entrypoints import rpc_server as admission_rpc
from services.workflow_engine.entrypoints import RPC_SERVICE as WORKFLOW
from services.workflow_engine.entrypoints import build_live_rpc
from services.workflow_engine.entrypoints import build_rpc as workflow_rpc
from services.workflow_engine.live import LiveReport

DOC = Path(__file__).resolve().parent.parent / "docs" / "asyncapi.json"
TITLE = "Mission Control bus"
VERSION = "1"
DESCRIPTION = (
    "Requests (core NATS request-reply, queue group per service) answer "
    '`{"ok": true, "result": ...}` or `{"ok": false, "error": {"code", "message"}}`; headers '
    "`Mc-Deadline` (unix ms), `Mc-Correlation-Id`, `Mc-Actor`, `traceparent`. Events are "
    "published from the PostgreSQL outbox to the JetStream stream MC_EVENTS, one subject per "
    "tenant and event type; poison messages go to MC_DLQ."
)


def _servers() -> list[RpcServer]:
    """Every service's request server, built only to read its routes (never started)."""
    # The handlers are never called: registering a route only reads the handler's signature.
    unused: Any = None
    nc = NATS()
    admission = admission_rpc(nc, unused)
    # The diff and simulation requests are registered only beside the tenants' bundles, which
    # a bare server has none of: add them here so the document names them.
    diff_routes(admission, unused)
    simulation_routes(admission, unused)
    return [
        admission,
        build_live_rpc(workflow_rpc(RpcServer(nc, WORKFLOW), unused), unused),
        incident_rpc(RpcServer(nc, INCIDENT), unused),
        cost_rpc(nc, unused),
        # Registering reads only the methods' names; a bare instance holds no connections.
        audit_rpc(nc, _bare_audit_queries()),
    ]


def _bare_audit_queries() -> AuditQueries:
    """The audit service's queries, with the evidence methods, holding no connections."""
    queries = AuditQueries.__new__(AuditQueries)
    queries.store_reads = EvidenceQueries.__new__(EvidenceQueries).routes()
    queries.answers = None  # no answer cache: the routes are only listed here
    return queries


def _event_envelope(model: type[BaseModel]) -> type[BaseModel]:
    """The envelope of one event type, its ``payload`` typed as the event model."""
    return cast(
        type[BaseModel],
        create_model(
            f"{model.__name__}Envelope",
            __base__=EventEnvelope,
            __doc__=f"An envelope carrying {model.__name__} ({model.__doc__ or ''}).".strip(),
            payload=(model, ...),
        ),
    )


def build_broker() -> NatsBroker:
    """A broker (never connected) holding every route, event subject and the dead letters."""
    broker = NatsBroker("nats://localhost:4222", logger=None)
    for server in _servers():
        for router in server.routers():
            broker.include_router(router)
    events = JStream(EVENTS_STREAM, declare=False)
    for model in all_models():
        event_type = getattr(model, "event_type", "")
        version = getattr(model, "schema_version", 0)
        if version != current_version(event_type):
            continue  # earlier versions are upcast on read; only the current one is published
        broker.publisher(
            f"{EVENTS_PREFIX}.{{tenant_id}}.{event_type}",
            stream=events,
            title=f"{EVENTS_PREFIX}.{{tenant_id}}.{event_type}",
            description=f"`{event_type}` v{version}, published by the outbox relay.",
            schema=_event_envelope(model),
        )
    broker.publisher(
        f"{LIVE_PREFIX}.{{tenant_id}}.{{execution_id}}.{{run_id}}",
        stream=JStream(LIVE_STREAM, declare=False),
        title=f"{LIVE_PREFIX}.{{tenant_id}}.{{execution_id}}.{{run_id}}",
        description="Live usage a worker reported while a step runs (`_` for a run that is no "
        "workflow step; `.` in an id written `%2E`), published by the workflow-engine; kept an "
        "hour, for the SSE endpoints. Not a record.",
        schema=LiveReport,
    )
    broker.publisher(
        f"{DLQ_PREFIX}.{{consumer}}",
        stream=JStream(DLQ_STREAM, declare=False),
        title=f"{DLQ_PREFIX}.{{consumer}}",
        description="An event a consumer could not handle, as it was received.",
        schema=EventEnvelope,
    )
    return broker


def render() -> str:
    """The AsyncAPI 3.0 document as stable text (sorted keys, trailing newline)."""
    spec = AsyncAPI(
        build_broker(),
        title=TITLE,
        version=VERSION,
        description=DESCRIPTION,
        schema_version="3.0.0",
    )
    document = json.loads(spec.to_specification().to_json())
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="fail when the file is out of date")
    args = parser.parse_args()
    text = render()
    if args.check:
        current = DOC.read_text() if DOC.exists() else ""
        if current != text:
            print(f"{DOC} is out of date: run python scripts/gen_asyncapi.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
