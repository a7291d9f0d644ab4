"""``mctl policy``: sign a bundle directory, push a signed bundle, activate it by digest.

``sign`` works offline, for people without OPA: it packs a bundle directory into a tar.gz with
the ``.signatures.json`` ``opa build --signing-alg EdDSA`` would write. ``push`` and ``activate``
talk to the gateway (``--url``, ``MC_URL``) with an API key or token (``--api-key``,
``MC_API_KEY``). See ``docs/policies.md``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from libs.contracts.policy import ENVIRONMENTS
from libs.policy_bundles import sign_directory
from libs.runtime.cli_support import CliError, command_group, one_line_errors

policy_app = command_group("policy", "Sign, push and activate policy bundles.")

DEFAULT_URL = "http://127.0.0.1:8000"

EnvironmentOption = Annotated[
    str,
    typer.Option("--environment", "-e", help=f"Which environment: {' or '.join(ENVIRONMENTS)}."),
]
UrlOption = Annotated[str, typer.Option("--url", envvar="MC_URL", help="The gateway's base URL.")]
ApiKeyOption = Annotated[
    str,
    typer.Option(
        "--api-key",
        envvar="MC_API_KEY",
        help="An API key (scope ingest) or an admin's token.",
        show_default=False,
    ),
]


def _environment(value: str, api_key: str) -> str:
    """The environment, checked, once an API key is known."""
    if value not in ENVIRONMENTS:
        raise CliError(f"--environment must be one of {', '.join(ENVIRONMENTS)}, not {value!r}")
    if not api_key:
        raise CliError("an API key is required: --api-key or MC_API_KEY")
    return value


def _request(method: str, url: str, api_key: str, **kwargs: Any) -> dict[str, Any]:
    response = httpx.request(
        method, url, headers={"Authorization": f"Bearer {api_key}"}, timeout=60.0, **kwargs
    )
    try:
        body = response.json()
    except ValueError:
        body = {}
    if response.status_code >= 400:
        error = body.get("error") if isinstance(body, dict) else None
        message = error.get("message") if isinstance(error, dict) else response.text[:500]
        raise CliError(f"{response.status_code}: {message}")
    return body if isinstance(body, dict) else {}


def _activate(url: str, api_key: str, digest: str, environment: str) -> dict[str, Any]:
    return _request(
        "POST",
        f"{url.rstrip('/')}/v1/policy-bundles/{digest}:activate",
        api_key,
        params={"environment": environment},
    )


@policy_app.command("sign")
@one_line_errors
def sign(
    directory: Annotated[Path, typer.Argument(help="The bundle directory (OPA layout).")],
    key: Annotated[Path, typer.Option("--key", help="The ed25519 private key (PEM).")],
    key_id: Annotated[str, typer.Option("--key-id", help="The key's id (the JWT kid).")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Where to write the tar.gz.")
    ] = None,
    revision: Annotated[
        str | None,
        typer.Option("--revision", help="Set the manifest's revision (dot-separated integers)."),
    ] = None,
) -> None:
    """Pack DIRECTORY into a signed bundle (tar.gz with .signatures.json)."""
    target = output or Path(f"{directory.resolve().name}.tar.gz")
    digest = sign_directory(directory, key.read_bytes(), key_id, target, revision=revision)
    typer.echo(f"{target}  {digest}")


@policy_app.command("push")
@one_line_errors
def push(
    file: Annotated[Path, typer.Argument(help="The signed bundle (tar.gz).")],
    environment: EnvironmentOption = "production",
    api_key: ApiKeyOption = "",
    url: UrlOption = DEFAULT_URL,
    activate: Annotated[
        bool, typer.Option("--activate", help="Activate it (by its digest) once uploaded.")
    ] = False,
) -> None:
    """Upload a signed bundle; with --activate, activate it by the digest the server computed."""
    env = _environment(environment, api_key)
    stored = _request(
        "POST",
        f"{url.rstrip('/')}/v1/policy-bundles",
        api_key,
        params={"environment": env},
        content=file.read_bytes(),
    )
    if activate:
        stored = _activate(url, api_key, stored["bundle_digest"], env)
    typer.echo(json.dumps(stored, indent=2))


@policy_app.command("activate")
@one_line_errors
def activate_bundle(
    digest: Annotated[str, typer.Argument(help="The bundle's digest, sha256:<hex>.")],
    environment: EnvironmentOption = "production",
    api_key: ApiKeyOption = "",
    url: UrlOption = DEFAULT_URL,
) -> None:
    """Activate an uploaded bundle by its digest."""
    env = _environment(environment, api_key)
    typer.echo(json.dumps(_activate(url, api_key, digest, env), indent=2))
