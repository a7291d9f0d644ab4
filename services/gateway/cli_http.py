"""What every ``mctl`` command that talks to the gateway's API shares: where the gateway is,
an API key from the command line or the environment, and one-line errors for failed answers.

The gateway is ``--url``, else ``$MC_GATEWAY_URL``, else the gateway of the system running on the
data directory. Credentials are sent as headers only, never printed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from libs.runtime.cli_support import CliError, data_dir_of
from libs.runtime.state import read_state

# How long one request may take, by default.
REQUEST_TIMEOUT_S = 30.0
# How long an event stream may stay silent: the gateway sends a heartbeat every 15 s by default,
# so twice that means the connection is gone and the follower reconnects.
SSE_IDLE_S = 35.0

UrlOption = Annotated[
    str | None,
    typer.Option(
        "--url",
        help="The gateway (default: $MC_GATEWAY_URL, else the running system's gateway).",
        show_default=False,
    ),
]
ApiKeyOption = Annotated[
    str | None,
    typer.Option(
        "--api-key", help="An API key of the tenant (default: $MC_API_KEY).", show_default=False
    ),
]


def gateway_url(flag: str | None, data_dir: Path | None) -> str:
    """The gateway to talk to: ``--url``, ``$MC_GATEWAY_URL``, else the running system's."""
    if flag:
        return flag.rstrip("/")
    if env := os.environ.get("MC_GATEWAY_URL"):
        return env.rstrip("/")
    state = read_state(data_dir_of(data_dir)) or {}
    for child in state.get("children", []):
        if child.get("name") == "gateway" and child.get("url"):
            return str(child["url"]).rstrip("/")
    raise CliError(
        "no gateway: pass --url or set MC_GATEWAY_URL, or start the system with `mctl up`"
    )


class Api:
    """One gateway and one caller's credentials; every answer that is not 2xx is a
    :class:`CliError` naming the status and the gateway's own message."""

    def __init__(
        self, url: str, headers: Mapping[str, str], timeout: float = REQUEST_TIMEOUT_S
    ) -> None:
        self.http = httpx.Client(base_url=url, headers=dict(headers), timeout=timeout)

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def send(self, method: str, path: str, **kw: Any) -> Any:
        """The JSON answer of one request."""
        response = self.http.request(method, path, **kw)
        if response.is_success:
            return response.json()
        raise CliError(f"{method} {path}: {response.status_code} {error_message(response)}")

    def events(
        self, path: str, last_event_id: str | None = None, idle_s: float = SSE_IDLE_S
    ) -> Iterator[ServerSentEvent]:
        """The Server-Sent Events of one stream, as they arrive, heartbeats included (as events
        named ``heartbeat``, so a follower can check its own deadline between messages).

        Ends when the server closes the stream; an answer that is not 2xx is a
        :class:`CliError`; silence longer than ``idle_s`` is a :class:`httpx.ReadTimeout`.
        """
        headers = {"Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        timeout = httpx.Timeout(REQUEST_TIMEOUT_S, read=idle_s)
        with self.http.stream("GET", path, headers=headers, timeout=timeout) as response:
            if not response.is_success:
                response.read()
                raise CliError(f"GET {path}: {response.status_code} {error_message(response)}")
            event_id: str | None = None
            name = "message"
            data: list[str] = []
            for line in response.iter_lines():
                if line.startswith(":"):
                    yield ServerSentEvent(None, "heartbeat", "")
                elif line.startswith("id:"):
                    event_id = line[3:].strip()
                elif line.startswith("event:"):
                    name = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].removeprefix(" "))
                elif not line and data:
                    yield ServerSentEvent(event_id, name, "\n".join(data))
                    event_id, name, data = None, "message", []


@dataclass(frozen=True)
class ServerSentEvent:
    """One message of an event stream: its ``id:`` (``None`` when it has none), its
    ``event:`` name and its ``data:``."""

    id: str | None
    event: str
    data: str


def error_message(response: httpx.Response) -> str:
    """The gateway's own message in an answer that is not 2xx (else its text, shortened)."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(body)[:500]


def api_key_headers(api_key: str | None) -> dict[str, str]:
    """The ``Authorization`` header of ``--api-key``, else ``$MC_API_KEY`` (an admin's token is
    taken the same way)."""
    key = api_key or os.environ.get("MC_API_KEY")
    if not key:
        raise CliError("no API key: pass --api-key or set MC_API_KEY")
    return {"Authorization": f"Bearer {key}"}
