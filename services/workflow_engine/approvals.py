"""Approval gates: the approvals each risk tier needs, and who may give them.

A tenant sets, per risk tier, how many distinct people must approve a step of that tier before it
is dispatched, the role they need, how long the request may wait (its SLA) and what happens when
it runs out: ``reject`` the step (which fails the execution) or ``escalate`` it once to an admin
with a fresh SLA, after which it is rejected. ``read_only`` steps never wait.

The rules in force when an execution starts are copied into its ``execution.started`` event, so
changing them later never changes a running execution, and replay needs nothing else.

Pure functions and models only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from libs.contracts.envelope import DomainEvent
from libs.contracts.events import ApprovalPolicySet
from libs.errors import InvalidInput

APPROVAL_POLICY_CATEGORY = "approval_policy"
CURRENT = "current"

Role = Literal["viewer", "operator", "approver", "admin"]
ROLE_RANK: Mapping[str, int] = {"viewer": 0, "operator": 1, "approver": 2, "admin": 3}
GATED_TIERS = ("write", "irreversible")


class ApprovalRule(BaseModel):
    """What one risk tier needs before its steps are dispatched."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    required: int = Field(default=0, ge=0, le=10)
    """Distinct approvers needed (0: the tier is not gated)."""
    role: Role = "approver"
    """The least role an approver must hold (``admin`` satisfies ``approver``)."""
    sla_s: float = Field(default=3600, gt=0, le=30 * 86_400)
    on_expiry: Literal["reject", "escalate"] = "reject"


class ApprovalRules(BaseModel):
    """The rules of the gated tiers (``read_only`` needs none, always)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    write: ApprovalRule = ApprovalRule()
    irreversible: ApprovalRule = ApprovalRule(required=1)

    def for_tier(self, tier: str) -> ApprovalRule | None:
        """The rule of ``tier`` when it gates anything, else None."""
        rule: ApprovalRule | None = getattr(self, tier, None) if tier in GATED_TIERS else None
        return rule if rule is not None and rule.required > 0 else None

    def content(self) -> dict[str, dict[str, Any]]:
        """Plain JSON values, as events carry them."""
        return self.model_dump(mode="json")


DEFAULT_RULES = ApprovalRules()
"""Without a policy of its own a tenant gates ``irreversible`` steps on one approver."""


def rules_from(data: Mapping[str, Any]) -> ApprovalRules:
    """Validate rules sent by a caller, naming each bad field."""
    try:
        return ApprovalRules.model_validate(dict(data))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
            for err in exc.errors(include_url=False, include_input=False)
        )
        raise InvalidInput(f"invalid approval rules: {problems}") from None


def role_satisfies(held: str, needed: str) -> bool:
    """Whether a person holding ``held`` may act where ``needed`` is required."""
    return ROLE_RANK.get(held, -1) >= ROLE_RANK.get(needed, 99)


# --- the tenant's policy aggregate ---------------------------------------------------------------


@dataclass(frozen=True)
class ApprovalPolicy:
    """A tenant's approval rules (the defaults until it sets its own)."""

    tenant_id: str
    rules: ApprovalRules = DEFAULT_RULES
    version: int = 0


def empty_policy(tenant_id: str, _entity: str = CURRENT) -> ApprovalPolicy:
    """A tenant that never set approval rules."""
    return ApprovalPolicy(tenant_id=tenant_id)


def evolve_policy(state: ApprovalPolicy, event: DomainEvent) -> ApprovalPolicy:
    """Apply one event."""
    if isinstance(event, ApprovalPolicySet):
        return ApprovalPolicy(
            state.tenant_id, ApprovalRules.model_validate(event.rules), state.version + 1
        )
    return state


def decide_policy(state: ApprovalPolicy, rules: ApprovalRules) -> list[DomainEvent]:
    """The event setting ``rules`` (none when they are the rules in force)."""
    if state.version > 0 and state.rules == rules:
        return []
    return [ApprovalPolicySet(rules=rules.content())]
