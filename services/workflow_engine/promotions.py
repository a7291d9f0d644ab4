"""Promotion requests: moving one agent version into an environment, behind the approval gates.

Stream ``<t>/promotion/<promotion_id>`` (category ``promotion``)::

    requested ──approve × required──▶ approved ──execute──▶ executed
        │  ╲                              │
        │   ╲── SLA: escalate once to admin, then expire
        ├── reject (any open request) ────┴──▶ rejected
        └── agent or policy set changed (seen at approve or execute) ──▶ stale

* The approval rule is the tenant's :class:`~services.workflow_engine.approvals.ApprovalRules`
  of the target environment's tier: ``production`` is ``irreversible``, ``sandbox`` is ``write``
  (:func:`tier_for`). It is copied into ``promotion.requested``, so changing the rules later
  changes no open request. A tier that gates nothing (``required`` 0) approves the request at
  once.
* People approve: distinct ones, each holding the rule's role; the requester never approves
  their own request (``promotion_self_approval``). When the request names approvers, only they
  may approve it until it is escalated to an admin.
* A request records the agent's version and spec hash and the environment's ``policy_digest``
  and ``policy_set_hash`` as they were. If any of them differs when someone approves or
  executes it, the request goes stale (``promotion.went_stale``, naming what changed).

Pure decisions and folds; the I/O is in :mod:`services.workflow_engine.promotion_handlers`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Literal

from libs.contracts.envelope import DomainEvent
from libs.contracts.events import (
    PolicyEnvironment,
    PromotionApproved,
    PromotionEscalated,
    PromotionExecuted,
    PromotionExpired,
    PromotionRejected,
    PromotionRequested,
    PromotionTier,
    PromotionWentStale,
)
from libs.errors import Conflict, Forbidden, NotFound
from libs.eventbus.repository import Aggregate, fold_with
from services.workflow_engine.approvals import ApprovalRule, ApprovalRules, role_satisfies

PROMOTION_CATEGORY = "promotion"
ESCALATION_ROLE = "admin"

Status = Literal["pending", "approved", "rejected", "expired", "stale", "executed"]
OPEN: frozenset[str] = frozenset({"pending", "approved"})

SOURCE_STATE: dict[str, str] = {"sandbox": "draft", "production": "sandbox"}
"""The state an agent's newest version must be in to move into each environment."""


def tier_for(environment: str) -> PromotionTier:
    """The approval tier of a promotion into ``environment``: production is irreversible (what
    runs there serves real work), the sandbox is a write."""
    return "irreversible" if environment == "production" else "write"


@dataclass(frozen=True)
class AgentSnapshot:
    """What policy-admission says of the agent and the target environment now."""

    agent_id: str
    version: int
    spec_hash: str
    state: str
    policy_digest: str
    policy_set_hash: str


@dataclass(frozen=True)
class Promotion:
    """One promotion request as its stream folds."""

    promotion_id: str
    requested: PromotionRequested | None = None
    status: Status = "pending"
    approvers: tuple[str, ...] = ()
    role: str = "approver"
    expires_at: datetime | None = None
    escalated: bool = False
    stale_reasons: tuple[str, ...] = ()
    closed_by: str | None = None
    close_reason: str | None = None
    executed: PromotionExecuted | None = None

    @property
    def exists(self) -> bool:
        """Whether the request was made."""
        return self.requested is not None

    @property
    def required(self) -> int:
        """Distinct approvals the request needs."""
        return int(self.requested.rule.get("required", 0)) if self.requested else 0

    def req(self) -> PromotionRequested:
        """The request; ``promotion_not_found`` when there is none."""
        if self.requested is None:
            raise NotFound(f"promotion_not_found: no promotion request {self.promotion_id!r}")
        return self.requested


def empty(tenant_id: str, promotion_id: str) -> Promotion:
    """A request never made."""
    return Promotion(promotion_id=promotion_id)


def evolve(p: Promotion, event: DomainEvent) -> Promotion:
    """``p`` after ``event``."""
    if isinstance(event, PromotionRequested):
        required = int(event.rule.get("required", 0))
        return replace(
            p,
            requested=event,
            status="approved" if required == 0 else "pending",
            role=str(event.rule.get("role", "approver")),
            expires_at=event.expires_at,
        )
    if isinstance(event, PromotionApproved):
        approvers = (*p.approvers, event.approver)
        status: Status = "approved" if len(approvers) >= p.required else "pending"
        return replace(p, approvers=approvers, status=status)
    if isinstance(event, PromotionEscalated):
        return replace(p, role=event.role, expires_at=event.expires_at, escalated=True)
    if isinstance(event, PromotionExpired):
        return replace(p, status="expired", closed_by="system:sla", close_reason=event.reason)
    if isinstance(event, PromotionRejected):
        return replace(p, status="rejected", closed_by=event.rejected_by, close_reason=event.reason)
    if isinstance(event, PromotionWentStale):
        return replace(p, status="stale", stale_reasons=tuple(event.reasons))
    if isinstance(event, PromotionExecuted):
        return replace(p, status="executed", executed=event)
    return p


PROMOTIONS = Aggregate[Promotion](
    category=PROMOTION_CATEGORY, initial=empty, fold=fold_with(evolve)
)


# --- decisions -----------------------------------------------------------------------------------


def request(
    p: Promotion,
    *,
    snapshot: AgentSnapshot,
    environment: PolicyEnvironment,
    rules: ApprovalRules,
    requested_by: str,
    diff_hash: str | None,
    reason: str | None,
    approvers: list[str],
    now: datetime,
) -> list[DomainEvent]:
    """Open the request, with the approval rule of the environment's tier; refused when the
    agent's newest version cannot move there (``promotion_not_promotable``)."""
    if p.exists:
        raise Conflict(f"promotion_exists: promotion request {p.promotion_id!r} exists")
    source = SOURCE_STATE[environment]
    if snapshot.state != source:
        raise Conflict(
            f"promotion_not_promotable: agent {snapshot.agent_id!r} version {snapshot.version} "
            f"is {snapshot.state}; only a {source} version is promoted into {environment}"
        )
    if requested_by in approvers:
        raise Conflict("promotion_self_approval: the requester cannot be one of its approvers")
    tier = tier_for(environment)
    rule = rules.for_tier(tier) or ApprovalRule(required=0)
    return [
        PromotionRequested(
            promotion_id=p.promotion_id,
            agent_id=snapshot.agent_id,
            agent_version=snapshot.version,
            spec_hash=snapshot.spec_hash,
            agent_state=snapshot.state,
            environment=environment,
            policy_digest=snapshot.policy_digest,
            policy_set_hash=snapshot.policy_set_hash,
            diff_hash=diff_hash,
            reason=reason,
            requested_by=requested_by,
            approvers=sorted(set(approvers)),
            tier=tier,
            rule=rule.model_dump(mode="json"),
            requested_at=now,
            expires_at=now + timedelta(seconds=rule.sla_s) if rule.required else None,
        )
    ]


def stale_reasons(p: Promotion, snapshot: AgentSnapshot) -> list[str]:
    """What changed since the request was made (empty: nothing)."""
    r = p.req()
    found: list[str] = []
    if snapshot.version != r.agent_version or snapshot.state != r.agent_state:
        found.append(
            f"agent_changed: agent {r.agent_id!r} is version {snapshot.version} "
            f"({snapshot.state}); the request was for version {r.agent_version} ({r.agent_state})"
        )
    elif snapshot.spec_hash != r.spec_hash:
        found.append(f"agent_changed: the spec of version {r.agent_version} was edited")
    if snapshot.policy_digest != r.policy_digest:
        found.append(
            f"bundle_changed: the active {r.environment} bundle is {snapshot.policy_digest}, "
            f"the request was made under {r.policy_digest}"
        )
    elif snapshot.policy_set_hash != r.policy_set_hash:
        found.append(
            f"policy_set_changed: the {r.environment} policy set (settings or exceptions) "
            "changed since the request"
        )
    return found


def went_stale(
    p: Promotion, reasons: list[str], during: Literal["approve", "execute"], now: datetime
) -> list[DomainEvent]:
    """Close an open request that no longer describes what would be promoted."""
    p.req()
    if p.status not in OPEN or not reasons:
        return []
    return [
        PromotionWentStale(
            promotion_id=p.promotion_id, reasons=reasons, detected_during=during, detected_at=now
        )
    ]


def _require_status(p: Promotion, wanted: frozenset[str], action: str) -> None:
    p.req()
    if p.status not in wanted:
        why = f" ({'; '.join(p.stale_reasons)})" if p.stale_reasons else ""
        raise Conflict(
            f"promotion_{p.status}: cannot {action} promotion {p.promotion_id!r}: it is "
            f"{p.status}{why}"
        )


def expiries(p: Promotion, now: datetime) -> list[DomainEvent]:
    """What the SLA decides at ``now``: escalate once to an admin (``on_expiry: escalate``,
    with a fresh SLA) or expire the request; nothing before its deadline."""
    if not p.exists or p.status != "pending" or p.expires_at is None or p.expires_at > now:
        return []
    rule = ApprovalRule.model_validate(p.req().rule)
    if rule.on_expiry == "escalate" and not p.escalated:
        return [
            PromotionEscalated(
                promotion_id=p.promotion_id,
                role=ESCALATION_ROLE,
                escalated_at=now,
                expires_at=now + timedelta(seconds=rule.sla_s),
            )
        ]
    return [
        PromotionExpired(
            promotion_id=p.promotion_id,
            reason=f"no approval within the SLA ({len(p.approvers)}/{p.required})",
            expired_at=now,
        )
    ]


def _check_person(p: Promotion, who: str, role: str, action: str) -> None:
    if not role_satisfies(role, p.role):
        raise Forbidden(
            f"promotion_role_required: {action} promotion {p.promotion_id!r} needs the role "
            f"{p.role}; {who} is {role}"
        )


def approve(
    p: Promotion,
    *,
    approver: str,
    role: str,
    reason: str,
    snapshot: AgentSnapshot,
    now: datetime,
) -> list[DomainEvent]:
    """One person's approval. Past the SLA the SLA decides instead (the handler says so); a
    changed agent or policy set makes the request stale instead."""
    _require_status(p, frozenset({"pending"}), "approve")
    late = expiries(p, now)
    if late:
        return late
    r = p.req()
    if approver == r.requested_by:
        raise Forbidden(
            f"promotion_self_approval: {approver} requested promotion {p.promotion_id!r} and "
            "cannot approve it; another person must"
        )
    _check_person(p, approver, role, "approving")
    if r.approvers and approver not in r.approvers and not p.escalated:
        raise Forbidden(
            f"promotion_not_an_approver: promotion {p.promotion_id!r} names its approvers "
            f"({', '.join(r.approvers)}); {approver} is not one of them"
        )
    if approver in p.approvers:
        raise Conflict(
            f"promotion_already_approved: {approver} already approved promotion "
            f"{p.promotion_id!r}; {p.required - len(p.approvers)} more distinct approver(s) needed"
        )
    stale = went_stale(p, stale_reasons(p, snapshot), "approve", now)
    if stale:
        return stale
    return [
        PromotionApproved(
            promotion_id=p.promotion_id,
            approver=approver,
            role=role,
            reason=reason,
            approved_at=now,
        )
    ]


def reject(p: Promotion, *, by: str, role: str, reason: str, now: datetime) -> list[DomainEvent]:
    """Reject an open request (a person with the approval role), or withdraw it (its
    requester)."""
    _require_status(p, OPEN, "reject")
    if by != p.req().requested_by:
        _check_person(p, by, role, "rejecting")
    return [
        PromotionRejected(
            promotion_id=p.promotion_id, rejected_by=by, reason=reason, rejected_at=now
        )
    ]


def check_executable(p: Promotion) -> PromotionRequested:
    """The request to execute; ``promotion_pending`` (or its other status) when it is not
    approved."""
    _require_status(p, frozenset({"approved"}), "execute")
    return p.req()


def executed(
    p: Promotion,
    *,
    result: dict[str, Any],
    by: str,
    now: datetime,
) -> list[DomainEvent]:
    """Record what policy-admission did (nothing when it was recorded already)."""
    if p.status == "executed":
        return []
    r = check_executable(p)
    return [
        PromotionExecuted(
            promotion_id=p.promotion_id,
            agent_id=r.agent_id,
            environment=r.environment,
            from_version=r.agent_version,
            agent_version=int(result["agent_version"]),
            policy_digest=str(result["policy_digest"]),
            policy_set_hash=str(result["policy_set_hash"]),
            executed_by=by,
            executed_at=now,
        )
    ]


# --- views ---------------------------------------------------------------------------------------


def _iso(at: datetime | None) -> str | None:
    return at.isoformat() if at is not None else None


def view(p: Promotion) -> dict[str, Any]:
    """The request as the API shows it."""
    r = p.req()
    executed_view = None
    if p.executed is not None:
        e = p.executed
        executed_view = {
            "agent_version": e.agent_version,
            "policy_digest": e.policy_digest,
            "policy_set_hash": e.policy_set_hash,
            "executed_by": e.executed_by,
            "executed_at": e.executed_at.isoformat(),
        }
    return {
        "promotion_id": p.promotion_id,
        "agent_id": r.agent_id,
        "agent_version": r.agent_version,
        "spec_hash": r.spec_hash,
        "environment": r.environment,
        "tier": r.tier,
        "status": p.status,
        "pending": p.status == "pending",
        "stale": p.status == "stale",
        "stale_reasons": list(p.stale_reasons),
        "requested_by": r.requested_by,
        "requested_at": r.requested_at.isoformat(),
        "reason": r.reason,
        "diff_hash": r.diff_hash,
        "diff_acknowledged": r.diff_hash is not None,
        "policy_digest": r.policy_digest,
        "policy_set_hash": r.policy_set_hash,
        "approval": {
            "required": p.required,
            "role": p.role,
            "approvers": list(p.approvers),
            "named_approvers": list(r.approvers),
            "expires_at": _iso(p.expires_at),
            "escalated": p.escalated,
            "on_expiry": r.rule.get("on_expiry", "reject"),
        },
        "closed_by": p.closed_by,
        "close_reason": p.close_reason,
        "executed": executed_view,
    }
