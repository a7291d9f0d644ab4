"""``mctl tenant``: create tenants and issue or revoke their API keys.

The gateway's registration mounts :data:`tenant_app` into ``mctl`` as ``tenant``. Keys are
printed once, when issued; only their hash is stored, so a lost key is replaced, never recovered.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from libs.runtime.cli_support import (
    DatabaseUrlOption,
    DataDirOption,
    admin_database,
    command_group,
    data_dir_of,
    one_line_errors,
)
from services.gateway.keys import issue_key, provision_tenant, revoke_key, run_with_pool

tenant_app = command_group("tenant", "Create tenants and manage their API keys.")


def _database(flag: str | None, data_dir: Path | None) -> str:
    return admin_database(flag, data_dir_of(data_dir)).secret()


def _print_key(token: str) -> None:
    typer.echo("API key (shown only now; store it somewhere safe):")
    typer.echo(token)


@tenant_app.command("create")
@one_line_errors
def create(
    tenant_id: Annotated[str, typer.Argument(help="Tenant id: a-z, 0-9, '_' or '-'.")],
    name: Annotated[str | None, typer.Option("--name", help="Display name.")] = None,
    database_url: DatabaseUrlOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Create a tenant and its first API key."""
    url = _database(database_url, data_dir)
    _, token = run_with_pool(
        url, lambda pool: provision_tenant(pool, tenant_id, name, key_name="first key")
    )
    typer.echo(f"created tenant {tenant_id}")
    _print_key(token)


@tenant_app.command("key")
@one_line_errors
def key(
    tenant_id: Annotated[str, typer.Argument(help="An existing tenant.")],
    name: Annotated[str, typer.Option("--name", help="What the key is for.")] = "",
    database_url: DatabaseUrlOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Issue another API key of an existing tenant."""
    url = _database(database_url, data_dir)
    token = run_with_pool(url, lambda pool: issue_key(pool, tenant_id, name))
    _print_key(token)


@tenant_app.command("revoke")
@one_line_errors
def revoke(
    key_id: Annotated[str, typer.Argument(help="The key id (the part after 'mc_').")],
    database_url: DatabaseUrlOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Revoke an API key (gateways refuse it as soon as the revocation commits)."""
    url = _database(database_url, data_dir)
    run_with_pool(url, lambda pool: revoke_key(pool, key_id))
    typer.echo(f"revoked {key_id}")
