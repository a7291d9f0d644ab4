"""The rows of the ClickHouse projection tables, one builder per table (no I/O).

:class:`RunRow` and :class:`IncidentRow` are entity states, written whole (an upsert keyed by
identity); the other tables get one row per event (:func:`event_row`, :func:`step_row`,
:func:`decision_row`, :func:`cost_row`, :func:`policy_rows`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson

from libs.contracts.envelope import EventEnvelope
from libs.contracts.events import (
    AdmissionDecided,
    CostRecorded,
    PolicyBundleActivated,
    StepRecorded,
)
from libs.observability import trace_id_of

Key = tuple[str, str]
"""(tenant_id, entity id)."""


@dataclass(frozen=True)
class RunRow:
    """The state of one run, exactly as a row of ``mc.runs``."""

    tenant_id: str
    run_id: str
    agent_id: str = ""
    status: str = "running"
    started_at: datetime | None = None
    ended_at: datetime | None = None
    stopped_at_step: int | None = None
    violation_policy_id: str | None = None
    violation_decision_id: str | None = None
    stop_reason: str | None = None
    last_step_index: int = 0
    version: int = 0
    stream_version: int = 0
    """Every event of the run's stream up to this version is folded in (0: not known)."""
    workflow_id: str | None = None
    """The workflow the run is a step attempt of (its ``workflow_id`` label), if any."""
    execution_id: str | None = None
    """The execution the run is a step attempt of (its ``execution_id`` label), if any."""
    step_id: str | None = None
    """The step of that execution (its ``step_id`` label), if any."""

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> RunRow:
        """A row read back from ClickHouse."""
        return cls(
            tenant_id=row["tenant_id"],
            run_id=row["run_id"],
            agent_id=row["agent_id"],
            status=row["status"],
            started_at=parse_ts(row["started_at"]),
            ended_at=parse_ts(row["ended_at"]),
            stopped_at_step=row["stopped_at_step"],
            violation_policy_id=row["violation_policy_id"],
            violation_decision_id=row["violation_decision_id"],
            stop_reason=row["stop_reason"],
            last_step_index=int(row["last_step_index"]),
            version=int(row["version"]),
            stream_version=int(row.get("stream_version") or 0),
            workflow_id=row.get("workflow_id"),
            execution_id=row.get("execution_id"),
            step_id=row.get("step_id"),
        )


@dataclass(frozen=True)
class IncidentRow:
    """The state of one incident, exactly as a row of ``mc.incidents``."""

    tenant_id: str
    incident_id: str
    violation_id: str = ""
    run_id: str = ""
    policy_id: str = ""
    step_index: int = 0
    severity: str = "medium"
    status: str = "open"
    title: str = ""
    trace_id: str | None = None
    opened_at: datetime | None = None
    acknowledged_at: datetime | None = None
    acknowledged_by: str | None = None
    resolved_at: datetime | None = None
    resolved_by: str | None = None
    resolution: str | None = None
    version: int = 0
    stream_version: int = 0
    """Every event of the incident's stream up to this version is folded in (0: not known)."""

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> IncidentRow:
        """A row read back from ClickHouse."""
        data = {k: row[k] for k in cls.__dataclass_fields__ if k in row}
        for k in ("opened_at", "acknowledged_at", "resolved_at"):
            data[k] = parse_ts(data.get(k))
        data["step_index"] = int(data["step_index"])
        data["version"] = int(data["version"])
        data["stream_version"] = int(data.get("stream_version") or 0)
        return cls(**data)


def parse_ts(value: Any) -> datetime | None:
    """A ClickHouse ``DateTime64`` text (UTC) or a datetime, as an aware datetime."""
    if value is None or isinstance(value, datetime):
        return value
    text = str(value).replace(" ", "T")
    dt = datetime.fromisoformat(text)
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def dumps(value: Any) -> str:
    """Compact JSON text for the String-typed JSON columns."""
    return orjson.dumps(value, default=json_default, option=orjson.OPT_SORT_KEYS).decode()


def json_default(value: Any) -> Any:
    """orjson fallback for the values rows hold that JSON has no type for."""
    if isinstance(value, Decimal):
        return format(value, "f")
    raise TypeError(f"cannot serialise {type(value).__name__}")


def event_row(env: EventEnvelope) -> dict[str, Any]:
    """The raw-log row of an envelope."""
    return {
        "position": env.position or 0,
        "event_id": str(env.event_id),
        "tenant_id": env.tenant_id,
        "stream_id": env.stream_id,
        "stream_version": env.stream_version,
        "event_type": env.event_type,
        "schema_version": env.schema_version,
        "occurred_at": env.occurred_at,
        "recorded_at": env.recorded_at,
        "correlation_id": env.correlation_id,
        "causation_id": env.causation_id,
        "actor": env.actor,
        "trace_id": trace_id_of(env.trace_context.traceparent),
        "payload": dumps(env.payload),
    }


def step_row(env: EventEnvelope, e: StepRecorded) -> dict[str, Any]:
    """The ``mc.steps`` row of a recorded step."""
    return {
        "tenant_id": env.tenant_id,
        "run_id": e.run_id,
        "step_index": e.step_index,
        "kind": e.kind,
        "model": e.model,
        "tool": e.tool,
        "status": e.status,
        "input_tokens": e.input_tokens,
        "output_tokens": e.output_tokens,
        "duration_ms": float(e.duration_ms),
        "input": dumps(e.input),
        "output": dumps(e.output),
        "error": e.error,
        "occurred_at": env.occurred_at,
        "event_id": str(env.event_id),
        "version": env.position or 0,
        "irregularities": list(e.irregularities),
    }


def decision_row(env: EventEnvelope, e: AdmissionDecided) -> dict[str, Any]:
    """The ``mc.decisions`` row of an admission decision."""
    return {
        "tenant_id": env.tenant_id,
        "decision_id": e.decision_id,
        "run_id": e.run_id,
        "step_index": e.step_index,
        "outcome": e.outcome,
        "policy_ids": [r.policy_id for r in e.reasons],
        "reasons": dumps([r.model_dump(mode="json") for r in e.reasons]),
        "bundle_digest": e.bundle_digest,
        "context": dumps(e.context),
        "occurred_at": env.occurred_at,
        "version": env.position or 0,
    }


def cost_row(env: EventEnvelope, e: CostRecorded) -> dict[str, Any]:
    """The ``mc.costs`` row of a recorded cost."""
    return {
        "tenant_id": env.tenant_id,
        "cost_id": e.cost_id,
        "run_id": e.run_id,
        "agent_id": e.agent_id,
        "step_index": e.step_index,
        "model": e.model,
        "input_tokens": e.input_tokens,
        "output_tokens": e.output_tokens,
        "pricing_status": e.pricing_status,
        "input_cost_usd": e.input_cost_usd,
        "output_cost_usd": e.output_cost_usd,
        "total_cost_usd": e.total_cost_usd,
        "price_table_version": e.price_table_version,
        "cached_input_tokens": e.cached_input_tokens,
        "cache_write_tokens": e.cache_write_tokens,
        "reasoning_tokens": e.reasoning_tokens,
        "cached_input_cost_usd": e.cached_input_cost_usd,
        "cache_write_cost_usd": e.cache_write_cost_usd,
        "reasoning_cost_usd": e.reasoning_cost_usd,
        "provider_cost_usd": e.provider_cost_usd,
        "cost_difference_usd": e.cost_difference_usd,
        "cost_mismatch": int(e.cost_mismatch),
        "occurred_at": env.occurred_at,
        "version": env.position or 0,
    }


def policy_rows(env: EventEnvelope, e: PolicyBundleActivated) -> list[dict[str, Any]]:
    """One ``mc.policies`` row per policy of an activated bundle."""
    return [
        {
            "tenant_id": env.tenant_id,
            "bundle_digest": e.bundle_digest,
            "policy_id": p.policy_id,
            "title": p.title,
            "severity": p.severity,
            "runbook_url": p.runbook_url,
            "description": p.description,
            "activated_at": env.occurred_at,
            "version": env.position or 0,
        }
        for p in e.policies
    ]
