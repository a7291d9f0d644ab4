"""Promotion requests' I/O: their streams, the ``workflow.promotions`` index, the SLA sweep.

Each command runs :mod:`services.workflow_engine.promotions`' pure decisions through the
repository, in one transaction with the request's row in ``workflow.promotions`` (the listing,
and when the SLA sweep must look at it again). What policy-admission knows (the agent's version
and the environment's policy set) arrives with the command: the gateway asks admission for it
(``promotion_snapshot``) and carries it here, and admission alone carries a promotion out
(``promotion_execute``).

A decision that closes a request instead of doing what was asked (a stale request, an SLA
that ran out) is stored first, then answered as a 409 naming it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from functools import partial
from typing import Annotated, Any, Literal

import structlog
from psycopg.types.json import Jsonb
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from libs.contracts import new_uuid7, utcnow
from libs.contracts.agents import REGISTRY_AGENT_ID_PATTERN
from libs.contracts.envelope import DomainEvent, TenantId
from libs.contracts.events import PolicyEnvironment
from libs.contracts.limits import MAX_ACTOR, MAX_REASON
from libs.errors import Conflict, InvalidInput
from libs.eventbus.db import transaction
from libs.eventbus.repository import EventMeta, Repository, Store, begin
from libs.eventbus.rpc import RpcServer
from libs.eventbus.uow import UnitOfWork
from services.workflow_engine import promotions
from services.workflow_engine.approvals import CURRENT, ApprovalPolicy
from services.workflow_engine.promotions import PROMOTIONS, AgentSnapshot, Promotion

log = structlog.get_logger("workflow_engine.promotions")

SLA_ACTOR = "system:sla"
MAX_LISTED = 500


class PromotionHandlers:
    """Commands, queries and the SLA sweep of promotion requests."""

    def __init__(self, store: Store, policies: Repository[ApprovalPolicy]) -> None:
        self.store = store
        self.promotions = Repository(store, PROMOTIONS, cache_size=1_000, max_retries=4)
        self.policies = policies

    async def _change(
        self,
        tenant_id: str,
        promotion_id: str,
        decide: Callable[[Promotion], Sequence[DomainEvent]],
        actor: str,
        *,
        reindex: bool = False,
    ) -> Promotion:
        """Decide and store, with the request's row; ``reindex`` rewrites the row even when
        nothing was decided (the sweep: a row it found due is never found due again)."""
        async with begin(self.store) as uow:
            state, stored = await self.promotions.execute(
                tenant_id,
                promotion_id,
                decide,
                EventMeta(correlation_id=f"promotion:{promotion_id}", actor=actor),
                uow=uow,
            )
            if stored or (reindex and state.exists):
                await _write_row(uow, tenant_id, state)
        if stored:
            log.info(
                "promotion.changed",
                tenant_id=tenant_id,
                promotion_id=promotion_id,
                status=state.status,
                events=[e.event_type for e in stored],
            )
        return state

    async def _require(self, tenant_id: str, promotion_id: str) -> Promotion:
        state = await self.promotions.load(tenant_id, promotion_id)
        state.req()
        return state

    # --- commands ------------------------------------------------------------------------------

    async def request(
        self,
        tenant_id: str,
        *,
        snapshot: AgentSnapshot,
        environment: PolicyEnvironment,
        requested_by: str,
        diff_hash: str | None,
        reason: str | None,
        approvers: list[str],
    ) -> dict[str, Any]:
        """Open a promotion request under the tenant's approval rules of its tier."""
        policy = await self.policies.load(tenant_id, CURRENT)
        decide = partial(
            promotions.request,
            snapshot=snapshot,
            environment=environment,
            rules=policy.rules,
            requested_by=requested_by,
            diff_hash=diff_hash,
            reason=reason,
            approvers=approvers,
            now=utcnow(),
        )
        state = await self._change(tenant_id, str(new_uuid7()), decide, requested_by)
        return promotions.view(state)

    async def approve(
        self,
        tenant_id: str,
        promotion_id: str,
        *,
        approver: str,
        role: str,
        reason: str,
        snapshot: AgentSnapshot,
    ) -> dict[str, Any]:
        """One person's approval (409 ``promotion_stale`` or ``promotion_expired`` when the
        request closed instead; ``promotion_escalated`` when it now needs an admin)."""
        await self._require(tenant_id, promotion_id)
        decide = partial(
            promotions.approve,
            approver=approver,
            role=role,
            reason=reason,
            snapshot=snapshot,
            now=utcnow(),
        )
        before = await self.promotions.load(tenant_id, promotion_id)
        state = await self._change(tenant_id, promotion_id, decide, approver)
        _refuse_closed(state)
        if state.escalated and not before.escalated:
            raise Conflict(
                f"promotion_escalated: promotion {promotion_id!r} waited past its SLA and now "
                f"needs an {state.role}'s approval, until {state.expires_at}"
            )
        return promotions.view(state)

    async def reject(
        self, tenant_id: str, promotion_id: str, *, by: str, role: str, reason: str
    ) -> dict[str, Any]:
        """Reject (or, as its requester, withdraw) an open request."""
        await self._require(tenant_id, promotion_id)
        decide = partial(promotions.reject, by=by, role=role, reason=reason, now=utcnow())
        return promotions.view(await self._change(tenant_id, promotion_id, decide, by))

    async def plan(self, tenant_id: str, promotion_id: str) -> dict[str, Any]:
        """What executing the request must find at admission (409 unless it is approved)."""
        state = await self._require(tenant_id, promotion_id)
        r = promotions.check_executable(state)
        return {
            "promotion_id": promotion_id,
            "agent_id": r.agent_id,
            "agent_version": r.agent_version,
            "agent_state": r.agent_state,
            "spec_hash": r.spec_hash,
            "environment": r.environment,
            "policy_digest": r.policy_digest,
            "policy_set_hash": r.policy_set_hash,
        }

    async def record_execution(
        self,
        tenant_id: str,
        promotion_id: str,
        *,
        outcome: Literal["executed", "stale"],
        result: dict[str, Any],
        by: str,
    ) -> dict[str, Any]:
        """Record what admission did: the promotion carried out, or found stale (409)."""
        state = await self._require(tenant_id, promotion_id)
        now = utcnow()
        if outcome == "stale":
            current = SnapshotIn.model_validate(result.get("snapshot") or {}).snapshot()
            reasons = promotions.stale_reasons(state, current) or [
                "changed: admission found the agent or policy set changed"
            ]
            decide = partial(promotions.went_stale, reasons=reasons, during="execute", now=now)
            state = await self._change(tenant_id, promotion_id, decide, by)
            _refuse_closed(state)
            return promotions.view(state)
        decide = partial(promotions.executed, result=result, by=by, now=now)
        return promotions.view(await self._change(tenant_id, promotion_id, decide, by))

    # --- queries -------------------------------------------------------------------------------

    async def get(self, tenant_id: str, promotion_id: str) -> dict[str, Any]:
        """One request."""
        return promotions.view(await self._require(tenant_id, promotion_id))

    async def timeline(self, tenant_id: str, promotion_id: str) -> dict[str, Any]:
        """The request's events in order, each with its actor and time."""
        await self._require(tenant_id, promotion_id)
        stream_id = PROMOTIONS.stream_ids(tenant_id, promotion_id)[0]
        envelopes = await self.store.read_stream(stream_id)
        return {
            "promotion_id": promotion_id,
            "events": [
                {
                    "sequence": e.stream_version,
                    "event_type": e.event_type,
                    "schema_version": e.schema_version,
                    "actor": e.actor,
                    "occurred_at": e.occurred_at.isoformat(),
                    "data": e.payload,
                }
                for e in envelopes
            ],
        }

    async def listing(
        self,
        tenant_id: str,
        pool: Any,
        *,
        pending: bool | None,
        approver_id: str | None,
        agent_id: str | None,
        limit: int,
    ) -> dict[str, Any]:
        """The tenant's requests, newest first: only pending ones, only those naming or approved
        by ``approver_id``, only those of ``agent_id``."""
        async with transaction(pool) as conn:
            cur = await conn.execute(
                "SELECT view FROM workflow.promotions WHERE tenant_id = %(tenant)s"
                " AND (%(pending)s::boolean IS NULL OR (status = 'pending') = %(pending)s)"
                " AND (%(agent)s::text IS NULL OR agent_id = %(agent)s)"
                " AND (%(approver)s::text IS NULL OR %(approver)s = ANY(approvers)"
                "      OR %(approver)s = ANY(named_approvers))"
                " ORDER BY requested_at DESC, promotion_id DESC LIMIT %(limit)s",
                {
                    "tenant": tenant_id,
                    "pending": pending,
                    "agent": agent_id,
                    "approver": approver_id,
                    "limit": limit,
                },
            )
            rows = await cur.fetchall()
        return {"promotions": [r["view"] for r in rows]}

    # --- the SLA sweep -------------------------------------------------------------------------

    async def tick(self, pool: Any, now: datetime | None = None, limit: int = 100) -> int:
        """Escalate or expire every pending request whose SLA ran out; the number moved."""
        now = now or utcnow()
        async with transaction(pool) as conn:
            cur = await conn.execute(
                "SELECT tenant_id, promotion_id FROM workflow.promotions"
                " WHERE status = 'pending' AND expires_at <= %s ORDER BY expires_at LIMIT %s",
                (now, limit),
            )
            due = await cur.fetchall()
        for row in due:
            await self._change(
                row["tenant_id"],
                row["promotion_id"],
                partial(promotions.expiries, now=now),
                SLA_ACTOR,
                reindex=True,
            )
        return len(due)


def _refuse_closed(state: Promotion) -> None:
    """A request closed by the decision just stored is answered as a 409 naming why."""
    if state.status == "stale":
        raise Conflict(
            f"promotion_stale: promotion {state.promotion_id!r} is stale: "
            f"{'; '.join(state.stale_reasons)}; request the promotion again"
        )
    if state.status == "expired":
        raise Conflict(
            f"promotion_expired: promotion {state.promotion_id!r} expired: {state.close_reason}"
        )


def snapshot_from(data: dict[str, Any]) -> AgentSnapshot:
    """The admission snapshot a command carries."""
    return AgentSnapshot(
        agent_id=str(data["agent_id"]),
        version=int(data["version"]),
        spec_hash=str(data["spec_hash"]),
        state=str(data["state"]),
        policy_digest=str(data["policy_digest"]),
        policy_set_hash=str(data["policy_set_hash"]),
    )


async def _write_row(uow: UnitOfWork, tenant_id: str, p: Promotion) -> None:
    conn = uow.conn
    if conn is None:  # pragma: no cover - begin() always has a connection
        return
    r = p.req()
    await conn.execute(
        "INSERT INTO workflow.promotions (tenant_id, promotion_id, agent_id, environment, status,"
        " requested_by, approvers, named_approvers, requested_at, expires_at, view)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (tenant_id, promotion_id) DO UPDATE SET status = excluded.status,"
        " approvers = excluded.approvers, expires_at = excluded.expires_at,"
        " view = excluded.view",
        (
            tenant_id,
            p.promotion_id,
            r.agent_id,
            r.environment,
            p.status,
            r.requested_by,
            list(p.approvers),
            list(r.approvers),
            r.requested_at,
            p.expires_at if p.status == "pending" else None,
            Jsonb(promotions.view(p)),
        ),
    )


# --- the request routes (``mc.rpc.workflow.promotion_*``) ----------------------------------------

PROMOTION_ID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
Actor = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ACTOR)]
Reason = Annotated[str, StringConstraints(min_length=1, max_length=MAX_REASON)]
Role = Literal["viewer", "operator", "approver", "admin"]


class _Call(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant_id: TenantId


class SnapshotIn(BaseModel):
    """Admission's ``promotion_snapshot`` answer, as the gateway carries it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    agent_id: str = Field(pattern=REGISTRY_AGENT_ID_PATTERN)
    version: int = Field(ge=1, le=2**31 - 1)
    spec_hash: str = Field(min_length=1, max_length=200)
    state: str = Field(min_length=1, max_length=50)
    policy_digest: str = Field(min_length=1, max_length=200)
    policy_set_hash: str = Field(min_length=1, max_length=200)

    def snapshot(self) -> AgentSnapshot:
        """The domain's snapshot."""
        return snapshot_from(self.model_dump())


class RequestCall(_Call):
    """``promotion_request``."""

    snapshot: SnapshotIn
    environment: PolicyEnvironment
    actor: Actor
    diff_hash: str | None = Field(default=None, min_length=1, max_length=200)
    reason: Reason | None = None
    approvers: list[Actor] = Field(default_factory=list, max_length=20)


class PromotionCall(_Call):
    """``promotion_get``, ``promotion_events`` and ``promotion_plan``."""

    promotion_id: str = Field(pattern=PROMOTION_ID_PATTERN)


class DecisionCall(PromotionCall):
    """``promotion_approve`` / ``promotion_reject``: the person, their role and why."""

    actor: Actor
    role: Role
    reason: Reason
    snapshot: SnapshotIn | None = None


class RecordCall(PromotionCall):
    """``promotion_record_execution``: what admission answered."""

    outcome: Literal["executed", "stale"]
    result: dict[str, Any]
    actor: Actor


class ListCall(_Call):
    """``promotion_list``."""

    pending: bool | None = None
    approver_id: Actor | None = None
    agent_id: str | None = Field(default=None, pattern=REGISTRY_AGENT_ID_PATTERN)
    limit: int = Field(default=100, ge=1, le=MAX_LISTED)


def promotion_routes(server: RpcServer, handlers: PromotionHandlers, pool: Any) -> None:
    """The promotion requests' routes (``docs/policies.md#promotions``)."""

    @server.handler("promotion_request")
    async def promotion_request(body: RequestCall) -> dict[str, Any]:
        """Open a promotion request."""
        return await handlers.request(
            body.tenant_id,
            snapshot=body.snapshot.snapshot(),
            environment=body.environment,
            requested_by=body.actor,
            diff_hash=body.diff_hash,
            reason=body.reason,
            approvers=list(body.approvers),
        )

    @server.handler("promotion_list")
    async def promotion_list(body: ListCall) -> dict[str, Any]:
        """The tenant's promotion requests, filtered."""
        return await handlers.listing(
            body.tenant_id,
            pool,
            pending=body.pending,
            approver_id=body.approver_id,
            agent_id=body.agent_id,
            limit=body.limit,
        )

    @server.handler("promotion_get")
    async def promotion_get(body: PromotionCall) -> dict[str, Any]:
        """One promotion request."""
        return await handlers.get(body.tenant_id, body.promotion_id)

    @server.handler("promotion_events")
    async def promotion_events(body: PromotionCall) -> dict[str, Any]:
        """The request's timeline."""
        return await handlers.timeline(body.tenant_id, body.promotion_id)

    @server.handler("promotion_approve")
    async def promotion_approve(body: DecisionCall) -> dict[str, Any]:
        """One person's approval."""
        if body.snapshot is None:
            raise InvalidInput("promotion_approve needs admission's snapshot of the agent")
        return await handlers.approve(
            body.tenant_id,
            body.promotion_id,
            approver=body.actor,
            role=body.role,
            reason=body.reason,
            snapshot=body.snapshot.snapshot(),
        )

    @server.handler("promotion_reject")
    async def promotion_reject(body: DecisionCall) -> dict[str, Any]:
        """Reject or withdraw a request."""
        return await handlers.reject(
            body.tenant_id, body.promotion_id, by=body.actor, role=body.role, reason=body.reason
        )

    @server.handler("promotion_plan")
    async def promotion_plan(body: PromotionCall) -> dict[str, Any]:
        """What executing an approved request must find at admission."""
        return await handlers.plan(body.tenant_id, body.promotion_id)

    @server.handler("promotion_record_execution")
    async def promotion_record_execution(body: RecordCall) -> dict[str, Any]:
        """Record what admission did with the request."""
        return await handlers.record_execution(
            body.tenant_id,
            body.promotion_id,
            outcome=body.outcome,
            result=body.result,
            by=body.actor,
        )
