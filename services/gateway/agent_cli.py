"""``mctl agent``: save, validate, sandbox, promote, fork, disable and show registered agents.

Each command is one request to the gateway (``--url``, else ``MC_GATEWAY_URL``, else the running
system's) with an API key or a person's token (``--api-key``, ``MC_API_KEY``); promoting and
disabling need an admin's token. See ``docs/agents.md``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from libs.contracts.agents import ORIGINS
from libs.contracts.policy import ENVIRONMENTS
from libs.runtime.cli_support import CliError, DataDirOption, command_group, one_line_errors
from services.gateway.cli_http import Api, ApiKeyOption, UrlOption, api_key_headers, gateway_url

agent_app = command_group(
    "agent", "Save agent drafts, validate them, move them to the sandbox, promote and fork them."
)

AgentArgument = Annotated[str, typer.Argument(help="The registered agent's id.")]


def _call(
    method: str,
    path: str,
    url: str | None,
    api_key: str | None,
    data_dir: Path | None,
    **kw: Any,
) -> None:
    with Api(gateway_url(url, data_dir), api_key_headers(api_key)) as api:
        typer.echo(json.dumps(api.send(method, path, **kw), indent=2))


def _spec(file: Path) -> dict[str, Any]:
    try:
        spec = yaml.safe_load(file.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise CliError(f"cannot read the spec {str(file)!r}: {exc}") from None
    if not isinstance(spec, dict):
        raise CliError(f"{str(file)!r} must hold one JSON or YAML object (the agent spec)")
    return spec


def _one_of(value: str, allowed: tuple[str, ...], option: str) -> str:
    if value not in allowed:
        raise CliError(f"{option} must be one of {', '.join(allowed)}, not {value!r}")
    return value


@agent_app.command("draft")
@one_line_errors
def draft(
    agent_id: AgentArgument,
    file: Annotated[Path, typer.Argument(help="The spec, JSON or YAML (may be partial).")],
    origin: Annotated[
        str | None, typer.Option("--origin", help=f"On creation: {', '.join(ORIGINS)}.")
    ] = None,
    origin_ref: Annotated[
        str | None, typer.Option("--origin-ref", help="What the agent came from.")
    ] = None,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Create the agent or save its draft (the same spec again changes nothing)."""
    body: dict[str, Any] = {"agent_id": agent_id, "spec": _spec(file)}
    if origin is not None:
        body["origin"] = _one_of(origin, ORIGINS, "--origin")
    if origin_ref is not None:
        body["origin_ref"] = origin_ref
    _call("POST", "/v1/agents/draft", url, api_key, data_dir, json=body)


@agent_app.command("validate")
@one_line_errors
def validate(
    agent_id: AgentArgument,
    environment: Annotated[
        str, typer.Option("--environment", "-e", help=" or ".join(ENVIRONMENTS))
    ] = "production",
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Validate the agent against the environment's policy set (recorded); exit 1 if it fails."""
    env = _one_of(environment, ENVIRONMENTS, "--environment")
    with Api(gateway_url(url, data_dir), api_key_headers(api_key)) as api:
        verdict = api.send(
            "POST", "/v1/agents/validate", json={"agent_id": agent_id, "environment": env}
        )
    typer.echo(json.dumps(verdict, indent=2))
    if not verdict.get("passed"):
        raise typer.Exit(1)


@agent_app.command("show")
@one_line_errors
def show(
    agent_id: AgentArgument,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Show the agent: its newest version, what runs where, its last validation."""
    _call("GET", f"/v1/agents/{agent_id}", url, api_key, data_dir)


@agent_app.command("list")
@one_line_errors
def list_agents(
    state: Annotated[str | None, typer.Option("--state", help="Only agents in this state.")] = None,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """The tenant's registered agents, most recently changed first."""
    params = {"state": state} if state is not None else {}
    _call("GET", "/v1/agent-registry", url, api_key, data_dir, params=params)


def _transition(action: str) -> Any:
    def command(
        agent_id: AgentArgument,
        url: UrlOption = None,
        api_key: ApiKeyOption = None,
        data_dir: DataDirOption = None,
    ) -> None:
        _call("POST", f"/v1/agents/{agent_id}/{action}", url, api_key, data_dir)

    return command


agent_app.command("sandbox", help="Move the draft to the sandbox (validated there).")(
    one_line_errors(_transition("sandbox"))
)
agent_app.command("promote", help="Promote the sandboxed version to governed (admin).")(
    one_line_errors(_transition("promote"))
)
agent_app.command("fork", help="Open a new draft version from the governed one.")(
    one_line_errors(_transition("fork"))
)


@agent_app.command("disable")
@one_line_errors
def disable(
    agent_id: AgentArgument,
    reason: Annotated[str, typer.Option("--reason", help="Why (recorded).")],
    environment: Annotated[
        list[str] | None,
        typer.Option("--environment", "-e", help="Where (repeat; both when left out)."),
    ] = None,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Stop the agent running in one or both environments (admin)."""
    body: dict[str, Any] = {"reason": reason}
    if environment:
        body["environments"] = [_one_of(e, ENVIRONMENTS, "--environment") for e in environment]
    _call("POST", f"/v1/agents/{agent_id}/disable", url, api_key, data_dir, json=body)
