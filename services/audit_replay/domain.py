"""Pure projection and replay logic of the audit service (no I/O).

* :func:`evolve_run` / :func:`evolve_incident` fold one event into an entity's state. The projector
  and replay both use them, so a projection and a replay of the same events always agree.
* :func:`project` turns a batch of envelopes into rows per ClickHouse table, carrying run and
  incident fields forward from the state the caller passes in (rows are whole-row upserts). An
  event older than the state it would fold into, and not provably folded in already, is not
  dropped: ``project`` names its run or incident for a re-fold from the entity's whole stream
  (:func:`refold_run` / :func:`refold_incident`), which the caller reads from the event store.
* :func:`run_view`, :func:`inflection_point`, :func:`trace_steps` shape answers the same way
  whether the inputs come from ClickHouse rows or from a replay fold.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
import structlog

from libs.contracts.envelope import DomainEvent, EventEnvelope, stream_id_for
from libs.contracts.events import (
    AdmissionDecided,
    CostRecorded,
    IncidentAcknowledged,
    IncidentOpened,
    IncidentResolved,
    PolicyBundleActivated,
    RunCompleted,
    RunStarted,
    RunStoppedByPolicy,
    StepRecorded,
)
from libs.contracts.registry import decode
from libs.errors import MissionControlError
from libs.observability import trace_id_of

log = structlog.get_logger("audit.domain")

RUN_EVENTS = frozenset(
    {"run.started", "run.step_recorded", "run.completed", "run.stopped_by_policy"}
)
INCIDENT_EVENTS = frozenset({"incident.opened", "incident.acknowledged", "incident.resolved"})
USD_QUANTUM = Decimal("1e-10")

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


# --- the folds -----------------------------------------------------------------------------------


def run_stream(tenant_id: str, run_id: str) -> str:
    """The stream holding every event of a run's own history."""
    return stream_id_for(tenant_id, "run", run_id)


def incident_stream(tenant_id: str, incident_id: str) -> str:
    """The stream holding every event of an incident's history."""
    return stream_id_for(tenant_id, "incident", incident_id)


def _next_stream_version(folded: int, env: EventEnvelope, stream: str) -> int:
    """``folded`` moved on by ``env`` when it is the very next event of the entity's stream.

    An event after a gap (an earlier one not delivered yet) is folded but does not move it, so
    ``stream_version`` only ever claims a contiguous prefix of the stream.
    """
    if env.stream_id == stream and env.stream_version == folded + 1:
        return env.stream_version
    return folded


def _is_late(version: int, folded: int, env: EventEnvelope, stream: str) -> bool:
    """Whether ``env`` is older than the state but not provably folded into it.

    Proven folded: the event that set ``version`` itself, or an event of the entity's stream
    within the contiguous prefix ``folded`` covers. Anything else older than ``version`` was
    delivered late (a retried batch, an out-of-order relay publish) and was never applied.
    """
    pos = env.position or 0
    if pos >= version:
        return False
    return not (env.stream_id == stream and 0 < env.stream_version <= folded)


def run_event_is_late(row: RunRow | None, env: EventEnvelope) -> bool:
    """Whether a run event must be folded by re-folding the run's whole stream."""
    if row is None or env.event_type not in RUN_EVENTS:
        return False
    return _is_late(row.version, row.stream_version, env, run_stream(row.tenant_id, row.run_id))


def incident_event_is_late(row: IncidentRow | None, env: EventEnvelope) -> bool:
    """Whether an incident event must be folded by re-folding the incident's whole stream."""
    if row is None or env.event_type not in INCIDENT_EVENTS:
        return False
    stream = incident_stream(row.tenant_id, row.incident_id)
    return _is_late(row.version, row.stream_version, env, stream)


def evolve_run(row: RunRow | None, env: EventEnvelope, event: DomainEvent) -> RunRow | None:
    """Fold one event into a run's state; events at or before the state's position change nothing.

    The fold assumes position order. An older event that was never folded in is the caller's to
    detect (:func:`run_event_is_late`) and repair (:func:`refold_run`).
    """
    if env.event_type not in RUN_EVENTS:
        return row
    pos = env.position or 0
    if row is not None and pos <= row.version:
        return row  # a redelivery, or an event older than the state
    base = row or RunRow(tenant_id=env.tenant_id, run_id=getattr(event, "run_id", ""))
    folded = _next_stream_version(base.stream_version, env, run_stream(base.tenant_id, base.run_id))
    if isinstance(event, RunStarted):
        return replace(
            base,
            agent_id=event.agent_id,
            started_at=env.occurred_at,
            version=pos,
            stream_version=folded,
        )
    if isinstance(event, StepRecorded):
        return replace(
            base,
            agent_id=base.agent_id or event.agent_id,
            last_step_index=max(base.last_step_index, event.step_index),
            version=pos,
            stream_version=folded,
        )
    if isinstance(event, RunCompleted):
        return replace(
            base, status=event.status, ended_at=env.occurred_at, version=pos,
            stream_version=folded,
        )  # fmt: skip
    if isinstance(event, RunStoppedByPolicy):
        return replace(
            base,
            status="stopped_by_policy",
            ended_at=env.occurred_at,
            stopped_at_step=event.step_index,
            violation_policy_id=event.policy_id,
            violation_decision_id=event.decision_id,
            stop_reason=event.reason,
            version=pos,
            stream_version=folded,
        )
    return row


def evolve_incident(
    row: IncidentRow | None, env: EventEnvelope, event: DomainEvent
) -> IncidentRow | None:
    """Fold one event into an incident's state (same idempotency rule as :func:`evolve_run`)."""
    if env.event_type not in INCIDENT_EVENTS:
        return row
    pos = env.position or 0
    if row is not None and pos <= row.version:
        return row
    base = row or IncidentRow(
        tenant_id=env.tenant_id, incident_id=getattr(event, "incident_id", "")
    )
    base = replace(
        base,
        stream_version=_next_stream_version(
            base.stream_version, env, incident_stream(base.tenant_id, base.incident_id)
        ),
    )
    if isinstance(event, IncidentOpened):
        return replace(
            base,
            violation_id=event.violation_id,
            run_id=event.run_id,
            policy_id=event.policy_id,
            step_index=event.step_index,
            severity=event.severity,
            title=event.title,
            trace_id=event.trace_id,
            opened_at=env.occurred_at,
            version=pos,
        )
    if isinstance(event, IncidentAcknowledged):
        status = base.status if base.status == "resolved" else "acknowledged"
        return replace(
            base, status=status, acknowledged_at=env.occurred_at, acknowledged_by=event.by,
            version=pos,
        )  # fmt: skip
    if isinstance(event, IncidentResolved):
        return replace(
            base, status="resolved", resolved_at=env.occurred_at, resolved_by=event.by,
            resolution=event.resolution, version=pos,
        )  # fmt: skip
    return row


def refold_run(stream: Sequence[EventEnvelope]) -> RunRow | None:
    """A run's state folded afresh from its whole stream (every version from 1, as stored).

    The result covers the whole stream, so its ``stream_version`` is the stream's last version
    even when the stream holds events the fold does not read.
    """
    row: RunRow | None = None
    for env in sorted(stream, key=lambda e: e.position or 0):
        event = safe_decode(env)
        if event is not None:
            row = evolve_run(row, env, event)
    if row is not None:
        row = replace(row, stream_version=max(e.stream_version for e in stream))
    return row


def refold_incident(stream: Sequence[EventEnvelope]) -> IncidentRow | None:
    """An incident's state folded afresh from its whole stream (see :func:`refold_run`)."""
    row: IncidentRow | None = None
    for env in sorted(stream, key=lambda e: e.position or 0):
        event = safe_decode(env)
        if event is not None:
            row = evolve_incident(row, env, event)
    if row is not None:
        row = replace(row, stream_version=max(e.stream_version for e in stream))
    return row


# --- projection ---------------------------------------------------------------------------------


def safe_decode(env: EventEnvelope) -> DomainEvent | None:
    """The typed event, or ``None`` when it is of a type (or shape) this build cannot read.

    Such events are still stored raw in ``mc.events``; refusing them would block the projection
    behind one message this service does not need.
    """
    try:
        return decode(env)
    except MissionControlError as exc:
        log.warning(
            "audit.undecodable_event",
            event_id=str(env.event_id),
            event_type=env.event_type,
            error=str(exc)[:300],
        )
        return None


def run_key(env: EventEnvelope) -> Key | None:
    """The run a run event folds into (``None`` for other events)."""
    if env.event_type in RUN_EVENTS:
        run_id = env.payload.get("run_id")
        if isinstance(run_id, str):
            return (env.tenant_id, run_id)
    return None


def incident_key(env: EventEnvelope) -> Key | None:
    """The incident an incident event folds into (``None`` for other events)."""
    if env.event_type in INCIDENT_EVENTS:
        incident_id = env.payload.get("incident_id")
        if isinstance(incident_id, str):
            return (env.tenant_id, incident_id)
    return None


@dataclass
class Projection:
    """What :func:`project` produced for one batch."""

    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    runs: dict[Key, RunRow] = field(default_factory=dict)
    """Runs whose state changed, at their new state."""
    incidents: dict[Key, IncidentRow] = field(default_factory=dict)
    """Incidents whose state changed, at their new state."""
    refold_runs: set[Key] = field(default_factory=set)
    """Runs that received a late event: their state must be re-folded from their stream."""
    refold_incidents: set[Key] = field(default_factory=set)
    """Incidents that received a late event: their state must be re-folded from their stream."""
    last_position: int = 0
    last_recorded_at: datetime | None = None

    def count(self) -> int:
        """Rows in all tables."""
        return sum(len(v) for v in self.rows.values())

    def apply_refolds(
        self, runs: Mapping[Key, RunRow], incidents: Mapping[Key, IncidentRow]
    ) -> None:
        """Take the re-folded states of :attr:`refold_runs`/:attr:`refold_incidents`.

        They replace whatever the batch folded for those entities (a re-fold covers every event
        of the stream, the batch's included), and the ``runs``/``incidents`` rows follow.
        """
        self.runs.update(runs)
        self.incidents.update(incidents)
        self.refold_runs -= runs.keys()
        self.refold_incidents -= incidents.keys()
        self.rows["runs"] = [asdict(r) for r in self.runs.values()]
        self.rows["incidents"] = [asdict(i) for i in self.incidents.values()]


def dumps(value: Any) -> str:
    """Compact JSON text for the String-typed JSON columns."""
    return orjson.dumps(value, default=_json_default, option=orjson.OPT_SORT_KEYS).decode()


def _json_default(value: Any) -> Any:
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


def project(
    envs: Sequence[EventEnvelope],
    runs: Mapping[Key, RunRow],
    incidents: Mapping[Key, IncidentRow],
) -> Projection:
    """Rows per table for ``envs``, given the current state of the runs and incidents they touch.

    ``runs``/``incidents`` must hold the current state of every entity the batch folds into that
    already exists (the caller loads it); the result's ``runs``/``incidents`` hold the new states.
    A run or incident touched several times in the batch yields one row, at its final state.

    An event older than its entity's state and not provably folded in already is not folded
    (the fold assumes position order); the entity is named in ``refold_runs`` /
    ``refold_incidents`` instead, for the caller to re-fold from the event store and hand back
    through :meth:`Projection.apply_refolds`.
    """
    out = Projection(rows={t: [] for t in ("events", "steps", "decisions", "policies", "costs")})
    for env in envs:
        pos = env.position or 0
        out.rows["events"].append(event_row(env))
        if pos >= out.last_position:
            out.last_position = pos
            out.last_recorded_at = env.recorded_at
        event = safe_decode(env)
        if event is None:
            continue
        rk = run_key(env)
        if rk is not None:
            before = out.runs.get(rk) or runs.get(rk)
            if run_event_is_late(before, env):
                out.refold_runs.add(rk)
            else:
                after = evolve_run(before, env, event)
                if after is not None and after is not before:
                    out.runs[rk] = after
        ik = incident_key(env)
        if ik is not None:
            ibefore = out.incidents.get(ik) or incidents.get(ik)
            if incident_event_is_late(ibefore, env):
                out.refold_incidents.add(ik)
            else:
                iafter = evolve_incident(ibefore, env, event)
                if iafter is not None and iafter is not ibefore:
                    out.incidents[ik] = iafter
        if isinstance(event, StepRecorded):
            out.rows["steps"].append(step_row(env, event))
        elif isinstance(event, AdmissionDecided):
            out.rows["decisions"].append(decision_row(env, event))
        elif isinstance(event, CostRecorded):
            out.rows["costs"].append(cost_row(env, event))
        elif isinstance(event, PolicyBundleActivated):
            out.rows["policies"].extend(policy_rows(env, event))
    out.rows["runs"] = [asdict(r) for r in out.runs.values()]
    out.rows["incidents"] = [asdict(i) for i in out.incidents.values()]
    return out


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


# --- shaping answers (shared by ClickHouse queries and replay) ----------------------------------


def parse_ts(value: Any) -> datetime | None:
    """A ClickHouse ``DateTime64`` text (UTC) or a datetime, as an aware datetime."""
    if value is None or isinstance(value, datetime):
        return value
    text = str(value).replace(" ", "T")
    dt = datetime.fromisoformat(text)
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


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
        "output_cost_usd": usd(row["output_cost_usd"]),
        "total_cost_usd": usd(row["total_cost_usd"]),
        "price_table_version": row["price_table_version"],
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


# --- replay -------------------------------------------------------------------------------------


@dataclass
class ReplayState:
    """A run and everything attached to it, folded from the store's events."""

    run: RunRow | None = None
    steps: dict[int, dict[str, Any]] = field(default_factory=dict)
    decisions: dict[str, dict[str, Any]] = field(default_factory=dict)
    costs: dict[str, dict[str, Any]] = field(default_factory=dict)
    incidents: dict[str, IncidentRow] = field(default_factory=dict)
    events_applied: int = 0
    position: int = 0


def evolve_replay(state: ReplayState, env: EventEnvelope) -> ReplayState:
    """Fold one event of a run's history into ``state`` (the same folds as the projector)."""
    event = safe_decode(env)
    state.events_applied += 1
    state.position = max(state.position, env.position or 0)
    if event is None:
        return state
    state.run = evolve_run(state.run, env, event)
    if isinstance(event, StepRecorded):
        state.steps[event.step_index] = step_row(env, event)
    elif isinstance(event, AdmissionDecided):
        state.decisions[event.decision_id] = decision_row(env, event)
    elif isinstance(event, CostRecorded):
        state.costs[event.cost_id] = cost_row(env, event)
    elif env.event_type in INCIDENT_EVENTS:
        iid = getattr(event, "incident_id", "")
        folded = evolve_incident(state.incidents.get(iid), env, event)
        if folded is not None:
            state.incidents[iid] = folded
    return state


def replay_answer(state: ReplayState) -> dict[str, Any]:
    """The ``replay`` result: the run as the ``run`` query would show it, at that point."""
    inflection = inflection_point(state.run, state.decisions.values())
    if state.run is None:
        view: dict[str, Any] | None = None
    else:
        tokens, cost, unpriced = run_totals(state.steps.values(), state.costs.values())
        view = run_view(state.run, tokens_used=tokens, cost_usd=cost, unpriced_steps=unpriced)
        view["incident_ids"] = sorted(state.incidents)
    return {
        "state": view,
        "events_applied": state.events_applied,
        "inflection_point": inflection,
        "at_position": state.position,
    }


# --- export -------------------------------------------------------------------------------------

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
