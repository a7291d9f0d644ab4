"""``mctl workflow`` and ``mctl approval``: workflows, executions and approvals from a terminal.

Both talk to the gateway's HTTP API like any other client, so what they may do is what the
credentials they carry may do:

* the gateway is ``--url``, else ``$MC_GATEWAY_URL``, else the gateway of the system running on
  the data directory;
* an API key (``--api-key`` or ``$MC_API_KEY``) saves and runs workflows;
* approving and rejecting are for people: ``--user NAME`` signs in with a password read from
  the terminal (or one line of standard input with ``--password-stdin``), or ``$MC_TOKEN``
  carries a token already issued. ``--tenant`` picks the tenant of a person with roles in
  several.

Credentials are sent as headers only, never printed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from libs.runtime.cli_support import CliError, DataDirOption, command_group, one_line_errors
from services.gateway.cli_http import Api, ApiKeyOption, UrlOption, api_key_headers, gateway_url

workflow_app = command_group("workflow", "Save workflows, run them and follow their executions.")
approval_app = command_group("approval", "List, approve and reject steps waiting for approval.")

UserOption = Annotated[
    str | None,
    typer.Option(
        "--user",
        help="Sign in as this person (default: $MC_TOKEN, a token already issued).",
        show_default=False,
    ),
]
PasswordStdinOption = Annotated[
    bool,
    typer.Option("--password-stdin", help="Read the password from one line of standard input."),
]
TenantOption = Annotated[
    str | None,
    typer.Option(
        "--tenant", help="The tenant, for a person with roles in several.", show_default=False
    ),
]
ReasonOption = Annotated[str, typer.Option("--reason", help="Why (recorded with your name).")]

# ``run --wait`` polls for as long as it is asked to.
FINISHED = frozenset({"completed", "failed", "aborted"})
# What a follower waits before reconnecting to a stream that ended or dropped.
RECONNECT_S = 0.5


def _person_headers(
    url: str, user: str | None, password_stdin: bool, tenant: str | None
) -> dict[str, str]:
    """A person's bearer token: signed in now as ``user``, or ``$MC_TOKEN``."""
    headers = {"X-Tenant-Id": tenant} if tenant else {}
    if user is None:
        token = os.environ.get("MC_TOKEN")
        if not token:
            raise CliError("approvals are for people: pass --user NAME, or set MC_TOKEN")
        return {**headers, "Authorization": f"Bearer {token}"}
    password = (
        sys.stdin.readline().rstrip("\n")
        if password_stdin
        else typer.prompt(f"password of {user}", hide_input=True)
    )
    with Api(url, {}) as anonymous:
        issued = anonymous.send(
            "POST", "/v1/auth/token", json={"username": user, "password": password}
        )
    return {**headers, "Authorization": f"Bearer {issued['access_token']}"}


def caller_headers(
    url: str, api_key: str | None, user: str | None, password_stdin: bool, tenant: str | None
) -> dict[str, str]:
    """The caller of a command open to keys and people: ``--api-key`` if given, else a person
    (``--user``, or ``$MC_TOKEN``) if named, else ``$MC_API_KEY``."""
    if api_key or (user is None and "MC_TOKEN" not in os.environ):
        return api_key_headers(api_key)
    return _person_headers(url, user, password_stdin, tenant)


def _inputs(pairs: list[str] | None, file: Path | None) -> dict[str, Any]:
    """``--inputs-file`` (a JSON object), then each ``--input KEY=VALUE`` over it. A value that
    parses as JSON is taken as such (``n=3`` is a number), else as a string."""
    inputs: dict[str, Any] = {}
    if file is not None:
        loaded = json.loads(file.read_text())
        if not isinstance(loaded, dict):
            raise CliError(f"{file}: the inputs must be a JSON object")
        inputs.update(loaded)
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"--input {pair!r}: expected KEY=VALUE")
        try:
            inputs[key] = json.loads(value)
        except ValueError:
            inputs[key] = value
    return inputs


def describe(view: Mapping[str, Any]) -> str:
    """An execution in a few lines: its status, then one line per step."""
    lines = [f"execution {view['execution_id']}: {view['status']}"]
    if view.get("reason"):
        lines[0] += f" ({view['reason']})"
    for step in view.get("steps", []):
        line = f"  {step['step_id']:<24} {step['state']:<10} attempt {step.get('attempt', 0)}"
        if step.get("duration_ms") is not None:
            line += f"  {step['duration_ms']:.0f} ms"
        approval = step.get("approval") or {}
        if approval.get("pending"):
            line += f"  waiting for {approval['required']} {approval['role']} approval(s)"
        if step.get("reason"):
            line += f"  ({step['reason']})"
        lines.append(line)
    return "\n".join(lines)


def _changes(before: Mapping[str, str], view: Mapping[str, Any]) -> list[str]:
    return [
        f"{step['step_id']}: {step['state']}"
        for step in view.get("steps", [])
        if before.get(step["step_id"]) != step["state"]
    ]


@workflow_app.command("save")
@one_line_errors
def save(
    file: Annotated[Path, typer.Argument(help="A workflow document, YAML or JSON.")],
    base_version: Annotated[
        int | None,
        typer.Option(help="Refuse (409) if the newest version is no longer this one."),
    ] = None,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Validate a workflow document and save it as the workflow's next version."""
    media = "application/json" if file.suffix == ".json" else "application/yaml"
    params = {"base_version": base_version} if base_version is not None else {}
    with Api(gateway_url(url, data_dir), api_key_headers(api_key)) as api:
        saved = api.send(
            "POST",
            "/v1/workflows",
            content=file.read_bytes(),
            headers={"Content-Type": media},
            params=params,
        )
    state = "saved as version" if saved.get("created") else "unchanged at version"
    typer.echo(f"workflow {saved['workflow_id']} {state} {saved['version']}")


def _follow(api: Api, execution_id: str, view: dict[str, Any], deadline: float) -> dict[str, Any]:
    """Print each step change of an execution until it ends, and answer its final view.

    It follows the execution's event stream rather than polling: every event of the execution
    (not the live token usage) re-reads its view, so a change shows as soon as it happens. A
    dropped connection resumes from the last event id it saw.
    """
    seen: dict[str, str] = {}
    last_id: str | None = None

    def show(current: dict[str, Any]) -> dict[str, str]:
        for change in _changes(seen, current):
            typer.echo(f"  {change}")
        return {s["step_id"]: s["state"] for s in current.get("steps", [])}

    seen = show(view)
    while view["status"] not in FINISHED:
        try:
            for message in api.events(f"/v1/executions/{execution_id}/events", last_id):
                if time.monotonic() > deadline:
                    break
                if message.event in ("heartbeat", "usage"):
                    continue
                last_id = message.id or last_id
                view = api.send("GET", f"/v1/executions/{execution_id}")
                seen = show(view)
                if view["status"] in FINISHED or message.event == "end":
                    break
        except httpx.TransportError:
            pass  # the connection dropped or went silent: resume from the last event seen
        if time.monotonic() > deadline and view["status"] not in FINISHED:
            raise CliError(f"execution {execution_id} still {view['status']} after the timeout")
        view = api.send("GET", f"/v1/executions/{execution_id}")
        seen = show(view)
        if view["status"] not in FINISHED:
            time.sleep(RECONNECT_S)  # the stream's own retry delay before reconnecting
    return view


@workflow_app.command("run")
@one_line_errors
def run(
    workflow_id: Annotated[str, typer.Argument(help="The workflow to run.")],
    input_: Annotated[
        list[str] | None,
        typer.Option("--input", help="An input KEY=VALUE (repeatable; JSON values allowed)."),
    ] = None,
    inputs_file: Annotated[
        Path | None, typer.Option(help="Inputs as a JSON object.", dir_okay=False)
    ] = None,
    version: Annotated[int | None, typer.Option(help="Run this version (default: newest).")] = None,
    wait: Annotated[
        bool, typer.Option(help="Follow the execution, printing each step change, until it ends.")
    ] = False,
    timeout: Annotated[float, typer.Option(help="With --wait: give up after this many s.")] = 600,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Start an execution; with --wait, follow it to its end (exit 1 unless it completed)."""
    body: dict[str, Any] = {"inputs": _inputs(input_, inputs_file)}
    if version is not None:
        body["version"] = version
    with Api(gateway_url(url, data_dir), api_key_headers(api_key)) as api:
        view = api.send("POST", f"/v1/workflows/{workflow_id}/executions", json=body)
        execution_id = view["execution_id"]
        typer.echo(f"execution {execution_id} started ({view['status']})")
        if not wait:
            return
        view = _follow(api, execution_id, view, time.monotonic() + timeout)
    typer.echo(describe(view))
    if view["status"] != "completed":
        raise typer.Exit(1)


@workflow_app.command("show")
@one_line_errors
def show(
    execution_id: Annotated[str, typer.Argument(help="The execution.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """An execution's status and each step's state."""
    with Api(gateway_url(url, data_dir), api_key_headers(api_key)) as api:
        view = api.send("GET", f"/v1/executions/{execution_id}")
    typer.echo(json.dumps(view, indent=2) if as_json else describe(view))


@workflow_app.command("abort")
@one_line_errors
def abort(
    execution_id: Annotated[str, typer.Argument(help="The execution.")],
    reason: ReasonOption,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Abort an execution: nothing more is dispatched and its running attempts' runs end."""
    with Api(gateway_url(url, data_dir), api_key_headers(api_key)) as api:
        view = api.send("POST", f"/v1/executions/{execution_id}/abort", json={"reason": reason})
    typer.echo(describe(view))


@approval_app.command("list")
@one_line_errors
def approval_list(
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    user: UserOption = None,
    password_stdin: PasswordStdinOption = False,
    tenant: TenantOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Steps waiting for approval, oldest first, with their age and the SLA left."""
    base = gateway_url(url, data_dir)
    with Api(base, caller_headers(base, api_key, user, password_stdin, tenant)) as api:
        queue = api.send("GET", "/v1/approvals")["approvals"]
    if not queue:
        typer.echo("no step is waiting for approval")
    for item in queue:
        typer.echo(
            f"{item['execution_id']} {item['step_id']} ({item['risk_tier']}): "
            f"{item['approvals']}/{item['required']} {item['role']}, "
            f"waiting {item['age_s']:.0f} s, {item['sla_left_s']:.0f} s of SLA left"
        )


def _decide(
    verb: str,
    execution_id: str,
    step_id: str,
    reason: str,
    url: str | None,
    user: str | None,
    password_stdin: bool,
    tenant: str | None,
    data_dir: Path | None,
) -> None:
    base = gateway_url(url, data_dir)
    headers = _person_headers(base, user, password_stdin, tenant)
    with Api(base, headers) as api:
        view = api.send(
            "POST",
            f"/v1/executions/{execution_id}/steps/{step_id}/{verb}",
            json={"reason": reason},
        )
    typer.echo(describe(view))


@approval_app.command("approve")
@one_line_errors
def approve(
    execution_id: Annotated[str, typer.Argument(help="The execution.")],
    step_id: Annotated[str, typer.Argument(help="The step waiting for approval.")],
    reason: ReasonOption,
    url: UrlOption = None,
    user: UserOption = None,
    password_stdin: PasswordStdinOption = False,
    tenant: TenantOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Approve a step as yourself; it runs once enough distinct approvers have approved it."""
    _decide("approve", execution_id, step_id, reason, url, user, password_stdin, tenant, data_dir)


@approval_app.command("reject")
@one_line_errors
def reject(
    execution_id: Annotated[str, typer.Argument(help="The execution.")],
    step_id: Annotated[str, typer.Argument(help="The step waiting for approval.")],
    reason: ReasonOption,
    url: UrlOption = None,
    user: UserOption = None,
    password_stdin: PasswordStdinOption = False,
    tenant: TenantOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Reject a step: the execution fails, with your name and reason."""
    _decide("reject", execution_id, step_id, reason, url, user, password_stdin, tenant, data_dir)
