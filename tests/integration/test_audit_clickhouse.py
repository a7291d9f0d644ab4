"""The one ClickHouse client, on its embedded (chDB) DSN: the path every test and default run uses."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from libs.errors import MissionControlError
from libs.settings import Settings
from services.audit_replay.clickhouse import Clickhouse, embedded_dsn, open_clickhouse

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
        rows = await ch.query(
            "SELECT * FROM t.r FINAL WHERE k IN {keys:Array(String)} ORDER BY k",
            {"keys": ["a", "b"]},
        )
        assert rows == [
            {"k": "a", "at": "2026-01-02 03:04:05.000000", "gone": None, "n": 3, "usd": None,
             "tags": []},
            {"k": "b", "at": "2026-01-02 03:04:05.678901", "gone": "x", "n": 2, "usd": None,
             "tags": ["p", "q"]},
        ]  # fmt: skip
        (priced,) = await ch.query(
            "SELECT toDecimal128('0.0000000001', 10) AS usd, {n:UInt64} AS n", {"n": 7}
        )
        assert priced == {"usd": "0.0000000001", "n": 7}
        with pytest.raises(MissionControlError, match="clickhouse query failed"):
            await ch.query("SELECT * FROM t.missing")
    finally:
        await ch.close()
