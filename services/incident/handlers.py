"""Open incidents from policy violations; acknowledge and resolve them on request.

The incident stream ``<tenant>/incident/<incident_id>`` is the record; ``incident.incidents`` is
the service's own copy for listing, written in the same transaction as every append. Exactly one
incident per violation is guaranteed three times over: the consumer's applied-event record, the
first append's ``expected_version=0`` on a stream whose id is derived from the violation id, and
the table's ``UNIQUE (violation_id)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import structlog

from libs.contracts import envelope_for, stream_id_for
from libs.contracts.envelope import DomainEvent, EventEnvelope
from libs.contracts.events import PolicyViolationDetected
from libs.contracts.registry import decode
from libs.errors import ConcurrencyError, Conflict, NotFound, PermanentError
from libs.eventbus.db import AsyncConn, transaction
from libs.eventbus.rpc import RequestMeta
from libs.eventbus.store import EventStore
from libs.observability import trace_id_of
from services.incident.domain import (
    Acknowledge,
    Incident,
    OpenIncident,
    Resolve,
    decide,
    empty_incident,
    fold,
    incident_id_for,
)

log = structlog.get_logger("incident")

SERVICE_ACTOR = "service:incident"


class IncidentHandlers:
    """The violation consumer's handler and the acknowledge / resolve / get requests."""

    def __init__(self, store: EventStore, *, max_retries: int = 3) -> None:
        self.store = store
        self.max_retries = max_retries

    # --- the violation consumer ------------------------------------------------------------------

    async def on_violation(self, conn: AsyncConn, env: EventEnvelope) -> None:
        """Open the violation's incident, in the consumer's transaction (EventConsumer handler)."""
        violation = decode(env)
        if not isinstance(violation, PolicyViolationDetected):
            raise PermanentError(f"expected policy.violation_detected, got {env.event_type}")
        if violation.trace_id is None:
            violation = violation.model_copy(
                update={"trace_id": trace_id_of(env.trace_context.traceparent)}
            )
        tenant_id = env.tenant_id
        iid = incident_id_for(violation.violation_id)
        sid = stream_id_for(tenant_id, "incident", iid)
        state = empty_incident(tenant_id, iid)
        events = decide(state, OpenIncident(violation))
        envelopes = [
            envelope_for(
                e,
                tenant_id=tenant_id,
                stream_id=sid,
                correlation_id=env.correlation_id,
                causation_id=str(env.event_id),
                actor=SERVICE_ACTOR,
                trace_context=env.trace_context,
            )
            for e in events
        ]
        opened = _fold(state, events, envelopes)
        if not await _insert_row(conn, opened):
            log.info("incident.already_open", incident_id=iid, violation_id=violation.violation_id)
            return
        try:
            # A savepoint, so a version conflict leaves the consumer's transaction usable.
            async with conn.transaction():
                await self.store.append(sid, envelopes, expected_version=0, conn=conn)
        except ConcurrencyError:
            # The stream already exists: this violation's incident was opened before.
            log.info("incident.already_open", incident_id=iid, violation_id=violation.violation_id)
            return
        log.info(
            "incident.opened",
            incident_id=iid,
            run_id=violation.run_id,
            policy_id=violation.policy_id,
            severity=violation.severity,
        )

    # --- requests --------------------------------------------------------------------------------

    async def acknowledge(
        self, tenant_id: str, incident_id: str, by: str, meta: RequestMeta
    ) -> Incident:
        """Acknowledge an open incident (again on an acknowledged one is a no-op)."""
        return await self._execute(tenant_id, Acknowledge(incident_id, by), meta)

    async def resolve(
        self, tenant_id: str, incident_id: str, by: str, resolution: str, meta: RequestMeta
    ) -> Incident:
        """Resolve an open or acknowledged incident."""
        return await self._execute(tenant_id, Resolve(incident_id, by, resolution), meta)

    async def get(self, tenant_id: str, incident_id: str) -> Incident:
        """The incident as its stream tells it; :class:`NotFound` for another tenant's."""
        state = await self._load(tenant_id, incident_id)
        if not state.exists:
            raise NotFound(f"incident {incident_id} not found")
        return state

    # --- internals -------------------------------------------------------------------------------

    async def _load(
        self, tenant_id: str, incident_id: str, conn: AsyncConn | None = None
    ) -> Incident:
        # The stream id carries the tenant, so another tenant's incident reads as empty.
        sid = stream_id_for(tenant_id, "incident", incident_id)
        envs = await self.store.read_stream(sid, conn=conn)
        return fold(
            empty_incident(tenant_id, incident_id), [(decode(e), e.occurred_at) for e in envs]
        )

    async def _execute(
        self, tenant_id: str, cmd: Acknowledge | Resolve, meta: RequestMeta
    ) -> Incident:
        sid = stream_id_for(tenant_id, "incident", cmd.incident_id)
        for attempt in range(self.max_retries + 1):
            try:
                async with transaction(self.store.pool) as conn:
                    state = await self._load(tenant_id, cmd.incident_id, conn)
                    events = decide(state, cmd)
                    if not events:
                        return state
                    actor = meta.actor or f"user:{cmd.by.strip()}"
                    envelopes = [
                        envelope_for(
                            e,
                            tenant_id=tenant_id,
                            stream_id=sid,
                            correlation_id=meta.correlation_id,
                            actor=actor,
                            trace_context=meta.trace_context,
                        )
                        for e in events
                    ]
                    await self.store.append(
                        sid, envelopes, expected_version=state.version, conn=conn
                    )
                    new = _fold(state, events, envelopes)
                    await _update_row(conn, new)
                    return new
            except ConcurrencyError as exc:
                if attempt == self.max_retries:
                    raise Conflict(
                        f"incident {cmd.incident_id} kept changing concurrently; "
                        f"gave up after {attempt + 1} attempts"
                    ) from exc
        raise AssertionError("unreachable")  # pragma: no cover


def _fold(
    state: Incident, events: Sequence[DomainEvent], envelopes: Sequence[EventEnvelope]
) -> Incident:
    return fold(state, [(e, env.occurred_at) for e, env in zip(events, envelopes, strict=True)])


async def _insert_row(conn: AsyncConn, s: Incident) -> bool:
    """Insert the row of a newly opened incident; ``False`` when the violation already has one."""
    cur = await conn.execute(
        "INSERT INTO incident.incidents (incident_id, tenant_id, violation_id, run_id, agent_id, "
        "policy_id, step_index, severity, status, title, trace_id, opened_at, version) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
        (
            s.incident_id,
            s.tenant_id,
            s.violation_id,
            s.run_id,
            s.agent_id,
            s.policy_id,
            s.step_index,
            s.severity,
            s.status,
            s.title,
            s.trace_id,
            s.opened_at,
            s.version,
        ),
    )
    return cur.rowcount == 1


async def _update_row(conn: AsyncConn, s: Incident) -> None:
    """Carry the row forward to ``s`` (never backwards: guarded by version)."""
    await conn.execute(
        "UPDATE incident.incidents SET status = %s, acknowledged_by = %s, acknowledged_at = %s, "
        "resolved_by = %s, resolved_at = %s, resolution = %s, version = %s, updated_at = now() "
        "WHERE incident_id = %s AND tenant_id = %s AND version < %s",
        (
            s.status,
            s.acknowledged_by,
            s.acknowledged_at,
            s.resolved_by,
            s.resolved_at,
            s.resolution,
            s.version,
            s.incident_id,
            s.tenant_id,
            s.version,
        ),
    )
