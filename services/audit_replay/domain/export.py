"""A run's trace as CSV (one row per step)."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from typing import Any

CSV_COLUMNS = (
    "step_index",
    "status",
    "kind",
    "model",
    "tool",
    "input_tokens",
    "output_tokens",
    "duration_ms",
    "outcome",
    "policy_ids",
    "pricing_status",
    "total_cost_usd",
    "error",
    "occurred_at",
    "inflection",
)


def trace_csv(trace: Mapping[str, Any]) -> str:
    """One row per step of a trace, with a header."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for s in trace["steps"]:
        d = s.get("decision") or {}
        c = s.get("cost") or {}
        w.writerow(
            [
                s["step_index"],
                s["status"],
                s["kind"] or "",
                s["model"] or "",
                s["tool"] or "",
                s["input_tokens"],
                s["output_tokens"],
                s["duration_ms"],
                d.get("outcome", ""),
                ";".join(d.get("policy_ids", [])),
                c.get("pricing_status", ""),
                c.get("total_cost_usd") or "",
                s["error"] or "",
                s["occurred_at"] or "",
                "true" if s["inflection"] else "false",
            ]
        )
    return buf.getvalue()
