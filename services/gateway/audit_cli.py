"""``mctl audit search``: search the tenant's audit log through the gateway's HTTP API.

Takes an API key with the ``read`` scope (``--api-key`` or ``$MC_API_KEY``) or a person
(``--user NAME`` or ``$MC_TOKEN``); credentials are sent as headers only, never printed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import orjson
import typer

from libs.runtime.cli_support import DataDirOption, command_group, one_line_errors
from services.gateway.cli_http import Api, ApiKeyOption, UrlOption, gateway_url
from services.gateway.workflow_cli import (
    PasswordStdinOption,
    TenantOption,
    UserOption,
    caller_headers,
)

audit_app = command_group("audit", "Search the audit log.")


@audit_app.callback()
def audit_group() -> None:
    """Search the audit log (a group, so ``mctl audit search`` keeps its name)."""


# CLI option → query parameter of GET /v1/audit/search.
FILTERS = {
    "run": "run_id",
    "agent": "agent_id",
    "workflow": "workflow_id",
    "execution": "execution_id",
    "policy": "policy_id",
    "outcome": "outcome",
    "incident": "incident_id",
    "actor": "actor",
    "event_type": "event_type",
    "since": "since",
    "until": "until",
    "text": "q",
}


def describe(event: Mapping[str, Any]) -> str:
    """One search result in one line."""
    parts = [event["occurred_at"], event["event_type"]]
    for key in ("run_id", "agent_id", "outcome", "incident_id"):
        if event.get(key):
            parts.append(f"{key.removesuffix('_id')}={event[key]}")
    if event.get("policy_ids"):
        parts.append(f"policy={','.join(event['policy_ids'])}")
    parts.append(f"by {event['actor']}")
    line = " ".join(parts)
    if event.get("excerpt"):
        excerpt = " ".join(event["excerpt"].split())
        line += f" — {excerpt[:100]}{'…' if len(excerpt) > 100 else ''}"
    return line


@audit_app.command("search")
@one_line_errors
def search(
    run: Annotated[str | None, typer.Option("--run", help="Events of this run.")] = None,
    agent: Annotated[str | None, typer.Option("--agent", help="Of this agent.")] = None,
    workflow: Annotated[
        str | None, typer.Option("--workflow", help="Of this workflow, its runs and executions.")
    ] = None,
    execution: Annotated[
        str | None, typer.Option("--execution", help="Of this workflow execution.")
    ] = None,
    policy: Annotated[str | None, typer.Option("--policy", help="Naming this policy.")] = None,
    outcome: Annotated[
        str | None,
        typer.Option("--outcome", help="Decisions with this outcome (allow, warn, deny)."),
    ] = None,
    incident: Annotated[str | None, typer.Option("--incident", help="Of this incident.")] = None,
    actor: Annotated[
        str | None, typer.Option("--actor", help="Caused by this actor (e.g. user:alice).")
    ] = None,
    event_type: Annotated[
        str | None, typer.Option("--type", help="Of this event type (e.g. admission.decided).")
    ] = None,
    since: Annotated[
        str | None, typer.Option("--since", help="At or after this time (ISO 8601 with zone).")
    ] = None,
    until: Annotated[
        str | None, typer.Option("--until", help="Before this time (ISO 8601 with zone).")
    ] = None,
    text: Annotated[
        str | None,
        typer.Option(
            "--text", "-q", help="Full text: every word in the reasons, errors or step data."
        ),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", help="Events per page (1 to 200).")] = 50,
    cursor: Annotated[
        str | None, typer.Option("--cursor", help="Continue after a page (its next cursor).")
    ] = None,
    pages: Annotated[int, typer.Option("--pages", help="Pages to fetch, following cursors.")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per event.")] = False,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    user: UserOption = None,
    password_stdin: PasswordStdinOption = False,
    tenant: TenantOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """The tenant's audit events matching every filter given, newest first."""
    base = gateway_url(url, data_dir)
    values = {
        "run": run, "agent": agent, "workflow": workflow, "execution": execution,
        "policy": policy, "outcome": outcome, "incident": incident, "actor": actor,
        "event_type": event_type, "since": since, "until": until, "text": text,
    }  # fmt: skip
    params: dict[str, Any] = {FILTERS[k]: v for k, v in values.items() if v is not None}
    params["limit"] = limit
    shown = 0
    with Api(base, caller_headers(base, api_key, user, password_stdin, tenant)) as api:
        for _ in range(max(pages, 1)):
            if cursor:
                params["cursor"] = cursor
            answer = api.send("GET", "/v1/audit/search", params=params)
            for event in answer["events"]:
                typer.echo(orjson.dumps(event).decode() if as_json else describe(event))
                shown += 1
            cursor = answer["next_cursor"]
            if not cursor:
                break
    if not shown and not as_json:
        typer.echo("no matching event")
    if cursor and not as_json:
        typer.echo(f"more: --cursor {cursor}")
