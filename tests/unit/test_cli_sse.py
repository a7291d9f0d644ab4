"""The command line's event-stream reader: ids, names, multi-line data and heartbeats, as the
gateway writes them (``services/gateway/live.py``)."""

from __future__ import annotations

import httpx
import pytest

from libs.runtime.cli_support import CliError
from services.gateway.cli_http import Api, ServerSentEvent

STREAM = (
    "retry: 1000\n\n"
    'id: 7\nevent: snapshot\ndata: {"a": 1}\n\n'
    ": heartbeat\n\n"
    "id: 8\nevent: step.completed\ndata: line one\ndata: line two\n\n"
    "event: end\ndata: {}\n\n"
)


def _api(handler: httpx.MockTransport) -> Api:
    api = Api("http://gateway.test", {})
    api.http = httpx.Client(base_url="http://gateway.test", transport=handler)
    return api


def test_events_are_parsed_in_order_with_heartbeats_and_resume_header() -> None:
    seen: dict[str, str | None] = {}

    def handle(request: httpx.Request) -> httpx.Response:
        seen["last"] = request.headers.get("Last-Event-ID")
        return httpx.Response(200, text=STREAM, headers={"content-type": "text/event-stream"})

    events = list(_api(httpx.MockTransport(handle)).events("/v1/executions/x/events", "6"))
    assert seen["last"] == "6"
    assert events == [
        ServerSentEvent("7", "snapshot", '{"a": 1}'),
        ServerSentEvent(None, "heartbeat", ""),
        ServerSentEvent("8", "step.completed", "line one\nline two"),
        ServerSentEvent(None, "end", "{}"),
    ]


def test_a_refused_stream_is_a_one_line_error_naming_the_status() -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"detail": "no execution x"})

    with pytest.raises(CliError, match="404"):
        list(_api(httpx.MockTransport(handle)).events("/v1/executions/x/events"))
