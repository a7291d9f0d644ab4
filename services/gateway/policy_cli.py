"""``mctl policy``: sign a bundle directory, push a signed bundle, activate it by digest.

``sign`` works offline, for people without OPA: it packs a bundle directory into a tar.gz with
the ``.signatures.json`` ``opa build --signing-alg EdDSA`` would write. ``push`` and ``activate``
talk to the gateway (``--url``, else ``MC_GATEWAY_URL``, else the running system's) with an API
key or an admin's token (``--api-key``, ``MC_API_KEY``). See ``docs/policies.md``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from libs.contracts.policy import ENVIRONMENTS
from libs.policy_bundles import sign_directory
from libs.runtime.cli_support import CliError, DataDirOption, command_group, one_line_errors
from services.gateway.cli_http import Api, ApiKeyOption, UrlOption, api_key_headers, gateway_url

policy_app = command_group("policy", "Sign, push and activate policy bundles.")

# Uploads wait for the bundle's own tests, which may take a while.
UPLOAD_TIMEOUT_S = 60.0

EnvironmentOption = Annotated[
    str,
    typer.Option("--environment", "-e", help=f"Which environment: {' or '.join(ENVIRONMENTS)}."),
]


def _environment(value: str) -> str:
    if value not in ENVIRONMENTS:
        raise CliError(f"--environment must be one of {', '.join(ENVIRONMENTS)}, not {value!r}")
    return value


def _activate(api: Api, digest: str, environment: str) -> dict[str, Any]:
    path = f"/v1/policy-bundles/{digest}:activate"
    answer: dict[str, Any] = api.send("POST", path, params={"environment": environment})
    return answer


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
    activate: Annotated[
        bool, typer.Option("--activate", help="Activate it (by its digest) once uploaded.")
    ] = False,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Upload a signed bundle; with --activate, activate it by the digest the server computed."""
    env = _environment(environment)
    headers = api_key_headers(api_key)
    with Api(gateway_url(url, data_dir), headers, timeout=UPLOAD_TIMEOUT_S) as api:
        stored: dict[str, Any] = api.send(
            "POST", "/v1/policy-bundles", params={"environment": env}, content=file.read_bytes()
        )
        if activate:
            stored = _activate(api, stored["bundle_digest"], env)
    typer.echo(json.dumps(stored, indent=2))


@policy_app.command("activate")
@one_line_errors
def activate_bundle(
    digest: Annotated[str, typer.Argument(help="The bundle's digest, sha256:<hex>.")],
    environment: EnvironmentOption = "production",
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Activate an uploaded bundle by its digest."""
    env = _environment(environment)
    with Api(gateway_url(url, data_dir), api_key_headers(api_key)) as api:
        typer.echo(json.dumps(_activate(api, digest, env), indent=2))
