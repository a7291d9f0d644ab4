"""Open incidents from policy violations and exhausted budgets; acknowledge and resolve them.

The incident stream ``<tenant>/incident/<incident_id>`` is the record; ``incident.incidents`` is
the service's own copy for listing, written in the same transaction as every append. Exactly one
incident per violation is guaranteed three times over: the consumer's applied-event record, the
first append's ``expected_version=0`` on a stream whose id is derived from the violation id, and
the table's ``UNIQUE (violation_id)``. A budget whose window reached 100 % of its cap opens one
incident per budget and window the same way (its ``violation_id`` is ``budget:<id>:<window>``).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Protocol

import structlog

from libs.contracts.envelope import EventEnvelope
from libs.contracts.events import BudgetThresholdCrossed, PolicyViolationDetected
from libs.contracts.limits import user_actor
from libs.contracts.registry import decode
from libs.errors import Conflict, NotFound, PermanentError
from libs.eventbus.db import AsyncConn
from libs.eventbus.repository import Aggregate, EventMeta, Recorded, Repository, Store, begin
from libs.eventbus.rpc import RequestMeta
from libs.eventbus.store import EventStore
from libs.eventbus.uow import UnitOfWork, join
from libs.observability import trace_id_of
from services.incident.domain import (
    Acknowledge,
    Incident,
    OpenBudgetIncident,
    OpenIncident,
    Resolve,
    decide,
    empty_incident,
    fold,
    incident_id_for,
)

log = structlog.get_logger("incident")

SERVICE_ACTOR = "service:incident"


def _fold(state: Incident, recorded: Sequence[Recorded]) -> Incident:
    return fold(state, [(r.event, r.envelope.occurred_at) for r in recorded])


INCIDENT = Aggregate[Incident](category="incident", initial=empty_incident, fold=_fold)
"""The incident aggregate: ``<tenant>/incident/<incident_id>``."""


class IncidentTable(Protocol):
    """The service's own listing copy of its incidents, written in the append's transaction."""

    async def insert(self, uow: UnitOfWork, incident: Incident) -> bool:
        """Insert a newly opened incident; ``False`` when its violation already has one."""

    async def update(self, uow: UnitOfWork, incident: Incident) -> None:
        """Carry the incident's row forward to ``incident`` (never backwards)."""


class PgIncidentTable:
    """``incident.incidents`` on the unit of work's PostgreSQL connection."""

    async def insert(self, uow: UnitOfWork, incident: Incident) -> bool:
        """See :class:`IncidentTable`."""
        return await _insert_row(_conn(uow), incident)

    async def update(self, uow: UnitOfWork, incident: Incident) -> None:
        """See :class:`IncidentTable`."""
        await _update_row(_conn(uow), incident)


def _conn(uow: UnitOfWork) -> AsyncConn:
    if uow.conn is None:  # pragma: no cover - wiring error
        raise TypeError("incident.incidents needs a PostgreSQL unit of work")
    return uow.conn


class IncidentHandlers:
    """The violation consumer's handler and the acknowledge / resolve / get requests."""

    def __init__(
        self, store: Store, *, table: IncidentTable | None = None, max_retries: int = 3
    ) -> None:
        self.store = store
        self.table: IncidentTable = table or PgIncidentTable()
        self.incidents = Repository(store, INCIDENT, max_retries=max_retries)

    # --- the violation consumer ------------------------------------------------------------------

    async def on_violation(self, conn: AsyncConn, env: EventEnvelope) -> None:
        """``EventConsumer`` handler: open the incident in the consumer's transaction."""
        if not isinstance(self.store, EventStore):  # pragma: no cover - wiring error
            raise TypeError("the violation consumer needs the PostgreSQL event store")
        await self.open_for_violation(join(self.store, conn), env)

    async def open_for_violation(self, uow: UnitOfWork, env: EventEnvelope) -> None:
        """Open the violation's incident in ``uow``, unless it is open already."""
        violation = decode(env)
        if not isinstance(violation, PolicyViolationDetected):
            raise PermanentError(f"expected policy.violation_detected, got {env.event_type}")
        if violation.enforcement != "enforce":
            log.info(
                "incident.violation_warned",
                run_id=violation.run_id,
                policy_id=violation.policy_id,
                step_index=violation.step_index,
            )
            return
        if violation.trace_id is None:
            violation = violation.model_copy(
                update={"trace_id": trace_id_of(env.trace_context.traceparent)}
            )
        opened = await self._open(uow, env, OpenIncident(violation))
        if opened is None:
            log.info(
                "incident.already_open",
                incident_id=incident_id_for(violation.violation_id),
                violation_id=violation.violation_id,
            )
            return
        log.info(
            "incident.opened",
            incident_id=opened.incident_id,
            run_id=violation.run_id,
            policy_id=violation.policy_id,
            severity=violation.severity,
        )

    async def on_budget_alert(self, conn: AsyncConn, env: EventEnvelope) -> None:
        """``EventConsumer`` handler: a budget reached 100 % of its cap in a window."""
        if not isinstance(self.store, EventStore):  # pragma: no cover - wiring error
            raise TypeError("the budget consumer needs the PostgreSQL event store")
        alert = decode(env)
        if not isinstance(alert, BudgetThresholdCrossed):
            raise PermanentError(f"expected budget.threshold_crossed, got {env.event_type}")
        if alert.threshold_pct < 100:
            return
        opened = await self._open(join(self.store, conn), env, OpenBudgetIncident(alert))
        if opened is not None:
            log.info("incident.opened", incident_id=opened.incident_id,
                     budget_id=alert.budget_id, window_key=alert.window_key)  # fmt: skip

    async def _open(
        self, uow: UnitOfWork, env: EventEnvelope, cmd: OpenIncident | OpenBudgetIncident
    ) -> Incident | None:
        """Open ``cmd``'s incident in ``uow``; None when it is open already."""
        # The stream id is derived from the violation: a second delivery finds the stream and
        # decides nothing, and two replicas racing on it meet at expected_version 0.
        opened, stored = await self.incidents.execute(
            env.tenant_id,
            cmd.incident_id,
            partial(decide, command=cmd),
            EventMeta.caused_by(env, SERVICE_ACTOR),
            uow=uow,
        )
        if not stored:
            return None
        if not await self.table.insert(uow, opened):
            # The row and the stream are written together, so this means the store and the
            # table disagree: refuse rather than open a second incident for one violation.
            raise Conflict(f"violation {opened.violation_id} already has an incident row")
        return opened

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
        # The stream id carries the tenant, so another tenant's incident reads as empty.
        state = await self.incidents.load(tenant_id, incident_id)
        if not state.exists:
            raise NotFound(f"incident {incident_id} not found")
        return state

    # --- internals -------------------------------------------------------------------------------

    async def _execute(
        self, tenant_id: str, cmd: Acknowledge | Resolve, meta: RequestMeta
    ) -> Incident:
        event_meta = EventMeta(
            correlation_id=meta.correlation_id,
            actor=meta.actor or user_actor(cmd.by.strip()),
            trace_context=meta.trace_context,
        )
        async with begin(self.store) as uow:
            state, stored = await self.incidents.execute(
                tenant_id, cmd.incident_id, partial(decide, command=cmd), event_meta, uow=uow
            )
            if stored:
                await self.table.update(uow, state)
        return state


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
