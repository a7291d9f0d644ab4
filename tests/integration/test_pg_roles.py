"""Least-privilege PostgreSQL: SCRAM passwords, one role per service, row-level security.

Each test logs in as the roles the services use (passwords set the way ``mctl up`` sets them) and
proves one denial on the real embedded server.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import psycopg
import psycopg.errors
import pytest
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool
from pydantic import SecretStr

from libs.contracts import envelope_for, stream_id_for
from libs.contracts.events import StepRecorded
from libs.eventbus.db import open_pool, scope_to_tenant, transaction
from libs.eventbus.migrate import login_roles, stream_category_owners
from libs.eventbus.store import EventStore
from libs.runtime.embedded import (
    PG_ADMIN_USER,
    _demote,
    _make_traversable,
    _pg_bin,
    _pg_user,
    start_postgres,
)
from libs.runtime.pg_credentials import (
    load_passwords,
    new_password,
    scram_verifier,
    with_credentials,
)
from services.gateway.keys import provision_tenant, run_with_pool
from tests.conftest import System

pytestmark = pytest.mark.integration

# Every service's own tables (the services that have some): schema owner → tables.
SERVICE_TABLES = {
    "mc_gateway": ("gateway.tenants", "gateway.api_keys"),
    "mc_workflow_engine": ("workflow.applied_events",),
    "mc_incident": ("incident.incidents", "incident.applied_events"),
    "mc_cost": ("cost.applied_events",),
}
ROLES = sorted(set(login_roles().values()))
DENIED = (psycopg.errors.InsufficientPrivilege,)


EVENT_STORE_TAMPERING = [
    "UPDATE eventstore.events SET actor = 'x'",
    "DELETE FROM eventstore.events",
    "TRUNCATE eventstore.events",
    "ALTER TABLE eventstore.events DISABLE TRIGGER events_no_update",
    "ALTER TABLE eventstore.events DISABLE ROW LEVEL SECURITY",
    "DROP TRIGGER events_no_truncate ON eventstore.events",
    "SET session_replication_role = replica",
    "INSERT INTO eventstore.events (event_id, event_type, schema_version, tenant_id, "
    "stream_id, stream_version, occurred_at, correlation_id, actor, payload, prev_hash, "
    "hash) VALUES (gen_random_uuid(), 'x', 1, 't', 't/run/x', 1, now(), 'c', 'a', '{}', "
    "'\\x00', '\\x00')",
    "UPDATE eventstore.stream_categories SET role_name = current_user",
    "ALTER FUNCTION eventstore.append_events(jsonb) SECURITY INVOKER",
    "SELECT eventstore.hand_over_schema('eventstore', current_user)",
    "GRANT mc_eventstore_writer TO current_user",
]
TENANT_AND_KEY_WRITES = [
    "INSERT INTO gateway.tenants (tenant_id, name) VALUES ('evil', 'evil')",
    "INSERT INTO gateway.api_keys (key_id, tenant_id, secret_hash) VALUES ('k', 'evil', '\\x00')",
    "UPDATE gateway.api_keys SET revoked_at = NULL",
]


def _cases(roles: list[str], statements: list[str]) -> list[object]:
    return [pytest.param(r, st, id=f"{r}-{st[:48]}") for r in roles for st in statements]


class Roles:
    """Login URLs of the system's roles, with the passwords the fixture set on them."""

    def __init__(self, system: System, passwords: dict[str, SecretStr]) -> None:
        self.base = f"postgresql://127.0.0.1:{system.pg.port}/missioncontrol"
        self.passwords = passwords

    def url(self, role: str) -> str:
        return with_credentials(self.base, role, self.passwords[role])


@pytest.fixture(scope="module")
def roles(system: System) -> Roles:
    from libs.eventbus.migrate import apply_all

    passwords = {role: SecretStr(new_password()) for role in ROLES}
    apply_all(system.admin_url, passwords)
    return Roles(system, passwords)


def _event(tenant: str, stream_id: str, run: str = "r") -> object:
    return envelope_for(
        StepRecorded(run_id=run, agent_id="a", step_index=1),
        tenant_id=tenant,
        stream_id=stream_id,
        correlation_id="c",
        actor="test",
    )


# --- authentication ------------------------------------------------------------------------------


@pytest.mark.parametrize("role", [PG_ADMIN_USER, "mc_gateway", "mc_relay"])
def test_a_login_without_a_password_is_refused(system: System, role: str) -> None:
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(f"postgresql://{role}@127.0.0.1:{system.pg.port}/missioncontrol")
    # The socket in the data directory asks for the password too (no trust, no peer).
    socket_dir = system.data_dir / "postgres"
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(host=str(socket_dir), port=system.pg.port, user=role, dbname="postgres")


@pytest.mark.parametrize("role", [PG_ADMIN_USER, "mc_workflow_engine"])
def test_a_wrong_password_is_refused(system: System, roles: Roles, role: str) -> None:
    url = with_credentials(roles.base, role, SecretStr("not-" + new_password()))
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(url)


def test_every_rule_of_the_server_asks_for_a_scram_password(system: System) -> None:
    with psycopg.connect(system.admin_url) as conn:
        methods = {r[0] for r in conn.execute("SELECT auth_method FROM pg_hba_file_rules")}
        stored = conn.execute(
            "SELECT rolname FROM pg_authid WHERE rolpassword IS NOT NULL "
            "AND rolpassword NOT LIKE 'SCRAM-SHA-256$%'"
        ).fetchall()
    assert methods == {"scram-sha-256"}
    assert stored == []


def test_the_passwords_are_kept_private_in_the_data_directory(system: System) -> None:
    path = system.data_dir / "postgres-credentials.json"
    assert path.stat().st_mode & 0o777 == 0o600
    assert PG_ADMIN_USER in load_passwords(system.data_dir)


def test_a_cluster_made_with_trust_authentication_gets_a_password(tmp_path: Path) -> None:
    """A data directory from before passwords: the next start sets one and refuses trust."""
    pgdata = tmp_path / "postgres"
    pgdata.mkdir()
    user = _pg_user()
    if user is not None:
        _make_traversable(tmp_path)
        os.chown(pgdata, user.pw_uid, user.pw_gid)
    subprocess.run(
        [_pg_bin("initdb"), "-D", str(pgdata), "-U", PG_ADMIN_USER, "--auth=trust"],
        check=True,
        capture_output=True,
        preexec_fn=_demote(user),
    )
    pg = start_postgres(tmp_path)
    try:
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(pg.url)
        with psycopg.connect(pg.dsn()) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (PG_ADMIN_USER,)
    finally:
        pg.stop()


# --- the event store is append-only for every service role ---------------------------------------


@pytest.mark.parametrize(("role", "statement"), _cases(ROLES, EVENT_STORE_TAMPERING))
def test_no_service_role_can_rewrite_or_unlock_the_event_store(
    roles: Roles, role: str, statement: str
) -> None:
    _assert_refused(roles, role, statement)


def _assert_refused(roles: Roles, role: str, statement: str) -> None:
    with psycopg.connect(roles.url(role)) as conn, pytest.raises(DENIED):
        conn.execute(statement)


async def test_each_role_appends_only_to_the_stream_categories_it_owns(
    roles: Roles, unique: Callable[[str], str]
) -> None:
    """Every login role against every category: allowed exactly where the registrations say."""
    owners = stream_category_owners()
    tenant = unique("t")
    tried = refused = 0
    for role in ROLES:
        pool = await open_pool(roles.url(role), max_size=1)
        try:
            store = EventStore(pool)
            for category, owner in sorted(owners.items()):
                sid = stream_id_for(tenant, category, unique(role))
                tried += 1
                async with pool.connection() as conn:
                    try:
                        await store.append(sid, [_event(tenant, sid)], conn=conn)  # type: ignore[arg-type]
                        await conn.rollback()
                        allowed = True
                    except DENIED:
                        await conn.rollback()
                        allowed = False
                        refused += 1
                assert allowed == (role == owner), f"{role} appending to {category}"
        finally:
            await pool.close()
    assert tried == len(ROLES) * len(owners)
    assert refused == tried - len(owners)


async def test_the_workflow_engine_cannot_append_to_an_incident_stream(
    roles: Roles, unique: Callable[[str], str]
) -> None:
    tenant = unique("t")
    pool = await open_pool(roles.url("mc_workflow_engine"), max_size=1)
    try:
        store = EventStore(pool)
        incident = stream_id_for(tenant, "incident", unique("i"))
        async with pool.connection() as conn, conn.transaction():
            with pytest.raises(DENIED, match="row-level security"):
                await store.append(incident, [_event(tenant, incident)], conn=conn)  # type: ignore[arg-type]
            raise _Rollback
    except _Rollback:
        pass
    finally:
        await pool.close()
    # Its own category goes through.
    pool = await open_pool(roles.url("mc_workflow_engine"), max_size=1)
    try:
        run = stream_id_for(tenant, "run", unique("r"))
        out = await EventStore(pool).append(run, [_event(tenant, run)])  # type: ignore[list-item]
        assert out[0].stream_version == 1
    finally:
        await pool.close()


class _Rollback(Exception):
    pass


async def test_an_event_cannot_be_appended_under_another_tenants_stream(
    roles: Roles, unique: Callable[[str], str]
) -> None:
    mine, theirs = unique("a"), unique("b")
    pool = await open_pool(roles.url("mc_workflow_engine"), max_size=1)
    try:
        sid = stream_id_for(theirs, "run", unique("r"))
        async with pool.connection() as conn:
            with pytest.raises(DENIED, match="row-level security"):
                await EventStore(pool).append(sid, [_event(mine, sid)], conn=conn)  # type: ignore[arg-type]
            await conn.rollback()
    finally:
        await pool.close()


# --- tenants and keys are the gateway's ----------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "statement"),
    _cases([r for r in ROLES if r != "mc_gateway"], TENANT_AND_KEY_WRITES),
)
def test_only_the_gateway_role_writes_tenants_and_keys(
    roles: Roles, role: str, statement: str
) -> None:
    _assert_refused(roles, role, statement)


def test_the_gateway_role_creates_tenants_and_issues_keys(
    roles: Roles, unique: Callable[[str], str]
) -> None:
    tenant = unique("t")
    created, key = run_with_pool(
        roles.url("mc_gateway"), lambda pool: provision_tenant(pool, tenant, tenant)
    )
    assert created and key.startswith("mc_")


# --- no service reads another's tables -----------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_a_role_cannot_read_another_services_tables(roles: Roles, role: str) -> None:
    others = [t for owner, tables in SERVICE_TABLES.items() if owner != role for t in tables]
    assert others
    with psycopg.connect(roles.url(role), autocommit=True) as conn:
        for table in others:
            with pytest.raises(DENIED):
                conn.execute(f"SELECT 1 FROM {table} LIMIT 1")
        for table in SERVICE_TABLES.get(role, ()):
            conn.execute(f"SELECT 1 FROM {table} LIMIT 1")


@pytest.mark.parametrize("role", [r for r in ROLES if r != "mc_relay"])
def test_only_the_relay_moves_the_relay_checkpoint(roles: Roles, role: str) -> None:
    with psycopg.connect(roles.url(role)) as conn, pytest.raises(DENIED):
        conn.execute("UPDATE eventstore.relay_checkpoints SET position = 0")


def test_the_gateway_reads_no_events(roles: Roles) -> None:
    with psycopg.connect(roles.url("mc_gateway")) as conn, pytest.raises(DENIED):
        conn.execute("SELECT 1 FROM eventstore.events LIMIT 1")


# --- per-tenant reads ----------------------------------------------------------------------------


async def _seed(system: System, *tenants: str) -> None:
    pool = await open_pool(system.admin_url, max_size=1)
    try:
        for t in tenants:
            sid = stream_id_for(t, "run", "r")
            await EventStore(pool).append(sid, [_event(t, sid)])  # type: ignore[list-item]
    finally:
        await pool.close()


@pytest.mark.parametrize("role", ["mc_audit_replay", "mc_workflow_engine", "mc_relay"])
async def test_a_read_scoped_to_tenant_a_sees_no_row_of_tenant_b(
    system: System, roles: Roles, unique: Callable[[str], str], role: str
) -> None:
    a, b = unique("ta"), unique("tb")
    await _seed(system, a, b)
    pool = await open_pool(roles.url(role), max_size=1)
    try:
        async with transaction(pool) as conn:
            await scope_to_tenant(conn, a)
            # No tenant filter in the query: the scope alone keeps tenant b out.
            cur = await conn.execute(
                "SELECT DISTINCT tenant_id FROM eventstore.events WHERE tenant_id = ANY(%s)",
                ([a, b],),
            )
            assert [r["tenant_id"] for r in await cur.fetchall()] == [a]
            cur = await conn.execute(
                "SELECT count(*) AS n FROM eventstore.events WHERE tenant_id = %s", (b,)
            )
            assert (await cur.fetchone() or {})["n"] == 0
        # SET LOCAL ends with the transaction: unscoped, a reader of every tenant sees both.
        async with transaction(pool) as conn:
            cur = await conn.execute(
                "SELECT DISTINCT tenant_id FROM eventstore.events WHERE tenant_id = ANY(%s) "
                "ORDER BY 1",
                ([a, b],),
            )
            assert [r["tenant_id"] for r in await cur.fetchall()] == sorted([a, b])
    finally:
        await pool.close()


class _ScopeWatching(psycopg.AsyncConnection[Any]):
    """A connection that notes, after each read of the events, the tenant scope it ran under."""

    scopes: ClassVar[list[str]] = []

    async def execute(self, query: Any, params: Any = None, **kw: Any) -> Any:
        cur = await super().execute(query, params, **kw)
        if isinstance(query, str) and query.startswith("SELECT") and "eventstore.events" in query:
            scope = await super().execute("SELECT current_setting('mc.tenant_id', true)")
            row = await scope.fetchone()
            _ScopeWatching.scopes.append(next(iter(row.values())) or "" if row else "")
        return cur


async def test_the_stores_per_tenant_reads_run_scoped_to_their_tenant(
    system: System, roles: Roles, unique: Callable[[str], str]
) -> None:
    a, b = unique("ta"), unique("tb")
    await _seed(system, a, b)
    pool = AsyncConnectionPool(
        roles.url("mc_audit_replay"),
        connection_class=_ScopeWatching,
        kwargs={"row_factory": dict_row, "autocommit": False},
        min_size=1,
        max_size=1,
        open=False,
    )
    await pool.open(wait=True)
    try:
        store = EventStore(pool)
        _ScopeWatching.scopes.clear()
        got = await store.read_history(
            a, [stream_id_for(a, "run", "r"), stream_id_for(b, "run", "r")]
        )
        assert {e.tenant_id for e in got} == {a}
        page = await store.read_log(tenant_id=a, limit=100_000)
        assert {e.tenant_id for e in page.events} == {a}
        assert _ScopeWatching.scopes == [a, a]
        await store.read_log(limit=1)  # a read of every tenant (the relay's, a rebuild's) is not
        assert _ScopeWatching.scopes[-1] == ""
    finally:
        await pool.close()


def test_append_events_runs_as_its_owner_and_only_its_owner_inserts(system: System) -> None:
    """The only way into the events table is the function that chains and checks."""
    with psycopg.connect(system.admin_url) as conn:
        row = conn.execute(
            "SELECT p.prosecdef, pg_get_userbyid(p.proowner) FROM pg_proc p "
            "WHERE p.oid = 'eventstore.append_events(jsonb)'::regprocedure"
        ).fetchone()
        inserters = conn.execute(
            "SELECT rolname FROM pg_roles WHERE NOT rolsuper AND rolname LIKE 'mc\\_%%' "
            "AND has_table_privilege(oid, 'eventstore.events', 'INSERT') ORDER BY 1"
        ).fetchall()
    assert row == (True, "mc_eventstore_writer")
    assert inserters == [("mc_eventstore_writer",)]


def test_the_role_migrations_upgrade_a_database_made_by_the_earlier_ones(tmp_path: Path) -> None:
    """A store that already holds events and tenants, written as the shared role: the role
    migrations apply on top, and the services' roles then read and write what they own."""
    from libs.eventbus.migrate import apply_all, ensure_service_role, migration_dirs

    pg = start_postgres(tmp_path)
    shared = SecretStr(new_password())
    before = {"eventstore": "0003"}  # the first migration of each folder not yet applied
    try:
        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            ensure_service_role(conn)
            conn.execute(
                "CREATE TABLE public.schema_migrations ("
                " id text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            for component, folder in migration_dirs():
                for f in sorted(folder.glob("*.sql")):
                    if f.name >= before.get(component, "0002"):
                        continue
                    conn.execute(f.read_text().encode())
                    conn.execute(
                        "INSERT INTO public.schema_migrations VALUES (%s)",
                        (f"{component}/{f.name}",),
                    )
            conn.execute("INSERT INTO gateway.tenants (tenant_id, name) VALUES ('old', 'Old')")
            # The shared role could log in, with a password (MC_SERVICE_DB_PASSWORD as was).
            conn.execute(f"ALTER ROLE mc_service LOGIN PASSWORD '{scram_verifier(shared)}'")
        old = stream_id_for("old", "run", "r")

        async def append_old() -> None:
            pool = await open_pool(pg.dsn(), max_size=1)
            try:
                await EventStore(pool).append(old, [_event("old", old)])  # type: ignore[list-item]
            finally:
                await pool.close()

        import asyncio

        asyncio.run(append_old())
        passwords = {role: SecretStr(new_password()) for role in ROLES}
        applied = apply_all(pg.dsn(), passwords)
        # Everything the earlier database had not applied, in order: the roles first.
        assert applied == [
            f"{component}/{f.name}"
            for component, folder in migration_dirs()
            for f in sorted(folder.glob("*.sql"))
            if f.name >= before.get(component, "0002")
        ]
        assert applied[0] == "eventstore/0003_roles.sql"
        base = f"postgresql://127.0.0.1:{pg.port}/missioncontrol"
        with psycopg.connect(
            with_credentials(base, "mc_audit_replay", passwords["mc_audit_replay"])
        ) as c:
            assert c.execute(
                "SELECT count(*) FROM eventstore.events WHERE stream_id = %s", (old,)
            ).fetchone() == (1,)
        with psycopg.connect(with_credentials(base, "mc_gateway", passwords["mc_gateway"])) as c:
            assert c.execute(
                "SELECT name FROM gateway.tenants WHERE tenant_id = 'old'"
            ).fetchone() == ("Old",)
        with pytest.raises(psycopg.OperationalError, match="not permitted to log in"):
            psycopg.connect(with_credentials(base, "mc_service", shared))
        assert apply_all(pg.dsn(), passwords) == []  # and a second run finds nothing to do
    finally:
        pg.stop()


def test_mctl_migrate_sets_the_role_passwords_it_is_given(
    system: System, roles: Roles, tmp_path: Path
) -> None:
    """For an external server: one file per role (a mounted Secret) names each one's password."""
    from typer.testing import CliRunner

    from libs.runtime.cli import app

    password = new_password()
    secret = tmp_path / "db-roles"
    secret.mkdir()
    (secret / "mc_cost").write_text(password + "\n")
    result = CliRunner().invoke(
        app, ["migrate", "--database-url", system.admin_url, "--role-passwords", str(secret)]
    )
    assert result.exit_code == 0, result.output
    assert password not in result.output
    with psycopg.connect(with_credentials(roles.base, "mc_cost", SecretStr(password))) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("mc_cost",)
    roles.passwords["mc_cost"] = SecretStr(password)  # the module's other tests log in with it
