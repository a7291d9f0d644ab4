"""Every audit-replay read carries the one tenant filter.

Three holds: :func:`scoped_sql` refuses SQL that reads a table without the predicate; the source
of ``services/audit_replay`` runs no query but through ``select`` (and the two named reads that
return no tenant's rows); and at the driver, every query each read route sends names the tenant
predicate once per table and binds the caller's tenant only, on real chDB with two tenants' rows.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from services import audit_replay
from services.audit_replay import schema
from services.audit_replay.clickhouse import (
    TENANT,
    TENANT_PREDICATE,
    TENANT_SETTING,
    TENANTS_PARAM,
    Clickhouse,
    embedded_dsn,
    scoped_sql,
    tenant_filter,
)
from services.audit_replay.domain import project
from services.audit_replay.entrypoints import AuditQueries
from services.audit_replay.insights import ANALYTICS_VIEWS
from tests.unit.test_audit_domain import bundle_event, flow, stored

pytestmark = pytest.mark.integration

PACKAGE = Path(audit_replay.__file__).parent
# The reads that return no tenant's rows, by (file, function): nothing else may skip the filter.
ALL_TENANT_READS = {("handlers.py", "_load_positions"), ("schema.py", "migrate")}


# --- the one function ----------------------------------------------------------------------------


def test_the_filter_puts_one_predicate_per_table_and_binds_only_its_tenants() -> None:
    scope = tenant_filter("acme")
    sql = scoped_sql(scope, f"SELECT * FROM mc.runs FINAL WHERE {TENANT} AND run_id = 'r'")
    assert sql == f"SELECT * FROM mc.runs FINAL WHERE {TENANT_PREDICATE} AND run_id = 'r'"
    assert scope.params == {TENANTS_PARAM: ["acme"]}
    assert scope.settings == {TENANT_SETTING: "acme"}
    assert tenant_filter("b", "a", "b").tenants == ("a", "b")


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM mc.runs FINAL",  # no predicate at all
        f"SELECT * FROM mc.runs WHERE {TENANT} AND run_id IN (SELECT run_id FROM mc.steps)",
        "SELECT 1",
    ],
)
def test_sql_that_reads_a_table_without_the_predicate_is_refused(sql: str) -> None:
    with pytest.raises(ValueError, match="tenant predicate"):
        scoped_sql(tenant_filter("acme"), sql)


@pytest.mark.parametrize("bad", ["", "Acme", "a,b", "x' OR 1=1 --", "*"])
def test_a_filter_takes_tenant_ids_only(bad: str) -> None:
    with pytest.raises(ValueError):
        tenant_filter(bad)
    with pytest.raises(ValueError):
        tenant_filter()


async def test_a_caller_cannot_bind_the_filters_parameter_itself(tmp_path: Path) -> None:
    ch = Clickhouse(embedded_dsn(tmp_path / "ch"))
    try:
        with pytest.raises(ValueError, match=TENANTS_PARAM):
            await ch.select(
                tenant_filter("acme"),
                f"SELECT 1 FROM system.one WHERE {TENANT}",
                {TENANTS_PARAM: ["other"]},
            )
    finally:
        await ch.close()


def test_a_server_gets_a_row_policy_on_every_table_holding_tenant_rows() -> None:
    ddl = schema.row_policies()
    assert len(ddl) == len(schema.TENANT_TABLES)
    for table, statement in zip(schema.TENANT_TABLES, ddl, strict=True):
        assert f"ON {schema.DATABASE}.{table} " in statement
        assert f"getSetting('{TENANT_SETTING}')" in statement
        assert "FOR SELECT" in statement


# --- the source holds to it ----------------------------------------------------------------------


def _calls(name: str) -> Iterator[tuple[str, str]]:
    """(file, outermost enclosing function) of every call of a method ``name`` in the package."""
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for top in ast.walk(tree):
            if not isinstance(top, ast.ClassDef | ast.Module):
                continue
            for fn in top.body:
                if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                for node in ast.walk(fn):
                    if (
                        isinstance(node, ast.Call)
                        and isinstance(node.func, ast.Attribute)
                        and node.func.attr == name
                    ):
                        yield str(path.relative_to(PACKAGE)), fn.name


def test_no_read_skips_the_filter_but_the_named_ones() -> None:
    # The driver's own query() is called in one place: under select() and query_all_tenants().
    assert set(_calls("query")) == {("clickhouse.py", "_select")}
    assert set(_calls("query_all_tenants")) <= ALL_TENANT_READS
    selects = set(_calls("select"))
    assert ("entrypoints.py", "runs") in selects and ("handlers.py", "_load_state") in selects


# --- at the driver: every query the read routes send ---------------------------------------------


class Recording:
    """The clickhouse-connect client, recording every query sent through it."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def query(self, sql: str, parameters: Any = None, **kw: Any) -> Any:
        self.sent.append((sql, dict(parameters or {})))
        return self.client.query(sql, parameters=parameters, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


async def test_every_query_of_every_read_route_is_scoped_to_the_callers_tenant(
    tmp_path: Path,
) -> None:
    ch = Clickhouse(embedded_dsn(tmp_path / "ch"))
    try:
        await schema.migrate(ch)
        envs = stored([bundle_event(), *flow("acme", "r1"), *flow("other", "r2")])
        p = project(envs, {}, {})
        for table, rows in p.rows.items():
            if rows:
                await ch.insert(f"{schema.DATABASE}.{table}", list(rows[0]), rows)
        (incident_id,) = [
            r["incident_id"] for r in p.rows["incidents"] if r["tenant_id"] == "other"
        ]
        recording = Recording(ch._get())
        ch._client = recording
        queries = AuditQueries(ch, None, None, None)  # type: ignore[arg-type]  # reads only
        t = {"tenant_id": "acme"}
        answers = [
            await queries.runs(t),
            await queries.run({**t, "run_id": "r1"}),
            await queries.trace({**t, "run_id": "r1"}),
            await queries.export({**t, "run_id": "r1", "format": "json"}),
            await queries.incidents(t),
            await queries.policies(t),
            await queries.costs({**t, "group_by": "run"}),
            await queries.simulation_decisions(
                {**t, "since": "2000-01-01T00:00:00Z", "until": "2100-01-01T00:00:00Z"}
            ),
            await queries.step_costs({**t, "run_ids": ["r1"]}),
            await queries.search({**t, "workflow_id": "wf", "q": "budget"}),
            await queries.search(t),
            *[await queries.analytics({**t, "view": v, "days": 366}) for v in ANALYTICS_VIEWS],
            await queries.statements(t),
            await queries.statement({**t, "period": datetime.now(UTC).strftime("%Y-%m")}),
        ]
        # The other tenant's run and incident do not exist for acme.
        for method, params in (
            ("run", {"run_id": "r2"}),
            ("trace", {"run_id": "r2"}),
            ("incident", {"incident_id": incident_id}),
        ):
            with pytest.raises(Exception, match="not found"):
                await queries.routes()[method]({**t, **params})
    finally:
        await ch.close()

    assert len(recording.sent) >= 15
    for sql, params in recording.sent:
        assert sql.count(TENANT_PREDICATE) == sql.upper().count("FROM "), sql
        assert set(params[TENANTS_PARAM]) <= {"acme", "system"}, (sql, params)
    text = orjson.dumps(answers).decode()
    assert "r1" in text and "r2" not in text and "other" not in text
