"""``mctl tenant``: create tenants and issue or revoke their API keys.

Mounted into ``mctl`` with ``app.add_typer(tenant_app, name="tenant")``. Keys are printed once,
when issued; only their hash is stored, so a lost key is replaced, never recovered.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, ParamSpec, TypeVar

import psycopg
import typer

from libs.errors import InvalidInput, MissionControlError
from libs.runtime import supervisor as sup
from services.gateway.keys import issue_key, provision_tenant, revoke_key, run_with_pool

tenant_app = typer.Typer(
    name="tenant",
    help="Create tenants and manage their API keys.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

P = ParamSpec("P")
R = TypeVar("R")

DEFAULT_DATA_DIR = Path("var/mc")

DatabaseUrlOption = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        help="PostgreSQL URL (default: $DATABASE_URL, else the running system's state.json).",
    ),
]
DataDirOption = Annotated[
    Path,
    typer.Option(
        "--data-dir",
        envvar="MC_DATA_DIR",
        file_okay=False,
        help="Data directory of the running system (to find its database).",
    ),
]


def database_url(explicit: str | None = None, data_dir: Path = DEFAULT_DATA_DIR) -> str:
    """The database to manage tenants in: ``explicit``, else ``$DATABASE_URL``, else the admin URL
    the supervisor recorded in ``<data_dir>/state.json`` (embedded PostgreSQL of ``mctl up``)."""
    if explicit:
        return explicit
    if os.environ.get("DATABASE_URL"):
        return os.environ["DATABASE_URL"]
    state = sup.read_state(data_dir.resolve())
    if state and state.get("postgres_admin_url"):
        return str(state["postgres_admin_url"])
    raise InvalidInput(
        "no database: pass --database-url, set DATABASE_URL, or start the system with `mctl up`"
    )


def _one_line_errors(fn: Callable[P, R]) -> Callable[P, R]:
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except (MissionControlError, psycopg.Error, OSError) as exc:
            typer.echo(f"error: {str(exc).strip() or type(exc).__name__}", err=True)
            raise typer.Exit(1) from None

    return wrapper


def _print_key(token: str) -> None:
    typer.echo("API key (shown only now; store it somewhere safe):")
    typer.echo(token)


@tenant_app.command("create")
@_one_line_errors
def create(
    tenant_id: Annotated[str, typer.Argument(help="Tenant id: a-z, 0-9, '_' or '-'.")],
    name: Annotated[str | None, typer.Option("--name", help="Display name.")] = None,
    database_url_: DatabaseUrlOption = None,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
) -> None:
    """Create a tenant and its first API key."""
    url = database_url(database_url_, data_dir)
    _, token = run_with_pool(
        url, lambda pool: provision_tenant(pool, tenant_id, name, key_name="first key")
    )
    typer.echo(f"created tenant {tenant_id}")
    _print_key(token)


@tenant_app.command("key")
@_one_line_errors
def key(
    tenant_id: Annotated[str, typer.Argument(help="An existing tenant.")],
    name: Annotated[str, typer.Option("--name", help="What the key is for.")] = "",
    database_url_: DatabaseUrlOption = None,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
) -> None:
    """Issue another API key of an existing tenant."""
    url = database_url(database_url_, data_dir)
    token = run_with_pool(url, lambda pool: issue_key(pool, tenant_id, name))
    _print_key(token)


@tenant_app.command("revoke")
@_one_line_errors
def revoke(
    key_id: Annotated[str, typer.Argument(help="The key id (the part after 'mc_').")],
    database_url_: DatabaseUrlOption = None,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
) -> None:
    """Revoke an API key (gateways refuse it within 30 seconds)."""
    url = database_url(database_url_, data_dir)
    run_with_pool(url, lambda pool: revoke_key(pool, key_id))
    typer.echo(f"revoked {key_id}")
