"""Promotion requests on the real event store: the SLA sweep finds due requests through the
``workflow.promotions`` index and escalates then expires them, the listing filters, and the
timeline shows each event with its actor."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from functools import partial

import pytest
from psycopg_pool import AsyncConnectionPool

from libs.eventbus.db import open_pool
from libs.eventbus.repository import EventMeta, Repository
from libs.eventbus.store import EventStore
from services.workflow_engine.approvals import CURRENT, ApprovalRule, ApprovalRules, decide_policy
from services.workflow_engine.execution_handlers import APPROVAL_POLICY
from services.workflow_engine.promotion_handlers import PromotionHandlers
from services.workflow_engine.promotions import AgentSnapshot
from tests.conftest import System

pytestmark = pytest.mark.integration

SNAPSHOT = AgentSnapshot(
    agent_id="triage",
    version=1,
    spec_hash="sha256:spec",
    state="sandbox",
    policy_digest="sha256:bundle",
    policy_set_hash="sha256:set",
)


@pytest.fixture
async def pool(system: System) -> AsyncIterator[AsyncConnectionPool]:
    pool = await open_pool(system.service_url, max_size=4)
    yield pool
    await pool.close()


async def test_the_sla_sweep_escalates_then_expires_a_request_and_the_listing_follows(
    pool: AsyncConnectionPool, tenant: str
) -> None:
    store = EventStore(pool)
    policies = Repository(store, APPROVAL_POLICY)
    rules = ApprovalRules(
        irreversible=ApprovalRule(required=2, role="approver", sla_s=60, on_expiry="escalate")
    )
    await policies.execute(
        tenant,
        CURRENT,
        partial(decide_policy, rules=rules),
        EventMeta(correlation_id="rules", actor="user:admin"),
    )
    handlers = PromotionHandlers(store, policies)
    opened = await handlers.request(
        tenant,
        snapshot=SNAPSHOT,
        environment="production",
        requested_by="user:requester",
        diff_hash=None,
        reason="ready",
        approvers=["user:alice"],
    )
    pid = opened["promotion_id"]
    assert (opened["status"], opened["approval"]["required"]) == ("pending", 2)
    expires = datetime.fromisoformat(opened["approval"]["expires_at"])

    # Nothing is due before the deadline.
    await handlers.tick(pool, now=expires - timedelta(seconds=1))
    assert (await handlers.get(tenant, pid))["approval"]["escalated"] is False

    await handlers.tick(pool, now=expires)
    escalated = await handlers.get(tenant, pid)
    assert (escalated["status"], escalated["approval"]["role"]) == ("pending", "admin")
    assert escalated["approval"]["escalated"] is True
    again = datetime.fromisoformat(escalated["approval"]["expires_at"])
    assert again > expires

    listed = await handlers.listing(
        tenant, pool, pending=True, approver_id="user:alice", agent_id="triage", limit=10
    )
    assert [p["promotion_id"] for p in listed["promotions"]] == [pid]
    none = await handlers.listing(
        tenant, pool, pending=True, approver_id="user:bob", agent_id=None, limit=10
    )
    assert none["promotions"] == []

    await handlers.tick(pool, now=again)
    expired = await handlers.get(tenant, pid)
    assert expired["status"] == "expired"
    assert expired["close_reason"] == "no approval within the SLA (0/2)"
    assert (
        await handlers.listing(
            tenant, pool, pending=True, approver_id=None, agent_id=None, limit=10
        )
    )["promotions"] == []
    closed = await handlers.listing(
        tenant, pool, pending=False, approver_id=None, agent_id="triage", limit=10
    )
    assert [p["status"] for p in closed["promotions"]] == ["expired"]

    timeline = (await handlers.timeline(tenant, pid))["events"]
    assert [(e["event_type"], e["actor"]) for e in timeline] == [
        ("promotion.requested", "user:requester"),
        ("promotion.escalated", "system:sla"),
        ("promotion.expired", "system:sla"),
    ]
