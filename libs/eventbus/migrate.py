"""Versioned SQL migrations, applied in order and recorded in ``public.schema_migrations``.

The event store ships a folder of ``NNNN_name.sql`` files, and so does every service that names
one in its registration (:mod:`libs.runtime.registry`); the migration id is
``<component>/<file name>``. The event store's come first, then the services' in component name
order. A migration runs in one transaction with its bookkeeping row, and an advisory lock keeps
two processes from migrating at once.

Before the migrations run, every login role exists: one per service (its registration's
``db_role``) and :data:`RELAY_ROLE`, so that migrations can grant to them. After them, the map of
stream categories to the roles that may append to them (``eventstore.stream_categories``, which
row-level security on ``eventstore.events`` reads) is brought up to date from the registrations'
``stream_categories``: the one place that says which service owns which streams.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import psycopg
from psycopg import sql
from pydantic import SecretStr

from libs.runtime.pg_credentials import scram_verifier
from libs.runtime.registry import RegistrationError, ServiceRegistration, discover

SERVICE_ROLE = "mc_service"
"""The role every service shared before each had its own; kept, without privileges or login."""
RELAY_ROLE = "mc_relay"
RELAY_NAME = "relay"
RELAY_CATEGORIES = ("anchor",)
"""The relay's own streams: the signed checkpoints (``system/anchor/checkpoints``)."""
_MIGRATION_LOCK = 7_231_001

EVENTSTORE_COMPONENT = "eventstore"


def migration_dirs(
    services: Sequence[ServiceRegistration] | None = None,
) -> list[tuple[str, Path]]:
    """(component, folder) of every migration folder, the event store first.

    ``services`` default to the installed ones. The order does not follow the services' start
    order: ids already recorded in a database must keep being applied in the order they were.
    """
    registered = discover() if services is None else services
    dirs = [(EVENTSTORE_COMPONENT, Path(__file__).parent / "migrations")]
    seen: dict[str, str] = {}
    for reg in registered:
        component = reg.migration_component
        if component is None or reg.migrations is None:
            continue
        if component in seen or component == EVENTSTORE_COMPONENT:
            # Two folders under one prefix would make their ids collide.
            owner = seen.get(component, EVENTSTORE_COMPONENT)
            raise RegistrationError(
                f"services {owner!r} and {reg.name!r} both ship migrations as {component!r}"
            )
        if not reg.migrations.is_dir():
            raise RegistrationError(f"migrations of {reg.name!r} not found at {reg.migrations}")
        seen[component] = reg.name
        dirs.append((component, reg.migrations))
    return dirs[:1] + sorted(dirs[1:])


def login_roles(services: Sequence[ServiceRegistration] | None = None) -> dict[str, str]:
    """Process name → the role it logs in as: the relay's and each service's that has one."""
    registered = discover() if services is None else services
    roles = {RELAY_NAME: RELAY_ROLE}
    for reg in registered:
        if reg.db_role is not None:
            roles[reg.name] = reg.db_role
    return roles


def stream_category_owners(
    services: Sequence[ServiceRegistration] | None = None,
) -> dict[str, str]:
    """Stream category → the role that may append to it, from the registrations."""
    registered = discover() if services is None else services
    owners: dict[str, str] = dict.fromkeys(RELAY_CATEGORIES, RELAY_ROLE)
    claimed: dict[str, str] = dict.fromkeys(RELAY_CATEGORIES, RELAY_NAME)
    for reg in registered:
        if reg.stream_categories and reg.db_role is None:
            raise RegistrationError(f"service {reg.name!r} owns stream categories but no db_role")
        for category in reg.stream_categories:
            if category in claimed:
                raise RegistrationError(
                    f"services {claimed[category]!r} and {reg.name!r} both own the stream "
                    f"category {category!r}"
                )
            claimed[category] = reg.name
            assert reg.db_role is not None
            owners[category] = reg.db_role
    return owners


def ensure_role(
    conn: psycopg.Connection,
    role: str,
    password: SecretStr | None = None,
    *,
    login: bool = True,
) -> None:
    """Create ``role`` without any privilege when it does not exist; set its password when one
    is given (as a SCRAM verifier: the password itself never reaches the server)."""
    row = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
    if row is None:
        conn.execute(
            sql.SQL("CREATE ROLE {} {} NOSUPERUSER NOCREATEDB NOCREATEROLE").format(
                sql.Identifier(role), sql.SQL("LOGIN" if login else "NOLOGIN")
            )
        )
    if password is not None:
        conn.execute(
            sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(scram_verifier(password))
            )
        )


def ensure_service_role(conn: psycopg.Connection) -> None:
    """Create the retired shared role, which the first migrations still grant to."""
    ensure_role(conn, SERVICE_ROLE, login=False)


def apply_all(
    admin_url: str,
    role_passwords: Mapping[str, SecretStr] | None = None,
    services: Sequence[ServiceRegistration] | None = None,
) -> list[str]:
    """Apply every pending migration (of ``services``, default: the installed ones); return the
    ids applied now.

    Every login role is created first; ``role_passwords`` (role name → password) are set on
    those it names, and a role it does not name keeps the password it has (a new one has none,
    so it cannot log in until it is given one).
    """
    folders = migration_dirs(services)
    roles = login_roles(services)
    owners = stream_category_owners(services)
    passwords = role_passwords or {}
    applied: list[str] = []
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
        try:
            ensure_service_role(conn)
            for role in roles.values():
                ensure_role(conn, role, passwords.get(role))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS public.schema_migrations ("
                " id text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r[0] for r in conn.execute("SELECT id FROM public.schema_migrations")}
            for component, folder in folders:
                for f in sorted(folder.glob("*.sql")):
                    mid = f"{component}/{f.name}"
                    if mid in done:
                        continue
                    with conn.transaction():
                        conn.execute(f.read_text().encode())
                        conn.execute(
                            "INSERT INTO public.schema_migrations (id) VALUES (%s)", (mid,)
                        )
                    applied.append(mid)
            _sync_stream_categories(conn, owners)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))
    return applied


def _sync_stream_categories(conn: psycopg.Connection, owners: Mapping[str, str]) -> None:
    """Record who owns each category; categories of services not installed here are kept."""
    with conn.transaction():
        for category, role in sorted(owners.items()):
            conn.execute(
                "INSERT INTO eventstore.stream_categories (category, role_name) VALUES (%s, %s) "
                "ON CONFLICT (category) DO UPDATE SET role_name = EXCLUDED.role_name "
                "WHERE eventstore.stream_categories.role_name <> EXCLUDED.role_name",
                (category, role),
            )
