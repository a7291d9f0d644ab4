"""Promotion requests' pure decisions: each transition, the SLA's reject and escalate, the
requester who may not approve, and requests going stale when the agent or the policy set
changed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from libs.contracts.envelope import DomainEvent
from libs.contracts.events import (
    PromotionEscalated,
    PromotionExecuted,
    PromotionExpired,
    PromotionRejected,
    PromotionRequested,
    PromotionWentStale,
)
from libs.errors import Conflict, Forbidden, NotFound
from services.policy_admission.agents import Agent, Governed
from services.policy_admission.promotion_handlers import ExecuteCall, _already_done
from services.workflow_engine import promotions
from services.workflow_engine.approvals import ApprovalRule, ApprovalRules
from services.workflow_engine.promotions import AgentSnapshot, Promotion

pytestmark = pytest.mark.unit

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
SANDBOXED = AgentSnapshot(
    agent_id="triage",
    version=2,
    spec_hash="sha256:spec",
    state="sandbox",
    policy_digest="sha256:bundle",
    policy_set_hash="sha256:set",
)
TWO_APPROVERS = ApprovalRules(
    irreversible=ApprovalRule(required=2, role="approver", sla_s=60, on_expiry="reject")
)


def fold(p: Promotion, events: Sequence[DomainEvent]) -> Promotion:
    for e in events:
        p = promotions.evolve(p, e)
    return p


def requested(
    rules: ApprovalRules = TWO_APPROVERS,
    environment: str = "production",
    snapshot: AgentSnapshot = SANDBOXED,
    approvers: list[str] | None = None,
) -> Promotion:
    p = Promotion(promotion_id="p-1")
    events = promotions.request(
        p,
        snapshot=snapshot,
        environment="production" if environment == "production" else "sandbox",
        rules=rules,
        requested_by="user:requester",
        diff_hash="sha256:diff",
        reason="ready",
        approvers=approvers or [],
        now=T0,
    )
    return fold(p, events)


def approve(p: Promotion, who: str, role: str = "approver", at: datetime = T0) -> Promotion:
    events = promotions.approve(
        p, approver=who, role=role, reason="looks right", snapshot=SANDBOXED, now=at
    )
    return fold(p, events)


def test_a_production_promotion_is_irreversible_and_a_sandbox_one_a_write() -> None:
    assert promotions.tier_for("production") == "irreversible"
    assert promotions.tier_for("sandbox") == "write"
    p = requested()
    r = p.req()
    assert isinstance(r, PromotionRequested)
    assert (r.tier, r.rule["required"], r.rule["role"]) == ("irreversible", 2, "approver")
    assert (r.policy_digest, r.policy_set_hash, r.diff_hash) == (
        "sha256:bundle",
        "sha256:set",
        "sha256:diff",
    )
    assert p.status == "pending"
    assert p.expires_at == T0 + timedelta(seconds=60)


def test_a_tier_that_gates_nothing_approves_the_request_at_once() -> None:
    draft = replace(SANDBOXED, state="draft")
    p = requested(ApprovalRules(), environment="sandbox", snapshot=draft)  # write: required 0
    assert p.req().tier == "write"
    assert p.status == "approved"
    assert p.expires_at is None


def test_only_a_version_in_the_state_before_the_target_is_requested() -> None:
    with pytest.raises(Conflict, match="promotion_not_promotable"):
        requested(snapshot=replace(SANDBOXED, state="draft"))
    with pytest.raises(Conflict, match="promotion_not_promotable"):
        requested(environment="sandbox")  # a sandboxed version is in the sandbox already
    with pytest.raises(Conflict, match="promotion_exists"):
        promotions.request(
            requested(),
            snapshot=SANDBOXED,
            environment="production",
            rules=TWO_APPROVERS,
            requested_by="user:x",
            diff_hash=None,
            reason=None,
            approvers=[],
            now=T0,
        )


def test_distinct_people_with_the_role_approve_it_then_it_executes_once() -> None:
    p = approve(requested(), "user:alice")
    assert (p.status, p.approvers) == ("pending", ("user:alice",))
    with pytest.raises(Conflict, match="promotion_already_approved"):
        approve(p, "user:alice")
    with pytest.raises(Forbidden, match="promotion_role_required"):
        approve(p, "user:op", role="operator")
    with pytest.raises(Conflict, match="promotion_pending"):
        promotions.check_executable(p)
    p = approve(p, "user:bob", role="admin")  # admin satisfies approver
    assert p.status == "approved"
    result = {"agent_version": 3, "policy_digest": "sha256:bundle", "policy_set_hash": "sha256:set"}
    events = promotions.executed(p, result=result, by="user:requester", now=T0)
    assert len(events) == 1
    assert isinstance(events[0], PromotionExecuted)
    assert (events[0].from_version, events[0].agent_version) == (2, 3)
    p = fold(p, events)
    assert p.status == "executed"
    assert promotions.executed(p, result=result, by="user:requester", now=T0) == []
    with pytest.raises(Conflict, match="promotion_executed"):
        approve(p, "user:carol")


def test_the_requester_cannot_approve_their_own_request() -> None:
    p = requested()
    with pytest.raises(Forbidden, match="promotion_self_approval"):
        approve(p, "user:requester", role="admin")
    with pytest.raises(Conflict, match="promotion_self_approval"):
        requested(approvers=["user:requester"])


def test_named_approvers_alone_approve_until_it_is_escalated() -> None:
    rules = ApprovalRules(
        irreversible=ApprovalRule(required=1, role="approver", sla_s=60, on_expiry="escalate")
    )
    p = requested(rules, approvers=["user:alice"])
    with pytest.raises(Forbidden, match="promotion_not_an_approver"):
        approve(p, "user:bob")
    p = fold(p, promotions.expiries(p, T0 + timedelta(seconds=60)))
    assert (p.escalated, p.role) == (True, "admin")
    assert approve(p, "user:boss", role="admin", at=T0 + timedelta(seconds=61)).status == (
        "approved"
    )


def test_the_sla_rejects_an_unapproved_request_when_it_runs_out() -> None:
    p = approve(requested(), "user:alice")
    assert promotions.expiries(p, T0 + timedelta(seconds=59)) == []
    events = promotions.expiries(p, T0 + timedelta(seconds=60))
    assert len(events) == 1
    assert isinstance(events[0], PromotionExpired)
    assert events[0].reason == "no approval within the SLA (1/2)"
    p = fold(p, events)
    assert p.status == "expired"
    assert promotions.expiries(p, T0 + timedelta(days=1)) == []
    with pytest.raises(Conflict, match="promotion_expired"):
        approve(p, "user:bob")


def test_the_sla_escalates_once_to_an_admin_then_expires() -> None:
    rules = ApprovalRules(
        irreversible=ApprovalRule(required=1, role="approver", sla_s=60, on_expiry="escalate")
    )
    p = requested(rules)
    late = T0 + timedelta(seconds=61)
    # An approval past the deadline: the SLA decides instead.
    events = promotions.approve(
        p, approver="user:alice", role="approver", reason="r", snapshot=SANDBOXED, now=late
    )
    assert len(events) == 1
    assert isinstance(events[0], PromotionEscalated)
    assert events[0].role == "admin"
    assert events[0].expires_at == late + timedelta(seconds=60)
    p = fold(p, events)
    with pytest.raises(Forbidden, match="promotion_role_required"):
        approve(p, "user:alice", at=late)
    (expired,) = promotions.expiries(p, late + timedelta(seconds=60))
    assert isinstance(expired, PromotionExpired)
    assert fold(p, [expired]).status == "expired"


def test_a_request_goes_stale_when_the_agent_or_the_policy_set_changed() -> None:
    p = requested()
    cases = {
        "agent_changed": replace(SANDBOXED, version=3, state="draft"),
        "agent_changed: the spec": replace(SANDBOXED, spec_hash="sha256:edited"),
        "bundle_changed": replace(SANDBOXED, policy_digest="sha256:new-bundle"),
        "policy_set_changed": replace(SANDBOXED, policy_set_hash="sha256:new-set"),
    }
    for reason, snapshot in cases.items():
        assert promotions.stale_reasons(p, snapshot)[0].startswith(reason)
        events = promotions.approve(
            p, approver="user:alice", role="approver", reason="r", snapshot=snapshot, now=T0
        )
        assert len(events) == 1
        assert isinstance(events[0], PromotionWentStale)
        assert events[0].detected_during == "approve"
        stale = fold(p, events)
        assert stale.status == "stale"
        assert promotions.view(stale)["stale"] is True
        assert promotions.view(stale)["stale_reasons"][0].startswith(reason)
    assert promotions.stale_reasons(p, SANDBOXED) == []
    # At execute: an approved request found stale by admission is closed too.
    approved = approve(approve(p, "user:alice"), "user:bob")
    changed = [promotions.stale_reasons(approved, cases["bundle_changed"])[0]]
    (went,) = promotions.went_stale(approved, changed, "execute", T0)
    assert fold(approved, [went]).status == "stale"
    with pytest.raises(Conflict, match="promotion_stale"):
        promotions.check_executable(fold(approved, [went]))


def test_rejecting_closes_an_open_request_and_the_requester_may_withdraw() -> None:
    p = requested()
    with pytest.raises(Forbidden, match="promotion_role_required"):
        promotions.reject(p, by="user:op", role="operator", reason="no", now=T0)
    (withdrawn,) = promotions.reject(p, by="user:requester", role="operator", reason="no", now=T0)
    assert isinstance(withdrawn, PromotionRejected)
    (rejected,) = promotions.reject(p, by="user:alice", role="approver", reason="no", now=T0)
    closed = fold(p, [rejected])
    assert (closed.status, closed.closed_by, closed.close_reason) == (
        "rejected",
        "user:alice",
        "no",
    )
    with pytest.raises(Conflict, match="promotion_rejected"):
        promotions.reject(closed, by="user:alice", role="approver", reason="no", now=T0)


def test_an_unknown_request_is_not_found() -> None:
    with pytest.raises(NotFound, match="promotion_not_found"):
        promotions.check_executable(Promotion(promotion_id="nope"))


def test_executing_again_after_the_agent_moved_answers_the_move_already_made() -> None:
    """The gateway may die between admission moving the agent and the engine recording it: the
    retried execution must find the move and answer it, not call the request stale."""
    plan = ExecuteCall(
        tenant_id="acme",
        agent_id="triage",
        environment="production",
        promotion_id="p-1",
        agent_version=2,
        agent_state="sandbox",
        spec_hash="sha256:spec",
        policy_digest="sha256:bundle",
        policy_set_hash="sha256:set",
        actor="user:requester",
    )
    sandboxed = Agent(agent_id="triage", version=2, state="sandbox", spec_hash="sha256:spec")
    assert _already_done(sandboxed, plan) is None
    governed = Governed(
        version=3,
        spec={},
        spec_hash="sha256:spec",
        policy_digest="sha256:bundle",
        policy_set_hash="sha256:set",
        promoted_by="user:requester",
        promoted_at=T0,
    )
    moved = replace(sandboxed, version=3, state="governed", governed=governed)
    assert _already_done(moved, plan) == {
        "outcome": "executed",
        "agent_id": "triage",
        "agent_version": 3,
        "policy_digest": "sha256:bundle",
        "policy_set_hash": "sha256:set",
    }
    # Another version governed (a later promotion of an edited spec) is not this move.
    assert _already_done(replace(moved, governed=replace(governed, spec_hash="x")), plan) is None
    to_sandbox = plan.model_copy(update={"environment": "sandbox", "agent_state": "draft"})
    in_sandbox = replace(sandboxed, sandboxed=("sha256:bundle", "sha256:set"))
    assert _already_done(in_sandbox, to_sandbox) is not None
    assert _already_done(replace(in_sandbox, spec_hash="sha256:edited"), to_sandbox) is None
