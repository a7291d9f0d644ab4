"""What every ``mctl`` command shares, including those services contribute through their
registration (``mctl tenant`` comes from the gateway): common options, the data directory and
database lookup, and one-line error reporting."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, ParamSpec, TypeVar

import httpx
import psycopg
import typer

from libs.errors import MissionControlError, first_line
from libs.runtime.urls import ResolvedUrl, resolve_url
from libs.settings import DEFAULT_DATA_DIR, Settings, load_settings

P = ParamSpec("P")
R = TypeVar("R")

DataDirOption = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help=f"Data directory of the system (default: $MC_DATA_DIR, else {DEFAULT_DATA_DIR}).",
        file_okay=False,
        show_default=False,
    ),
]
DatabaseUrlOption = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        help=(
            "PostgreSQL URL of an administrative role (default: $DATABASE_ADMIN_URL, else "
            "$DATABASE_URL, else the database of the system running on the data directory)."
        ),
        show_default=False,
    ),
]


def command_group(name: str, help: str) -> typer.Typer:
    """A ``typer`` app configured like ``mctl`` itself: help when called bare, plain tracebacks
    (our errors are one line anyway), no shell-completion commands."""
    return typer.Typer(
        name=name,
        help=help,
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )


class CliError(MissionControlError):
    """A failure reported to the user as one line."""


def one_line_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Report expected failures as ``error: ...`` and exit 1 instead of printing a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except MissionControlError as exc:
            # Ours are written for the user; some carry a log excerpt on purpose.
            typer.echo(f"error: {str(exc).strip() or type(exc).__name__}", err=True)
            raise typer.Exit(1) from None
        except (psycopg.Error, OSError, httpx.HTTPError) as exc:
            typer.echo(f"error: {first_line(exc)}", err=True)
            raise typer.Exit(1) from None

    return wrapper


def data_dir_of(option: Path | None, settings: Settings | None = None) -> Path:
    """The data directory a command works on: ``--data-dir``, else the settings' (absolute)."""
    chosen = option if option is not None else (settings or load_settings()).data_dir
    return chosen.resolve()


def admin_database(
    flag: str | None, data_dir: Path, settings: Settings | None = None
) -> ResolvedUrl:
    """The database administrative commands work on (see :mod:`libs.runtime.urls`), or a
    :class:`CliError` naming the ways to give one."""
    found = resolve_url("admin_database", flag=flag, settings=settings, data_dir=data_dir)
    if found is None:
        raise CliError(
            "no database: pass --database-url, set DATABASE_URL (or DATABASE_ADMIN_URL), "
            "or start the system with `mctl up`"
        )
    return found
