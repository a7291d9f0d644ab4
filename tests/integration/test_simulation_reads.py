"""What a policy simulation reads from audit-replay, on real (embedded) ClickHouse: decisions of
a window page by page in time order, one agent's, and the recorded cost of each step."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from libs.errors import InvalidInput
from services.audit_replay import schema
from services.audit_replay.clickhouse import Clickhouse, embedded_dsn
from services.audit_replay.simulation_reads import simulation_decisions, step_costs

T0 = datetime(2026, 11, 30, 12, 0, 0, tzinfo=UTC)
DB = schema.DATABASE


def _decision(tenant: str, n: int, at: datetime, agent: str) -> dict[str, Any]:
    return {
        "tenant_id": tenant,
        "decision_id": f"d-{n:02d}",
        "run_id": f"run-{n % 2}",
        "step_index": n,
        "outcome": "allow",
        "policy_ids": [],
        "reasons": "[]",
        "bundle_digest": "sha256:" + "0" * 64,
        "context": orjson.dumps({"agent_id": agent, "run_id": f"run-{n % 2}"}).decode(),
        "occurred_at": at,
        "version": n,
    }


def _cost(tenant: str, run_id: str, step: int, usd: str | None) -> dict[str, Any]:
    return {
        "tenant_id": tenant,
        "cost_id": f"{run_id}-{step}-{usd}",
        "run_id": run_id,
        "agent_id": "a",
        "step_index": step,
        "model": "gpt-4o",
        "input_tokens": 1,
        "output_tokens": 1,
        "pricing_status": "priced" if usd is not None else "unpriced",
        "input_cost_usd": None,
        "output_cost_usd": None,
        "total_cost_usd": usd,
        "price_table_version": "1",
        "occurred_at": T0,
        "version": 1,
    }


async def _read(tmp_path: Path) -> dict[str, Any]:
    ch = Clickhouse(embedded_dsn(tmp_path / "ch"))
    try:
        await schema.migrate(ch)
        # Six decisions of acme a second apart (two at the same microsecond), one of another
        # tenant in the window.
        rows = [
            _decision("acme", n, T0 + timedelta(seconds=min(n, 4)), "agent-a" if n % 3 else "b")
            for n in range(6)
        ]
        rows.append(_decision("other", 9, T0 + timedelta(seconds=1), "agent-a"))
        await ch.insert(f"{DB}.decisions", list(rows[0]), rows)
        costs = [
            _cost("acme", "run-1", 1, "0.5"),
            _cost("acme", "run-1", 2, "0.25"),
            _cost("acme", "run-1", 2, "0.125"),
            _cost("acme", "run-1", 3, None),
            _cost("other", "run-1", 4, "9"),
        ]
        await ch.insert(f"{DB}.costs", list(costs[0]), costs)
        window = {"since": T0.isoformat(), "until": (T0 + timedelta(seconds=4)).isoformat()}
        pages = []
        query: dict[str, Any] = {**window, "limit": 2}
        while True:
            page = await simulation_decisions(ch, "acme", query)
            pages.append([d["decision_id"] for d in page["decisions"]])
            if page["next"] is None:
                break
            query["after"] = page["next"]
        only_b = await simulation_decisions(ch, "acme", {**window, "agent_id": "b"})
        refused = []
        for bad in (
            {"since": "2026-11-30T12:00:00", "until": window["until"]},
            {**window, "limit": 0},
            {**window, "after": {"occurred_at": "x", "decision_id": "d"}},
        ):
            with pytest.raises(InvalidInput) as exc:
                await simulation_decisions(ch, "acme", bad)
            refused.append(str(exc.value))
        costed = await step_costs(ch, "acme", {"run_ids": ["run-1", "run-9"]})
        return {
            "pages": pages,
            "only_b": [d["decision_id"] for d in only_b["decisions"]],
            "refused": refused,
            "costs": costed["runs"],
        }
    finally:
        await ch.close()


def test_a_window_is_read_page_by_page_in_time_order_and_costs_step_by_step(
    tmp_path: Path,
) -> None:
    got = asyncio.run(_read(tmp_path))
    # [since, until): the decisions at until (d-04, d-05) are out; the other tenant's never in.
    assert got["pages"] == [["d-00", "d-01"], ["d-02", "d-03"], []]
    assert got["only_b"] == ["d-00", "d-03"]
    assert [r.split(" ")[0] for r in got["refused"]] == ["since", "limit", "occurred_at"]
    # Two costs of one step add up; a step none of whose costs was priced has none (not zero).
    steps = {i: c for i, c in got["costs"]["run-1"]}
    assert {i: None if c is None else Decimal(c) for i, c in steps.items()} == {
        1: Decimal("0.5"),
        2: Decimal("0.375"),
        3: None,
    }
    assert got["costs"]["run-9"] == []
