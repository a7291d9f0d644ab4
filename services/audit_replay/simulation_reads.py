"""The recorded decisions and step costs a policy simulation reads (``mc.rpc.audit.<method>``).

policy-admission runs simulations (``docs/policies.md``, "Simulation") and asks for:

* ``simulation_decisions``: ``since``, ``until`` (ISO 8601 with a zone; ``[since, until)``),
  ``agent_id?``, ``after?`` (the ``next`` of the previous page), ``limit?`` (<= 5,000) →
  ``{decisions, next}``: the tenant's decisions in time order (then by id), each with its
  ``decision_id, run_id, step_index, outcome, reasons, context, occurred_at``; ``next`` is
  ``null`` on the last page.
* ``step_costs``: ``run_ids`` (<= 1,000) → ``{runs: {run_id: [[step_index, cost_usd|null]]}}``,
  the recorded cost of every step of those runs (``null``: not priced).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson

from libs.errors import InvalidInput
from services.audit_replay.clickhouse import TENANT, Clickhouse, tenant_filter
from services.audit_replay.domain import iso
from services.audit_replay.domain.rows import parse_ts
from services.audit_replay.schema import DATABASE as DB

MAX_PAGE = 5000
MAX_RUNS = 1000
_CH_TS = "%Y-%m-%d %H:%M:%S.%f"


def _time(p: Mapping[str, Any], name: str) -> str:
    value = p.get(name)
    try:
        parsed = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        raise InvalidInput(f"{name} must be an ISO 8601 time with a time zone")
    return parsed.astimezone(UTC).strftime(_CH_TS)


def _after(p: Mapping[str, Any]) -> tuple[str, str] | None:
    after = p.get("after")
    if after is None:
        return None
    if (
        not isinstance(after, Mapping)
        or not isinstance(after.get("decision_id"), str)
        or not 0 < len(after["decision_id"]) <= 100
    ):
        raise InvalidInput("after must be the next of the previous page")
    return _time(after, "occurred_at"), after["decision_id"]


async def simulation_decisions(ch: Clickhouse, tenant: str, p: Mapping[str, Any]) -> dict[str, Any]:
    """One page of the tenant's recorded decisions in ``[since, until)``, oldest first."""
    since, until = _time(p, "since"), _time(p, "until")
    limit = p.get("limit", 1000)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_PAGE:
        raise InvalidInput(f"limit must be an integer between 1 and {MAX_PAGE}")
    params: dict[str, Any] = {"since": since, "until": until, "limit": limit}
    where = (
        f"{TENANT} AND occurred_at >= {{since:DateTime64(6, 'UTC')}} "
        "AND occurred_at < {until:DateTime64(6, 'UTC')}"
    )
    agent = p.get("agent_id")
    if agent is not None:
        if not isinstance(agent, str) or not 0 < len(agent) <= 300:
            raise InvalidInput("agent_id must be a non-empty string of at most 300 characters")
        where += " AND JSONExtractString(context, 'agent_id') = {agent:String}"
        params["agent"] = agent
    after = _after(p)
    if after is not None:
        where += (
            " AND (occurred_at, decision_id) > ({after_at:DateTime64(6, 'UTC')}, {after_id:String})"
        )
        params["after_at"], params["after_id"] = after
    rows = await ch.select(
        tenant_filter(tenant),
        "SELECT decision_id, run_id, step_index, outcome, reasons, context, occurred_at "
        f"FROM {DB}.decisions FINAL WHERE {where} "
        "ORDER BY occurred_at, decision_id LIMIT {limit:UInt32}",
        params,
    )
    decisions = [
        {
            "decision_id": r["decision_id"],
            "run_id": r["run_id"],
            "step_index": int(r["step_index"]),
            "outcome": r["outcome"],
            "reasons": orjson.loads(r["reasons"] or "[]"),
            "context": orjson.loads(r["context"] or "{}"),
            "occurred_at": iso(r["occurred_at"]),
        }
        for r in rows
    ]
    last = rows[-1] if len(rows) == limit else None
    next_page = (
        None
        if last is None
        else {"occurred_at": _iso_full(last["occurred_at"]), "decision_id": last["decision_id"]}
    )
    return {"decisions": decisions, "next": next_page}


def _iso_full(value: Any) -> str:
    ts = parse_ts(value)
    assert ts is not None
    return ts.astimezone(UTC).isoformat()


async def step_costs(ch: Clickhouse, tenant: str, p: Mapping[str, Any]) -> dict[str, Any]:
    """The recorded cost of every step of the runs named."""
    run_ids = p.get("run_ids")
    if (
        not isinstance(run_ids, list)
        or len(run_ids) > MAX_RUNS
        or not all(isinstance(r, str) and 0 < len(r) <= 300 for r in run_ids)
    ):
        raise InvalidInput(f"run_ids must be a list of at most {MAX_RUNS} run ids")
    runs: dict[str, list[list[Any]]] = {r: [] for r in run_ids}
    if not run_ids:
        return {"runs": runs}
    priced = "pricing_status = 'priced' AND total_cost_usd IS NOT NULL"
    rows = await ch.select(
        tenant_filter(tenant),
        f"SELECT run_id, step_index, toString(sumIf(total_cost_usd, {priced})) AS cost, "
        f"countIf({priced}) AS n_priced "
        f"FROM {DB}.costs FINAL WHERE {TENANT} AND run_id IN {{runs:Array(String)}} "
        "GROUP BY run_id, step_index ORDER BY run_id, step_index",
        {"runs": run_ids},
    )
    for r in rows:
        # A step none of whose costs could be priced has no cost: null, never zero.
        runs[r["run_id"]].append([int(r["step_index"]), r["cost"] if int(r["n_priced"]) else None])
    return {"runs": runs}
