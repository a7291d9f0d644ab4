"""How answers are shaped, the same whether the inputs are ClickHouse rows or a replay fold.

:func:`run_view`, :func:`trace_steps` and :func:`inflection_point` are shared by the queries and
replay, so both answer a question about a run in exactly the same form.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict
from datetime import UTC
from decimal import Decimal
from typing import Any

import orjson

from services.audit_replay.domain.rows import IncidentRow, RunRow, parse_ts

USD_QUANTUM = Decimal("1e-10")


def iso(value: Any) -> str | None:
    """Times in answers: ISO 8601, UTC, microseconds, ``Z``."""
    dt = parse_ts(value)
    return None if dt is None else dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def usd(value: Any) -> str | None:
    """Money in answers: a decimal string with 10 places (``None`` stays ``None``)."""
    if value is None:
        return None
    return format(Decimal(str(value)).quantize(USD_QUANTUM), "f")


def run_view(
    run: RunRow, *, tokens_used: int, cost_usd: Any, unpriced_steps: int
) -> dict[str, Any]:
    """A run as the queries and replay answer it."""
    return {
        "run_id": run.run_id,
        "agent_id": run.agent_id,
        "status": run.status,
        "started_at": iso(run.started_at),
        "ended_at": iso(run.ended_at),
        "stopped_at_step": run.stopped_at_step,
        "violation_policy_id": run.violation_policy_id,
        "violation_decision_id": run.violation_decision_id,
        "stop_reason": run.stop_reason,
        "last_step_index": run.last_step_index,
        "version": run.version,
        "tokens_used": int(tokens_used),
        "cost_usd": usd(cost_usd),
        "unpriced_steps": int(unpriced_steps),
    }


def incident_view(row: IncidentRow) -> dict[str, Any]:
    """An incident as the queries answer it."""
    out = asdict(row)
    out.pop("tenant_id")
    out.pop("stream_version")  # bookkeeping of the projector, not part of the incident
    for k in ("opened_at", "acknowledged_at", "resolved_at"):
        out[k] = iso(out[k])
    return out


def decision_view(row: Mapping[str, Any]) -> dict[str, Any]:
    """A decision (ClickHouse row or :func:`decision_row` output) as answers show it."""
    reasons = row["reasons"]
    raw_context = row.get("context") or "{}"
    context = orjson.loads(raw_context) if isinstance(raw_context, str) else raw_context
    return {
        "decision_id": row["decision_id"],
        "step_index": int(row["step_index"]),
        "outcome": row["outcome"],
        "policy_ids": list(row["policy_ids"]),
        "reasons": orjson.loads(reasons) if isinstance(reasons, str) else reasons,
        "bundle_digest": row["bundle_digest"],
        "version": int(row["version"]),
        "asked": context.get("step"),
        "estimate": context.get("estimate"),
        "occurred_at": iso(row["occurred_at"]) if row.get("occurred_at") is not None else None,
    }


def cost_view(row: Mapping[str, Any]) -> dict[str, Any]:
    """A cost (ClickHouse row or :func:`cost_row` output) as answers show it."""
    return {
        "cost_id": row["cost_id"],
        "step_index": int(row["step_index"]),
        "model": row["model"],
        "pricing_status": row["pricing_status"],
        "input_cost_usd": usd(row["input_cost_usd"]),
        "cached_input_cost_usd": usd(row["cached_input_cost_usd"]),
        "cache_write_cost_usd": usd(row["cache_write_cost_usd"]),
        "output_cost_usd": usd(row["output_cost_usd"]),
        "reasoning_cost_usd": usd(row["reasoning_cost_usd"]),
        "total_cost_usd": usd(row["total_cost_usd"]),
        "price_table_version": row["price_table_version"],
        "provider_cost_usd": usd(row["provider_cost_usd"]),
        "cost_difference_usd": usd(row["cost_difference_usd"]),
        "cost_mismatch": bool(row["cost_mismatch"]),
    }


def step_view(row: Mapping[str, Any]) -> dict[str, Any]:
    """A recorded step (ClickHouse row or :func:`step_row` output) as answers show it."""
    return {
        "step_index": int(row["step_index"]),
        "kind": row["kind"],
        "model": row["model"],
        "tool": row["tool"],
        "status": row["status"],
        "input_tokens": int(row["input_tokens"]),
        "output_tokens": int(row["output_tokens"]),
        "duration_ms": float(row["duration_ms"]),
        "input": orjson.loads(row["input"]),
        "output": orjson.loads(row["output"]),
        "error": row["error"],
        "occurred_at": iso(row["occurred_at"]),
        "event_id": row["event_id"],
        # How the step broke the rules when it was recorded (empty: it did not).
        "irregularities": list(row.get("irregularities") or []),
    }


def inflection_point(
    run: RunRow | None, decisions: Iterable[Mapping[str, Any]]
) -> dict[str, Any] | None:
    """The step where the run went wrong: the denied step (``None`` when nothing was denied).

    The run's own record of why it was stopped wins; without one (the stop event not appended
    yet) the earliest deny decision stands in.
    """
    if run is not None and run.status == "stopped_by_policy" and run.stopped_at_step is not None:
        return {
            "step_index": run.stopped_at_step,
            "policy_id": run.violation_policy_id,
            "decision_id": run.violation_decision_id,
            "reason": run.stop_reason,
        }
    denies = sorted(
        (
            v
            for v in map(decision_view, decisions)
            if v["outcome"] == "deny" and not _only_run_state(v)
        ),
        key=lambda d: (d["step_index"], d["version"]),
    )
    if not denies:
        return None
    d = denies[0]
    first = d["reasons"][0] if d["reasons"] else {}
    return {
        "step_index": d["step_index"],
        "policy_id": first.get("policy_id"),
        "decision_id": d["decision_id"],
        "reason": first.get("message"),
    }


RUN_STATE_POLICY = "run_state"


def _only_run_state(view: Mapping[str, Any]) -> bool:
    """A refusal only because the run had already stopped or finished, not a verdict on the step."""
    reasons = view.get("reasons") or []
    return bool(reasons) and reasons[0].get("policy_id") == RUN_STATE_POLICY


def governing_decisions(decisions: Iterable[Mapping[str, Any]]) -> dict[int, dict[str, Any]]:
    """Per step, the decision that governed it: the latest one that judged the step itself.

    An admission asked after the run had stopped or finished is refused under ``run_state``;
    it is recorded, but it must not rewrite how an earlier step was judged, so it counts only
    for a step that has no other decision.
    """
    chosen: dict[int, dict[str, Any]] = {}
    for d in map(decision_view, decisions):
        cur = chosen.get(d["step_index"])
        if cur is None:
            chosen[d["step_index"]] = d
            continue
        rank = (not _only_run_state(d), d["version"])
        if rank > (not _only_run_state(cur), cur["version"]):
            chosen[d["step_index"]] = d
    return chosen


def trace_steps(
    steps: Iterable[Mapping[str, Any]],
    decisions: Iterable[Mapping[str, Any]],
    costs: Iterable[Mapping[str, Any]],
    inflection: Mapping[str, Any] | None,
) -> list[dict[str, Any]]:
    """Steps in order, each with its admission decision and cost.

    A denied step never ran, so it has no recorded row: it appears as a synthetic entry with
    status ``denied`` built from its decision.
    """
    latest_decision = governing_decisions(decisions)
    cost_by_step: dict[int, dict[str, Any]] = {}
    for c in costs:
        cur_c = cost_by_step.get(int(c["step_index"]))
        if cur_c is None or int(c["version"]) > int(cur_c["version"]):
            cost_by_step[int(c["step_index"])] = dict(c)
    entries: dict[int, dict[str, Any]] = {int(s["step_index"]): step_view(s) for s in steps}
    inflection_step = inflection["step_index"] if inflection else None
    denied = {idx for idx, d in latest_decision.items() if d["outcome"] == "deny"}
    if inflection_step is not None:
        denied.add(inflection_step)
    for idx in denied - entries.keys():
        entries[idx] = _denied_entry(idx, latest_decision.get(idx))
    out: list[dict[str, Any]] = []
    for idx in sorted(entries):
        entry = entries[idx]
        dec = latest_decision.get(idx)
        entry["decision"] = (
            None
            if dec is None
            else {k: dec[k] for k in ("decision_id", "outcome", "policy_ids", "reasons")}
        )
        cost = cost_by_step.get(idx)
        entry["cost"] = None if cost is None else cost_view(cost)
        entry["inflection"] = idx == inflection_step
        out.append(entry)
    return out


def _denied_entry(step_index: int, decision: Mapping[str, Any] | None) -> dict[str, Any]:
    """A step that never ran, shown with what it asked for (from its decision's context)."""
    asked = (decision or {}).get("asked") or {}
    return {
        "step_index": step_index,
        "kind": asked.get("kind"),
        "model": asked.get("model"),
        "tool": asked.get("tool"),
        "estimate": (decision or {}).get("estimate"),
        "status": "denied",
        "input_tokens": 0,
        "output_tokens": 0,
        "duration_ms": 0.0,
        "input": None,
        "output": None,
        "error": None,
        "occurred_at": (decision or {}).get("occurred_at"),
        "event_id": None,
        "irregularities": [],
    }


def run_totals(
    steps: Iterable[Mapping[str, Any]], costs: Iterable[Mapping[str, Any]]
) -> tuple[int, Decimal | None, int]:
    """(tokens used, summed priced cost or ``None`` when nothing is priced, unpriced steps)."""
    tokens = sum(int(s["input_tokens"]) + int(s["output_tokens"]) for s in steps)
    total: Decimal | None = None
    unpriced = 0
    for c in costs:
        if c["pricing_status"] == "priced" and c["total_cost_usd"] is not None:
            total = (total or Decimal(0)) + Decimal(str(c["total_cost_usd"]))
        else:
            unpriced += 1
    return tokens, total, unpriced


COST_TOKENS = (
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
)
"""The token counts a cost group sums (``libs.usage`` says what each counts)."""
COST_COMPONENTS = ("input", "cached_input", "cache_write", "output", "reasoning")
"""The cost components a cost group sums, each over its priced steps."""
_COUNTS = ("steps", "priced_steps", "unpriced_steps", "provider_reported_steps", "cost_mismatches")


def cost_summary(rows: Iterable[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The ``costs`` answer's groups and totals from the query's aggregated rows.

    A group's ``total_cost_usd`` and ``cost_components`` sum its priced steps only (``None``
    when none is priced); ``provider_cost_usd`` sums the provider's own figures where steps
    reported one (``None`` when none did); ``cost_mismatches`` counts the steps whose provider
    figure differed from ours beyond the tolerance.
    """
    groups: list[dict[str, Any]] = []
    totals: dict[str, Any] = dict.fromkeys((*_COUNTS, *COST_TOKENS), 0)
    total_usd: Decimal | None = None
    provider_usd: Decimal | None = None
    components: dict[str, Decimal] = dict.fromkeys(COST_COMPONENTS, Decimal(0))
    for r in rows:
        n, priced, reported = int(r["n_steps"]), int(r["n_priced"]), int(r["n_reported"])
        group: dict[str, Any] = {
            "key": r["group_key"],
            "steps": n,
            "priced_steps": priced,
            "unpriced_steps": n - priced,
            **{t: int(r[t]) for t in COST_TOKENS},
            "total_cost_usd": usd(r["priced_usd"]) if priced else None,
            "cost_components": {
                c: usd(r[f"{c}_usd"] or 0) if priced else None for c in COST_COMPONENTS
            },
            "provider_cost_usd": usd(r["provider_usd"]) if reported else None,
            "provider_reported_steps": reported,
            "cost_mismatches": int(r["n_mismatch"]),
        }
        groups.append(group)
        for k in (*_COUNTS, *COST_TOKENS):
            totals[k] += int(group[k])
        if priced:
            total_usd = (total_usd or Decimal(0)) + Decimal(str(r["priced_usd"]))
            for c in COST_COMPONENTS:
                components[c] += Decimal(str(r[f"{c}_usd"] or 0))
        if reported:
            provider_usd = (provider_usd or Decimal(0)) + Decimal(str(r["provider_usd"]))
    totals["total_cost_usd"] = usd(total_usd)
    totals["cost_components"] = {
        c: usd(v) if total_usd is not None else None for c, v in components.items()
    }
    totals["provider_cost_usd"] = usd(provider_usd)
    return groups, totals
