"""The console's analytics and the monthly usage statements, read from the ClickHouse projections.

* ``analytics``: ``view`` (one of :data:`ANALYTICS_VIEWS`), ``days?`` (1..366, 30 by default) →
  ``{view, days, columns, rows, truncated}``: a table over the last ``days`` days (UTC, today
  included), each row a list in ``columns`` order, at most :data:`MAX_ROWS` rows.
* ``statements`` → ``{statements: [{period, runs, tokens, cost_usd, unpriced_calls}]}``, one per
  month (``YYYY-MM``, UTC) with recorded costs, newest first, at most :data:`MAX_PERIODS`.
* ``statement``: ``period`` → ``{period, runs, tokens, total_usd, unpriced_calls, lines}``, the
  month's costs by agent and model: what to charge back to whom.

Money is a decimal string (:func:`~services.audit_replay.domain.views.usd`), ``null`` where
nothing was priced: a call the price table could not price is counted in ``unpriced_calls``,
never as zero cost. Every read names the tenant (:data:`~services.audit_replay.clickhouse.TENANT`)
and reads its tables with ``FINAL``, so a redelivered event is never counted twice.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from libs.errors import InvalidInput, NotFound
from services.audit_replay.clickhouse import TENANT, Clickhouse, tenant_filter
from services.audit_replay.domain.views import iso, usd
from services.audit_replay.schema import DATABASE as DB

MAX_DAYS = 366
DEFAULT_DAYS = 30
MAX_ROWS = 5000
"""The most rows an analytics answer holds (``truncated`` says when there were more)."""
MAX_PERIODS = 120
TOP_AGENTS = 20
"""``cost_by_agent_day`` shows this many agents, those that spent most over the window."""
OTHER_AGENTS = "(other agents)"
"""The series of ``cost_by_agent_day`` that sums every other agent."""
MAX_LINES = 5000
PERIOD_PATTERN = r"^\d{4}-(0[1-9]|1[0-2])$"
_PERIOD = re.compile(PERIOD_PATTERN)

# A cost counts as priced only when it carries an amount (as in the ``costs`` query).
_PRICED = "(pricing_status = 'priced' AND total_cost_usd IS NOT NULL)"
_SINCE = "{since:Date}"


def _since(days: int) -> str:
    """The first day of the window, an ISO date (UTC)."""
    today = datetime.now(UTC).date()
    return today.fromordinal(today.toordinal() - days + 1).isoformat()


# Each view: its columns and its SQL (``{since:Date}`` is the window's first day). Rows are
# ordered so a chart can draw them as they come: by day, then by the series' key.
_SQL: dict[str, tuple[tuple[str, ...], str]] = {
    # The analysts' view (schema migration 26): already by tenant, day and model.
    "cost_by_model_day": (
        ("day", "model", "cost_usd", "tokens"),
        "SELECT day, model, "
        "if(calls > unpriced_calls, cost_usd, NULL) AS cost_usd, "
        "input_tokens + output_tokens AS tokens "
        f"FROM {DB}.cost_by_model_day WHERE {TENANT} AND day >= {_SINCE} ORDER BY day, model",
    ),
    # The TOP_AGENTS agents that spent most over the window, each on its own, and the rest summed
    # as OTHER_AGENTS: a chart needs a few series, and one row per agent and day would be
    # thousands of rows (700 agents over 30 days: 14,000) that no chart can draw.
    "cost_by_agent_day": (
        ("day", "agent_id", "cost_usd", "tokens"),
        "SELECT day, series AS agent_id, cost_usd, tokens FROM ("
        f"SELECT tenant_id, toDate(occurred_at) AS day, if(agent_id IN ("
        f"SELECT agent_id FROM {DB}.costs FINAL WHERE {TENANT} "
        f"AND toDate(occurred_at) >= {_SINCE} GROUP BY agent_id "
        f"ORDER BY sumIf(total_cost_usd, {_PRICED}) DESC, "
        f"sum(input_tokens + output_tokens) DESC, agent_id LIMIT {TOP_AGENTS}"
        f"), agent_id, '{OTHER_AGENTS}') AS series, "
        f"if(countIf({_PRICED}) > 0, sumIf(total_cost_usd, {_PRICED}), NULL) AS cost_usd, "
        "sum(input_tokens + output_tokens) AS tokens "
        f"FROM {DB}.costs FINAL WHERE {TENANT} AND toDate(occurred_at) >= {_SINCE} "
        f"GROUP BY tenant_id, day, series) WHERE {TENANT} ORDER BY day, agent_id",
    ),
    # Like the analysts' denials_by_policy view (migration 27), but over the window only.
    "denials_by_policy": (
        ("policy_id", "denials", "last_at"),
        "SELECT policy_id, count() AS denials, max(occurred_at) AS last_at "
        f"FROM {DB}.decisions FINAL ARRAY JOIN policy_ids AS policy_id "
        f"WHERE {TENANT} AND outcome = 'deny' AND toDate(occurred_at) >= {_SINCE} "
        "GROUP BY policy_id ORDER BY denials DESC, policy_id",
    ),
    # Opened on the day it was opened, resolved on the day it was resolved.
    "incidents_by_day": (
        ("day", "severity", "opened", "resolved"),
        "SELECT day, severity, sum(o) AS opened, sum(r) AS resolved FROM ("
        "SELECT tenant_id, toDate(opened_at) AS day, severity, 1 AS o, 0 AS r "
        f"FROM {DB}.incidents FINAL WHERE {TENANT} AND toDate(opened_at) >= {_SINCE} "
        "UNION ALL SELECT tenant_id, toDate(assumeNotNull(resolved_at)) AS day, severity, "
        f"0 AS o, 1 AS r FROM {DB}.incidents FINAL WHERE {TENANT} "
        f"AND resolved_at IS NOT NULL AND toDate(assumeNotNull(resolved_at)) >= {_SINCE}"
        f") WHERE {TENANT} GROUP BY day, severity ORDER BY day, severity",
    ),
    "decisions_by_day": (
        ("day", "outcome", "decisions"),
        "SELECT toDate(occurred_at) AS day, outcome, count() AS decisions "
        f"FROM {DB}.decisions FINAL WHERE {TENANT} AND toDate(occurred_at) >= {_SINCE} "
        "GROUP BY day, outcome ORDER BY day, outcome",
    ),
}
_PRODUCTIVITY = (
    "agent_id",
    "runs",
    "completed",
    "stopped",
    "failed",
    "mean_duration_s",
    "tokens",
    "cost_usd",
)
ANALYTICS_VIEWS: tuple[str, ...] = (*_SQL, "productivity")
_USD_COLUMNS = frozenset({"cost_usd"})
_TIME_COLUMNS = frozenset({"last_at"})
_COUNT_COLUMNS = frozenset({"tokens", "denials", "opened", "resolved", "decisions"})


def _days(p: Mapping[str, Any]) -> int:
    v = p.get("days", DEFAULT_DAYS)
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_DAYS:
        raise InvalidInput(f"days must be an integer between 1 and {MAX_DAYS}")
    return v


def _cell(column: str, value: Any) -> Any:
    if column in _USD_COLUMNS:
        return usd(value)
    if column in _TIME_COLUMNS:
        return iso(value)
    if column in _COUNT_COLUMNS:
        return int(value)
    if column == "day":
        return str(value)[:10]
    return value


async def analytics(ch: Clickhouse, tenant: str, p: Mapping[str, Any]) -> dict[str, Any]:
    """One analytics view of the tenant over the last ``days`` days."""
    view = p.get("view")
    if view not in ANALYTICS_VIEWS:
        raise NotFound(
            f"unknown analytics view {view!r}: the views are {', '.join(ANALYTICS_VIEWS)}"
        )
    days = _days(p)
    params = {"since": _since(days), "limit": MAX_ROWS + 1}
    scope = tenant_filter(tenant)
    if view == "productivity":
        columns: tuple[str, ...] = _PRODUCTIVITY
        rows = await _productivity(ch, tenant, params)
    else:
        columns, sql = _SQL[view]
        found = await ch.select(scope, f"{sql} LIMIT {{limit:UInt32}}", params)
        rows = [[_cell(c, r[c]) for c in columns] for r in found]
    return {
        "view": view,
        "days": days,
        "columns": list(columns),
        "rows": rows[:MAX_ROWS],
        "truncated": len(rows) > MAX_ROWS,
    }


async def _productivity(ch: Clickhouse, tenant: str, params: dict[str, Any]) -> list[list[Any]]:
    """Per agent: the runs started in the window and how they ended, their mean duration (of
    the ended ones), and the tokens and cost recorded in the window."""
    scope = tenant_filter(tenant)
    runs = await ch.select(
        scope,
        "SELECT agent_id, count() AS runs, countIf(status = 'completed') AS completed, "
        "countIf(status = 'stopped_by_policy') AS stopped, countIf(status = 'failed') AS failed, "
        "avgIf(dateDiff('millisecond', assumeNotNull(started_at), assumeNotNull(ended_at)), "
        "started_at IS NOT NULL AND ended_at IS NOT NULL) AS mean_ms, "
        "countIf(started_at IS NOT NULL AND ended_at IS NOT NULL) AS ended "
        f"FROM {DB}.runs FINAL WHERE {TENANT} AND toDate(started_at) >= {_SINCE} "
        "GROUP BY agent_id ORDER BY runs DESC, agent_id LIMIT {limit:UInt32}",
        params,
    )
    costs = await ch.select(
        scope,
        "SELECT agent_id, sum(input_tokens + output_tokens) AS tokens, "
        f"if(countIf({_PRICED}) > 0, sumIf(total_cost_usd, {_PRICED}), NULL) AS cost_usd "
        f"FROM {DB}.costs FINAL WHERE {TENANT} AND toDate(occurred_at) >= {_SINCE} "
        "GROUP BY agent_id",
        params,
    )
    by_agent = {c["agent_id"]: c for c in costs}
    out: list[list[Any]] = []
    for r in runs:
        c = by_agent.get(r["agent_id"], {})
        mean = round(float(r["mean_ms"]) / 1000, 3) if int(r["ended"]) else None
        out.append(
            [
                r["agent_id"],
                int(r["runs"]),
                int(r["completed"]),
                int(r["stopped"]),
                int(r["failed"]),
                mean,
                int(c.get("tokens", 0)),
                usd(c.get("cost_usd")),
            ]
        )
    return out


# --- statements ---------------------------------------------------------------------------------

_STATEMENT_SUMS = (
    "uniqExact(run_id) AS runs, sum(input_tokens + output_tokens) AS tokens, "
    f"if(countIf({_PRICED}) > 0, sumIf(total_cost_usd, {_PRICED}), NULL) AS cost_usd, "
    f"countIf(NOT {_PRICED}) AS unpriced_calls"
)


def _sums(r: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "runs": int(r["runs"]),
        "tokens": int(r["tokens"]),
        "cost_usd": usd(r["cost_usd"]),
        "unpriced_calls": int(r["unpriced_calls"]),
    }


async def statements(ch: Clickhouse, tenant: str) -> dict[str, Any]:
    """The tenant's months with recorded costs, newest first, each with its totals."""
    rows = await ch.select(
        tenant_filter(tenant),
        f"SELECT formatDateTime(occurred_at, '%Y-%m') AS period, {_STATEMENT_SUMS} "
        f"FROM {DB}.costs FINAL WHERE {TENANT} GROUP BY period ORDER BY period DESC "
        "LIMIT {limit:UInt32}",
        {"limit": MAX_PERIODS},
    )
    return {"statements": [{"period": r["period"], **_sums(r)} for r in rows]}


def parse_period(value: Any) -> tuple[str, str, str]:
    """``YYYY-MM`` → (the period, its first instant, the next month's), or :class:`InvalidInput`."""
    if not isinstance(value, str) or not _PERIOD.fullmatch(value):
        raise InvalidInput("period must be a month as YYYY-MM (e.g. 2026-01)")
    year, month = int(value[:4]), int(value[5:])
    nxt = (year + 1, 1) if month == 12 else (year, month + 1)
    return value, f"{year:04d}-{month:02d}-01 00:00:00", f"{nxt[0]:04d}-{nxt[1]:02d}-01 00:00:00"


async def statement(ch: Clickhouse, tenant: str, p: Mapping[str, Any]) -> dict[str, Any]:
    """One month's usage and chargeback: its costs by agent and model, and the totals."""
    period, start, end = parse_period(p.get("period"))
    params = {"start": start, "end": end, "limit": MAX_LINES + 1}
    rows = await ch.select(
        tenant_filter(tenant),
        f"SELECT agent_id, ifNull(model, '') AS model, {_STATEMENT_SUMS} "
        f"FROM {DB}.costs FINAL WHERE {TENANT} "
        "AND occurred_at >= toDateTime64({start:String}, 6, 'UTC') "
        "AND occurred_at < toDateTime64({end:String}, 6, 'UTC') "
        "GROUP BY agent_id, model ORDER BY agent_id, model LIMIT {limit:UInt32}",
        params,
    )
    lines = [{"agent_id": r["agent_id"], "model": r["model"] or None, **_sums(r)} for r in rows]
    priced = [line["cost_usd"] for line in lines if line["cost_usd"] is not None]
    total = usd(sum((Decimal(str(v)) for v in priced), Decimal(0))) if priced else None
    return {
        "period": period,
        "runs": await _period_runs(ch, tenant, params),
        "tokens": sum(int(line["tokens"]) for line in lines),
        "total_usd": total,
        "unpriced_calls": sum(int(line["unpriced_calls"]) for line in lines),
        "lines": lines[:MAX_LINES],
        "truncated": len(lines) > MAX_LINES,
    }


async def _period_runs(ch: Clickhouse, tenant: str, params: dict[str, Any]) -> int:
    """The distinct runs with a cost in the period (a run may span agents' lines once each)."""
    (row,) = await ch.select(
        tenant_filter(tenant),
        f"SELECT uniqExact(run_id) AS runs FROM {DB}.costs FINAL WHERE {TENANT} "
        "AND occurred_at >= toDateTime64({start:String}, 6, 'UTC') "
        "AND occurred_at < toDateTime64({end:String}, 6, 'UTC')",
        params,
    )
    return int(row["runs"])
