"""docs/clickhouse.md against the real schema: every table and column documented, every example
query run against chDB holding seeded events, and its answer checked."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from libs.contracts import envelope_for, stream_id_for
from libs.contracts.envelope import EventEnvelope
from libs.contracts.events import IncidentAcknowledged, IncidentResolved
from services.audit_replay import schema
from services.audit_replay.clickhouse import Clickhouse, embedded_dsn
from services.audit_replay.domain import project
from tests.unit.test_audit_domain import POLICY, bundle_event, flow, stored

pytestmark = pytest.mark.integration

DOC = Path(__file__).resolve().parents[2] / "docs" / "clickhouse.md"
DAY1 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
DAY2 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def _at(envs: list[EventEnvelope], start: datetime) -> list[EventEnvelope]:
    """``envs`` a second apart from ``start``."""
    return [
        e.model_copy(update={"occurred_at": start + timedelta(seconds=i)})
        for i, e in enumerate(envs)
    ]


def seeded() -> list[EventEnvelope]:
    """Two runs of agent-1 (days 1 and 2) and one of agent-2 (day 1), each stopped at step 3;
    r1's incident acknowledged a minute after it opened and resolved ten minutes after."""
    r1 = _at(flow("acme", "r1"), DAY1)
    opened = r1[-1].occurred_at
    incident = stream_id_for("acme", "incident", "r1-i1")

    def later(event: Any, seconds: int) -> EventEnvelope:
        env = envelope_for(
            event, tenant_id="acme", stream_id=incident, correlation_id="c", actor="user:ann"
        )
        return env.model_copy(update={"occurred_at": opened + timedelta(seconds=seconds)})

    return stored(
        [
            bundle_event(),
            *r1,
            *_at(flow("acme", "r2", agent="agent-2"), DAY1 + timedelta(hours=1)),
            later(IncidentAcknowledged(incident_id="r1-i1", by="user:ann"), 60),
            later(
                IncidentResolved(
                    incident_id="r1-i1", by="user:ann", resolution="Raised the budget"
                ),
                600,
            ),
            *_at(flow("acme", "r3"), DAY2),
            *flow("other", "r1"),
        ]
    )


@pytest.fixture
async def ch(tmp_path: Path) -> AsyncIterator[Clickhouse]:
    client = Clickhouse(embedded_dsn(tmp_path / "ch"))
    try:
        await schema.migrate(client)
        # As a rebuild does: the views come back with the tables, and migrating again is a no-op.
        await schema.drop_all(client)
        assert await schema.migrate(client) == [m.version for m in schema.MIGRATIONS]
        assert await schema.migrate(client) == []
        p = project(seeded(), {}, {})
        for table, rows in p.rows.items():
            if rows:
                await client.insert(f"{schema.DATABASE}.{table}", list(rows[0]), rows)
        yield client
    finally:
        await client.close()


EXPECTED: dict[str, list[dict[str, Any]]] = {
    "cost by model per day": [
        {"day": date(2026, 3, 1), "model": "gpt-4o", "calls": 2, "unpriced_calls": 0,
         "cost_usd": "0.0015000000"},
        {"day": date(2026, 3, 1), "model": "in-house-model", "calls": 2, "unpriced_calls": 2,
         "cost_usd": None},
        {"day": date(2026, 3, 2), "model": "gpt-4o", "calls": 1, "unpriced_calls": 0,
         "cost_usd": "0.0007500000"},
        {"day": date(2026, 3, 2), "model": "in-house-model", "calls": 1, "unpriced_calls": 1,
         "cost_usd": None},
    ],
    "denials by policy": [{"policy_id": POLICY, "denials": 3, "runs": 3}],
    "mttr": [{"severity": "high", "opened": 3, "closed": 1, "mean_seconds_to_resolve": 600.0}],
    "top agents by spend": [
        {"agent_id": "agent-1", "runs": 2, "calls": 4, "cost_usd": "0.0015000000"},
        {"agent_id": "agent-2", "runs": 1, "calls": 2, "cost_usd": "0.0007500000"},
    ],
    "stopped runs per day": [
        {"day": date(2026, 3, 1), "policy_id": POLICY, "runs": 2},
        {"day": date(2026, 3, 2), "policy_id": POLICY, "runs": 1},
    ],
    "full text": [
        {"event_type": "admission.decided", "events": 3},
        {"event_type": "incident.opened", "events": 3},
        {"event_type": "incident.resolved", "events": 1},
        {"event_type": "policy.violation_detected", "events": 3},
        {"event_type": "run.stopped_by_policy", "events": 3},
    ],
    "denial reasons": [
        {"run_id": r, "step_index": 3, "message": "token budget 500 exceeded"}
        for r in ("r1", "r2", "r3")
    ],
    "tokens per model": [
        {"model": "gpt-4o", "steps": 3, "tokens": 3 * 150},
        {"model": "in-house-model", "steps": 3, "tokens": 3 * 280},
    ],
}  # fmt: skip


def examples() -> dict[str, str]:
    """The docs' ```sql blocks, by the name in their first line (``-- name``)."""
    out: dict[str, str] = {}
    for block in re.findall(r"```sql\n(.*?)```", DOC.read_text(), re.DOTALL):
        first, _, _ = block.partition("\n")
        assert first.startswith("-- "), f"an example must start with '-- <name>': {block!r}"
        out[first[3:].strip()] = block
    return out


async def test_every_example_query_answers_what_the_seeded_log_says(ch: Clickhouse) -> None:
    found = examples()
    assert set(found) == set(EXPECTED)
    for name, sql in found.items():
        rows = await ch.query_all_tenants(sql)
        assert rows == EXPECTED[name], name


def documented() -> dict[str, dict[str, str]]:
    """Column → type of each table the docs describe (a ``### mc.<table>`` section)."""
    tables: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in DOC.read_text().splitlines():
        if m := re.fullmatch(r"### mc\.(\w+)", line):
            current = tables.setdefault(m.group(1), {})
        elif current is not None and (m := re.match(r"\| `(\w+)` \| ([^|]+) \|", line)):
            current[m.group(1)] = m.group(2).strip()
    return tables


async def test_every_table_and_column_is_documented_with_its_type(ch: Clickhouse) -> None:
    tables = await ch.query_all_tenants(
        "SELECT name, engine FROM system.tables WHERE database = 'mc' ORDER BY name"
    )
    columns = await ch.query_all_tenants(
        "SELECT table, name, type FROM system.columns WHERE database = 'mc'"
    )
    docs, text = documented(), DOC.read_text()
    views = {t["name"] for t in tables if t["engine"] == "MaterializedView"}
    for view in views:
        assert f"`mc.{view}`" in text, view
    real: dict[str, dict[str, str]] = {}
    for c in columns:
        if c["table"] not in views:
            real.setdefault(c["table"], {})[c["name"]] = c["type"].replace(", 'UTC'", "")
    assert set(docs) == set(real)
    for table, cols in real.items():
        assert docs[table] == cols, table
    assert set(schema.VIEWS) <= set(real)
