"""``mctl tenant`` and ``mctl user``: tenants, their API keys, and the people who may act in them.

The gateway's registration mounts :data:`tenant_app` into ``mctl`` as ``tenant`` and
:data:`user_app` as ``user``. Keys are printed once, when issued; only their hash is stored, so a
lost key is replaced, never recovered. Passwords are read from the terminal (or one line of
standard input with ``--password-stdin``) and only their argon2 hash is stored.
"""

from __future__ import annotations

import sys
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
from services.gateway.rbac import ROLES, SCOPES
from services.gateway.users import (
    create_user,
    disable_user,
    grant_role,
    list_users,
    revoke_role,
)

tenant_app = command_group("tenant", "Create tenants and manage their API keys.")
user_app = command_group("user", "Manage people: their logins and their roles per tenant.")

ScopeOption = Annotated[
    list[str] | None,
    typer.Option(
        "--scope",
        help=f"What the key may do, repeatable: {', '.join(SCOPES)} (default: all three).",
    ),
]


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
    scope: ScopeOption = None,
    database_url: DatabaseUrlOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Create a tenant and its first API key."""
    url = _database(database_url, data_dir)
    _, token = run_with_pool(
        url,
        lambda pool: provision_tenant(
            pool, tenant_id, name, key_name="first key", scopes=scope or ()
        ),
    )
    typer.echo(f"created tenant {tenant_id}")
    _print_key(token)


@tenant_app.command("key")
@one_line_errors
def key(
    tenant_id: Annotated[str, typer.Argument(help="An existing tenant.")],
    name: Annotated[str, typer.Option("--name", help="What the key is for.")] = "",
    scope: ScopeOption = None,
    database_url: DatabaseUrlOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Issue another API key of an existing tenant."""
    url = _database(database_url, data_dir)
    token = run_with_pool(url, lambda pool: issue_key(pool, tenant_id, name, scope or ()))
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


# --- users ----------------------------------------------------------------------------------------

UserArgument = Annotated[str, typer.Argument(help="The user's id (their login name).")]
RoleArgument = Annotated[str, typer.Argument(help=f"One of {', '.join(ROLES)}.")]
TenantArgument = Annotated[str, typer.Argument(help="An existing tenant.")]


def _password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    return str(typer.prompt("Password", hide_input=True, confirmation_prompt=True))


@user_app.command("create")
@one_line_errors
def user_create(
    user_id: UserArgument,
    password_stdin: Annotated[
        bool,
        typer.Option("--password-stdin", help="Read the password from one line of stdin."),
    ] = False,
    database_url: DatabaseUrlOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Create a user who signs in with a password (POST /v1/auth/token); grant roles next."""
    url = _database(database_url, data_dir)
    password = _password(password_stdin)
    run_with_pool(url, lambda pool: create_user(pool, user_id, password))
    typer.echo(f"created user {user_id}")


@user_app.command("list")
@one_line_errors
def user_list(database_url: DatabaseUrlOption = None, data_dir: DataDirOption = None) -> None:
    """Every user, whether disabled, and their roles per tenant."""
    url = _database(database_url, data_dir)
    users = run_with_pool(url, list_users)
    typer.echo(f"{'USER':<32} {'STATUS':<9} ROLES")
    for user in users:
        roles = "; ".join(f"{t}: {', '.join(sorted(r))}" for t, r in sorted(user.grants.items()))
        status = "disabled" if user.disabled else "active"
        typer.echo(f"{user.user_id:<32} {status:<9} {roles or '-'}")


@user_app.command("disable")
@one_line_errors
def user_disable(
    user_id: UserArgument,
    database_url: DatabaseUrlOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Disable a user: gateways refuse their tokens as soon as this commits."""
    url = _database(database_url, data_dir)
    changed = run_with_pool(url, lambda pool: disable_user(pool, user_id))
    typer.echo(f"disabled {user_id}" if changed else f"{user_id} was already disabled")


@user_app.command("grant")
@one_line_errors
def user_grant(
    user_id: UserArgument,
    tenant_id: TenantArgument,
    role: RoleArgument,
    database_url: DatabaseUrlOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Give a user a role in a tenant."""
    url = _database(database_url, data_dir)
    changed = run_with_pool(url, lambda pool: grant_role(pool, user_id, tenant_id, role))
    verb = "granted" if changed else "already held:"
    typer.echo(f"{verb} {role} in {tenant_id} to {user_id}")


@user_app.command("revoke")
@one_line_errors
def user_revoke(
    user_id: UserArgument,
    tenant_id: TenantArgument,
    role: RoleArgument,
    database_url: DatabaseUrlOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Take a user's role in a tenant away (gateways stop honouring it as soon as this commits)."""
    url = _database(database_url, data_dir)
    run_with_pool(url, lambda pool: revoke_role(pool, user_id, tenant_id, role))
    typer.echo(f"revoked {role} in {tenant_id} from {user_id}")
