"""The folds of runs and incidents, and how a late event is told from a redelivery (no I/O).

:func:`evolve_run` / :func:`evolve_incident` fold one event into an entity's state. The projector
and replay both use them, so a projection and a replay of the same events always agree. An event
older than the state it would fold into, and not provably folded in already, is *late*
(:func:`run_event_is_late`): the entity is re-folded from its whole stream
(:func:`refold_run` / :func:`refold_incident`), which the caller reads from the event store.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import NamedTuple

import structlog

from libs.contracts.envelope import DomainEvent, EventEnvelope, stream_id_for
from libs.contracts.events import (
    IncidentAcknowledged,
    IncidentOpened,
    IncidentResolved,
    RunCompleted,
    RunStarted,
    RunStoppedByPolicy,
    StepRecorded,
)
from libs.contracts.registry import decode
from libs.errors import MissionControlError
from services.audit_replay.domain.rows import IncidentRow, Key, RunRow

log = structlog.get_logger("audit.domain")

RUN_EVENTS = frozenset(
    {"run.started", "run.step_recorded", "run.completed", "run.stopped_by_policy"}
)
INCIDENT_EVENTS = frozenset({"incident.opened", "incident.acknowledged", "incident.resolved"})


def run_stream(tenant_id: str, run_id: str) -> str:
    """The stream holding every event of a run's own history."""
    return stream_id_for(tenant_id, "run", run_id)


def incident_stream(tenant_id: str, incident_id: str) -> str:
    """The stream holding every event of an incident's history."""
    return stream_id_for(tenant_id, "incident", incident_id)


def _next_stream_version(folded: int, stream_id: str, stream_version: int, stream: str) -> int:
    """``folded`` moved on by ``env`` when it is the very next event of the entity's stream.

    An event after a gap (an earlier one not delivered yet) is folded but does not move it, so
    ``stream_version`` only ever claims a contiguous prefix of the stream.
    """
    if stream_id == stream and stream_version == folded + 1:
        return stream_version
    return folded


def _is_late(
    version: int, folded: int, position: int, stream_id: str, stream_version: int, stream: str
) -> bool:
    """Whether ``env`` is older than the state but not provably folded into it.

    Proven folded: the event that set ``version`` itself, or an event of the entity's stream
    within the contiguous prefix ``folded`` covers. Anything else older than ``version`` was
    delivered late (a retried batch, an out-of-order relay publish) and was never applied.
    """
    if position >= version:
        return False
    return not (stream_id == stream and 0 < stream_version <= folded)


def run_event_is_late(row: RunRow | None, env: EventEnvelope) -> bool:
    """Whether a run event must be folded by re-folding the run's whole stream."""
    if row is None or env.event_type not in RUN_EVENTS:
        return False
    stream = run_stream(row.tenant_id, row.run_id)
    return _is_late(
        row.version, row.stream_version, env.position or 0, env.stream_id, env.stream_version,
        stream,
    )  # fmt: skip


def incident_event_is_late(row: IncidentRow | None, env: EventEnvelope) -> bool:
    """Whether an incident event must be folded by re-folding the incident's whole stream."""
    if row is None or env.event_type not in INCIDENT_EVENTS:
        return False
    stream = incident_stream(row.tenant_id, row.incident_id)
    return _is_late(
        row.version, row.stream_version, env.position or 0, env.stream_id, env.stream_version,
        stream,
    )  # fmt: skip


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
    stream = run_stream(base.tenant_id, base.run_id)
    folded = _next_stream_version(base.stream_version, env.stream_id, env.stream_version, stream)
    if isinstance(event, RunStarted):
        return replace(
            base,
            agent_id=event.agent_id,
            workflow_id=event.labels.get("workflow_id"),
            execution_id=event.labels.get("execution_id"),
            step_id=event.labels.get("step_id"),
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
            base.stream_version,
            env.stream_id,
            env.stream_version,
            incident_stream(base.tenant_id, base.incident_id),
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


class StepFacts(NamedTuple):
    """What the run fold reads from a ``run.step_recorded`` event (its envelope and payload)."""

    tenant_id: str
    run_id: str
    agent_id: str
    step_index: int
    position: int
    stream_id: str
    stream_version: int


def fold_steps(row: RunRow | None, steps: Sequence[StepFacts]) -> tuple[RunRow | None, bool]:
    """Recorded steps of one run, in position order, folded as :func:`evolve_run` folds them.

    Returns the new state and whether some step was late (:func:`run_event_is_late`): that step
    is not folded, and the run must be re-folded from its stream. The state is built once at
    the end instead of once per step: this is the fold of bulk step ingest.
    """
    if not steps:
        return row, False
    first = steps[0]
    base = row or RunRow(tenant_id=first.tenant_id, run_id=first.run_id)
    stream = run_stream(base.tenant_id, base.run_id)
    agent, last_step = base.agent_id, base.last_step_index
    version, folded = base.version, base.stream_version
    late = changed = False
    for s in steps:
        if (row is not None or changed) and _is_late(
            version, folded, s.position, s.stream_id, s.stream_version, stream
        ):
            late = True
            continue
        if (row is not None or changed) and s.position <= version:
            continue  # a redelivery
        agent = agent or s.agent_id
        last_step = max(last_step, s.step_index)
        version = s.position
        folded = _next_stream_version(folded, s.stream_id, s.stream_version, stream)
        changed = True
    if not changed:
        return row, late
    new = replace(
        base, agent_id=agent, last_step_index=last_step, version=version, stream_version=folded
    )
    return new, late


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
