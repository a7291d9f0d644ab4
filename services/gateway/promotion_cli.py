"""``mctl promotion``: request, list, approve, reject and execute agent promotions.

It talks to the gateway's HTTP API like any other client (``docs/policies.md#promotions``):
requesting, listing and executing take an API key (``--api-key`` or ``$MC_API_KEY``) or a
person; approving and rejecting are for people (``--user NAME`` or ``$MC_TOKEN``), never the
requester. Credentials are sent as headers only, never printed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

from libs.runtime.cli_support import DataDirOption, command_group, one_line_errors
from services.gateway.cli_http import Api, ApiKeyOption, UrlOption, gateway_url
from services.gateway.workflow_cli import (
    PasswordStdinOption,
    ReasonOption,
    TenantOption,
    UserOption,
    _person_headers,
    caller_headers,
)

promotion_app = command_group("promotion", "Request, approve and execute agent promotions.")

PromotionId = Annotated[str, typer.Argument(help="The promotion request's id.")]


def describe(view: Mapping[str, Any]) -> str:
    """A promotion request in one line."""
    approval = view["approval"]
    line = (
        f"{view['promotion_id']} {view['agent_id']} v{view['agent_version']} → "
        f"{view['environment']} ({view['tier']}): {view['status']}, "
        f"{len(approval['approvers'])}/{approval['required']} {approval['role']}"
    )
    if view.get("stale_reasons"):
        line += f" — stale: {'; '.join(view['stale_reasons'])}"
    if view.get("executed"):
        e = view["executed"]
        line += f" — v{e['agent_version']} under {e['policy_digest']}"
    return line


@promotion_app.command("request")
@one_line_errors
def request(
    agent_id: Annotated[str, typer.Argument(help="The registered agent.")],
    version: Annotated[int, typer.Option("--version", help="The agent's newest version.")],
    environment: Annotated[
        str, typer.Option("--environment", help="sandbox or production.")
    ] = "production",
    diff_hash: Annotated[
        str | None, typer.Option("--diff-hash", help="The diff you reviewed.")
    ] = None,
    reason: Annotated[str | None, typer.Option("--reason", help="Why.")] = None,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    user: UserOption = None,
    password_stdin: PasswordStdinOption = False,
    tenant: TenantOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Request a promotion of the agent's version into an environment."""
    base = gateway_url(url, data_dir)
    body: dict[str, Any] = {"agent_id": agent_id, "version": version, "environment": environment}
    if diff_hash:
        body["diff_hash"] = diff_hash
    if reason:
        body["reason"] = reason
    with Api(base, caller_headers(base, api_key, user, password_stdin, tenant)) as api:
        typer.echo(describe(api.send("POST", "/v1/promotions/requests", json=body)))


@promotion_app.command("list")
@one_line_errors
def listing(
    pending: Annotated[bool, typer.Option("--pending", help="Only pending requests.")] = False,
    agent_id: Annotated[str | None, typer.Option("--agent", help="Only this agent's.")] = None,
    approver_id: Annotated[
        str | None, typer.Option("--approver", help="Only those naming or approved by this actor.")
    ] = None,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    user: UserOption = None,
    password_stdin: PasswordStdinOption = False,
    tenant: TenantOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """The tenant's promotion requests, newest first."""
    base = gateway_url(url, data_dir)
    params: dict[str, Any] = {"pending": "true"} if pending else {}
    if agent_id:
        params["agent_id"] = agent_id
    if approver_id:
        params["approver_id"] = approver_id
    with Api(base, caller_headers(base, api_key, user, password_stdin, tenant)) as api:
        found = api.send("GET", "/v1/promotions/requests", params=params)["promotions"]
    if not found:
        typer.echo("no promotion request")
    for view in found:
        typer.echo(describe(view))


def _decide(
    verb: str,
    promotion_id: str,
    reason: str,
    url: str | None,
    user: str | None,
    password_stdin: bool,
    tenant: str | None,
    data_dir: Path | None,
) -> None:
    base = gateway_url(url, data_dir)
    with Api(base, _person_headers(base, user, password_stdin, tenant)) as api:
        view = api.send(
            "POST", f"/v1/promotions/requests/{promotion_id}/{verb}", json={"reason": reason}
        )
    typer.echo(describe(view))


@promotion_app.command("approve")
@one_line_errors
def approve(
    promotion_id: PromotionId,
    reason: ReasonOption,
    url: UrlOption = None,
    user: UserOption = None,
    password_stdin: PasswordStdinOption = False,
    tenant: TenantOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Approve a request as yourself (not your own)."""
    _decide("approve", promotion_id, reason, url, user, password_stdin, tenant, data_dir)


@promotion_app.command("reject")
@one_line_errors
def reject(
    promotion_id: PromotionId,
    reason: ReasonOption,
    url: UrlOption = None,
    user: UserOption = None,
    password_stdin: PasswordStdinOption = False,
    tenant: TenantOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Reject an open request (or withdraw your own)."""
    _decide("reject", promotion_id, reason, url, user, password_stdin, tenant, data_dir)


@promotion_app.command("execute")
@one_line_errors
def execute(
    promotion_id: PromotionId,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    user: UserOption = None,
    password_stdin: PasswordStdinOption = False,
    tenant: TenantOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Carry out an approved request."""
    base = gateway_url(url, data_dir)
    with Api(base, caller_headers(base, api_key, user, password_stdin, tenant)) as api:
        view = api.send("POST", f"/v1/promotions/requests/{promotion_id}/execute")
    typer.echo(describe(view))
