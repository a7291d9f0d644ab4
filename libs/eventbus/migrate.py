"""Versioned SQL migrations, applied in order and recorded in ``public.schema_migrations``.

Each component ships a folder of ``NNNN_name.sql`` files; the migration id is
``<component>/<file name>``. A migration runs in one transaction with its bookkeeping row, and an
advisory lock keeps two processes from migrating at once.
"""

from __future__ import annotations

from pathlib import Path

import psycopg
from psycopg import sql

SERVICE_ROLE = "mc_service"
_MIGRATION_LOCK = 7_231_001

ROOT = Path(__file__).resolve().parents[2]


def migration_dirs() -> list[tuple[str, Path]]:
    """(component, folder) of every migration folder, the event store first."""
    dirs = [("eventstore", Path(__file__).parent / "migrations")]
    services = ROOT / "services"
    for d in sorted(services.iterdir()) if services.exists() else []:
        m = d / "migrations"
        if m.is_dir():
            dirs.append((d.name, m))
    return dirs


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


def apply_all(admin_url: str, service_password: str | None = None) -> list[str]:
    """Apply every pending migration; return the ids applied now."""
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
            for component, folder in migration_dirs():
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
