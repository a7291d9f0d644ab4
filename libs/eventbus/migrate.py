"""Versioned SQL migrations, applied in order and recorded in ``public.schema_migrations``.

The event store ships a folder of ``NNNN_name.sql`` files, and so does every service that names
one in its registration (:mod:`libs.runtime.registry`); the migration id is
``<component>/<file name>``. The event store's come first, then the services' in component name
order. A migration runs in one transaction with its bookkeeping row, and an advisory lock keeps
two processes from migrating at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import psycopg
from psycopg import sql

from libs.runtime.registry import RegistrationError, ServiceRegistration, discover

SERVICE_ROLE = "mc_service"
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


def ensure_service_role(conn: psycopg.Connection, password: str | None = None) -> None:
    """Create the unprivileged role the services connect as (no-op when it exists)."""
    row = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (SERVICE_ROLE,)).fetchone()
    if row is None:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE").format(
                sql.Identifier(SERVICE_ROLE)
            )
        )
    if password:
        conn.execute(
            sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                sql.Identifier(SERVICE_ROLE), sql.Literal(password)
            )
        )


def apply_all(
    admin_url: str,
    service_password: str | None = None,
    services: Sequence[ServiceRegistration] | None = None,
) -> list[str]:
    """Apply every pending migration (of ``services``, default: the installed ones); return the
    ids applied now."""
    folders = migration_dirs(services)
    applied: list[str] = []
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
        try:
            ensure_service_role(conn, service_password)
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
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))
    return applied
