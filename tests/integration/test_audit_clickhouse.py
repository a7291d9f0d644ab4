"""The ClickHouse client on its embedded (chDB) DSN, and the inbox that builds bulk rows."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from libs.contracts.envelope import EventEnvelope, TraceContext
from libs.errors import MissionControlError
from libs.eventbus.relay import message_for
from libs.settings import Settings
from services.audit_replay import schema
from services.audit_replay.clickhouse import Clickhouse, embedded_dsn, open_clickhouse
from services.audit_replay.domain import StepFacts, project
from services.audit_replay.handlers import inbox_item
from tests.unit.test_audit_domain import bundle_event, flow, stored

pytestmark = pytest.mark.integration


def test_without_a_server_url_the_projections_use_chdb_under_the_data_dir(tmp_path: Path) -> None:
    ch = open_clickhouse(Settings(MC_DATA_DIR=tmp_path))
    assert ch.embedded
    assert ch.dsn == f"chdb://{(tmp_path / 'clickhouse').resolve()}"
    server = open_clickhouse(Settings(MC_DATA_DIR=tmp_path, clickhouse_url="http://ch:8123/"))
    assert not server.embedded
    assert server.dsn == "http://ch:8123/"


async def test_rows_round_trip_as_json_ready_values(tmp_path: Path) -> None:
    ch = Clickhouse(embedded_dsn(tmp_path / "clickhouse"))
    try:
        await ch.command("CREATE DATABASE IF NOT EXISTS t")
        await ch.command(
            "CREATE TABLE t.r (k String, at DateTime64(6, 'UTC'), gone Nullable(String), "
            "n UInt64, usd Nullable(Decimal(38, 10)), tags Array(String)) "
            "ENGINE = ReplacingMergeTree(n) ORDER BY k"
        )
        at = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
        cols = ("k", "at", "gone", "n", "usd", "tags")
        await ch.insert(
            "t.r",
            cols,
            [
                {"k": "a", "at": at, "gone": None, "n": 1, "usd": Decimal("1E-10"), "tags": []},
                {"k": "b", "at": at, "gone": "x", "n": 2, "usd": None, "tags": ["p", "q"]},
            ],
        )
        await ch.insert_json("t.r", cols, b'{"k":"a","at":"2026-01-02T03:04:05Z","n":3}')
        rows = await ch.query_all_tenants(
            "SELECT * FROM t.r FINAL WHERE k IN {keys:Array(String)} ORDER BY k",
            {"keys": ["a", "b"]},
        )
        assert rows == [
            {"k": "a", "at": "2026-01-02 03:04:05.000000", "gone": None, "n": 3, "usd": None,
             "tags": []},
            {"k": "b", "at": "2026-01-02 03:04:05.678901", "gone": "x", "n": 2, "usd": None,
             "tags": ["p", "q"]},
        ]  # fmt: skip
        (priced,) = await ch.query_all_tenants(
            "SELECT toDecimal128('0.0000000001', 10) AS usd, {n:UInt64} AS n", {"n": 7}
        )
        assert priced == {"usd": "0.0000000001", "n": 7}
        with pytest.raises(MissionControlError, match="clickhouse query failed"):
            await ch.query_all_tenants("SELECT * FROM t.missing")
    finally:
        await ch.close()


def _comparable(row: dict[str, Any]) -> dict[str, Any]:
    """A row with its JSON text columns parsed (key order and spacing are not part of it)."""
    return {
        k: orjson.loads(v) if k in ("payload", "input", "output") else v for k, v in row.items()
    }


async def test_the_inbox_builds_the_same_rows_as_the_python_row_builders(tmp_path: Path) -> None:
    envs = stored([bundle_event(), *flow("acme", "r1")])
    # Give one step a traceparent, an input document and an error, so every column is exercised.
    step = next(i for i, e in enumerate(envs) if e.event_type == "run.step_recorded")
    payload = {**envs[step].payload, "input": {"b": [1, 2], "a": "x"}, "error": "it's bad"}
    envs[step] = envs[step].model_copy(
        update={
            "payload": payload,
            "trace_context": TraceContext(
                traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            ),
        }
    )
    ch = Clickhouse(embedded_dsn(tmp_path / "clickhouse"))
    try:
        await schema.migrate(ch)
        tables = {"events": "position", "steps": "version", "costs": "version"}

        async def rows() -> dict[str, list[dict[str, Any]]]:
            return {
                t: [
                    _comparable(r)
                    for r in await ch.query_all_tenants(f"SELECT * FROM mc.{t} ORDER BY {k}")
                ]
                for t, k in tables.items()
            }

        p = project(envs, {}, {})
        for table in tables:
            await ch.insert(f"mc.{table}", list(p.rows[table][0]), p.rows[table])
        by_python = await rows()
        for table in tables:
            await ch.command(f"TRUNCATE TABLE mc.{table}")
        bulk = [e for e in envs if e.event_type in schema.INBOX_EVENT_TYPES]
        items = [inbox_item(message_for(_store_row(e))[1]) for e in bulk]
        assert all(item is not None for item in items)
        body = b"\n".join(item.raw for item in items if item is not None)
        await ch.insert_json("mc.inbox", None, body, schema.INBOX_FORMAT_SETTINGS)
        by_inbox = await rows()
    finally:
        await ch.close()
    bulk_positions = {e.position for e in bulk}
    assert by_inbox["steps"] == by_python["steps"]
    assert by_inbox["costs"] == by_python["costs"]
    assert by_inbox["events"] == [r for r in by_python["events"] if r["position"] in bulk_positions]
    assert any(r["trace_id"] for r in by_inbox["events"])
    assert len(by_inbox["steps"]) == 2 and len(by_inbox["costs"]) == 2


def _store_row(env: EventEnvelope) -> dict[str, Any]:
    """An envelope as the relay reads it from ``eventstore.events``."""
    row = env.model_dump()
    row["trace_context"] = env.trace_context.model_dump()
    # The relay has PostgreSQL render the envelope as the message body; orjson writes the same
    # JSON for these types (UUIDs as strings, UTC timestamps with "+00:00").
    row["body"] = orjson.dumps(row).decode()
    return row


def test_only_known_bulk_envelopes_take_the_inbox() -> None:
    envs = stored(flow("acme", "r1"))
    step = next(e for e in envs if e.event_type == "run.step_recorded")
    item = inbox_item(message_for(_store_row(step))[1])
    assert item is not None
    assert item.raw == message_for(_store_row(step))[1]
    assert (item.position, item.recorded_at) == (step.position, step.recorded_at)
    assert item.step == StepFacts(
        "acme", "r1", "agent-1", step.payload["step_index"], step.position or 0,
        step.stream_id, step.stream_version,
    )  # fmt: skip
    cost = next(e for e in envs if e.event_type == "cost.recorded")
    cost_item = inbox_item(message_for(_store_row(cost))[1])
    assert cost_item is not None and cost_item.step is None
    decided = next(e for e in envs if e.event_type == "admission.decided")
    assert inbox_item(message_for(_store_row(decided))[1]) is None
    older = step.model_copy(update={"schema_version": 1})  # before irregularities: same rows
    assert inbox_item(message_for(_store_row(older))[1]) is not None
    newer = step.model_copy(update={"schema_version": 4})
    assert inbox_item(message_for(_store_row(newer))[1]) is None
    # A cost.recorded v1 has no component fields for the view: it takes the validating path.
    old_cost = cost.model_copy(update={"schema_version": 1})
    assert inbox_item(message_for(_store_row(old_cost))[1]) is None
    assert inbox_item(b"not json") is None
    assert inbox_item(b'{"event_type": "run.step_recorded", "schema_version": 1}') is None
