"""Promotion requests' admission side: what the agent and the environment's policy set are now,
and carrying out an approved promotion only while they are still what was approved.

The workflow engine keeps the requests and their approvals (``docs/policies.md#promotions``);
the registry, the bundles and the freeze live here, so the last checks and the move itself
happen here, in order:

1. the agent's version, state and spec hash, and the environment's ``policy_digest`` and
   ``policy_set_hash``, are still those recorded at request time (else the answer is
   ``stale`` with the snapshot of now, and the engine closes the request);
2. no open incident freezes the target environment (409 ``promotion_frozen`` naming them);
3. sandbox and production have not drifted apart, or the drift was acknowledged (409
   ``promotion_drifted``; both checked by :mod:`~services.policy_admission.promotion_guard`);
4. the registry moves the agent (``sandbox`` or ``promote``), validating it against the
   environment's policy set and recording the policy set it used.

Executing again a promotion that was carried out already (the engine died before recording
it) answers the same result and changes nothing.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from libs.contracts.agents import REGISTRY_AGENT_ID_PATTERN
from libs.contracts.envelope import TenantId
from libs.contracts.limits import MAX_ACTOR
from libs.contracts.policy import Environment
from libs.errors import Conflict
from libs.eventbus.rpc import RpcServer
from services.policy_admission.agent_registry import AgentRegistry
from services.policy_admission.agents import Agent
from services.policy_admission.drift_handlers import DriftWatch
from services.policy_admission.freeze_handlers import Freezes
from services.policy_admission.promotion_guard import ensure_promotable


def snapshot(
    registry: AgentRegistry, tenant_id: str, agent: Agent, environment: Environment
) -> dict[str, Any]:
    """The agent's newest version and the environment's policy set, now."""
    policy = registry.policy(tenant_id, environment)
    return {
        "agent_id": agent.agent_id,
        "version": agent.version,
        "spec_hash": agent.spec_hash,
        "state": agent.state or "draft",
        "policy_digest": policy.policy_digest,
        "policy_set_hash": policy.policy_set_hash,
    }


def _already_done(agent: Agent, plan: ExecuteCall) -> dict[str, Any] | None:
    """The result of this promotion if the agent shows it was carried out already."""
    if plan.environment == "production":
        g = agent.governed
        if g is not None and g.version == plan.agent_version + 1 and g.spec_hash == plan.spec_hash:
            return _result(g.version, g.policy_digest, g.policy_set_hash, agent)
        return None
    if (
        agent.state == "sandbox"
        and agent.version == plan.agent_version
        and agent.spec_hash == plan.spec_hash
        and agent.sandboxed is not None
    ):
        return _result(agent.version, agent.sandboxed[0], agent.sandboxed[1], agent)
    return None


def _result(version: int, digest: str, set_hash: str, agent: Agent) -> dict[str, Any]:
    return {
        "outcome": "executed",
        "agent_id": agent.agent_id,
        "agent_version": version,
        "policy_digest": digest,
        "policy_set_hash": set_hash,
    }


class _Call(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant_id: TenantId


class SnapshotCall(_Call):
    """``promotion_snapshot``: the agent and the target environment."""

    agent_id: str = Field(pattern=REGISTRY_AGENT_ID_PATTERN)
    environment: Environment


class ExecuteCall(SnapshotCall):
    """``promotion_execute``: what the approved request recorded, and who executes it."""

    promotion_id: str = Field(min_length=1, max_length=100)
    agent_version: int = Field(ge=1, le=2**31 - 1)
    agent_state: str = Field(min_length=1, max_length=50)
    spec_hash: str = Field(min_length=1, max_length=200)
    policy_digest: str = Field(min_length=1, max_length=200)
    policy_set_hash: str = Field(min_length=1, max_length=200)
    actor: str = Field(min_length=1, max_length=MAX_ACTOR)


def promotion_routes(
    server: RpcServer,
    registry: AgentRegistry,
    freezes: Freezes | None,
    drift: DriftWatch | None = None,
) -> None:
    """``promotion_snapshot`` and ``promotion_execute``."""

    async def now_of(tenant_id: str, agent_id: str, environment: Environment) -> dict[str, Any]:
        return snapshot(registry, tenant_id, await registry.get(tenant_id, agent_id), environment)

    @server.handler("promotion_snapshot")
    async def promotion_snapshot(body: SnapshotCall) -> dict[str, Any]:
        """The agent's newest version and the environment's policy set, now."""
        return await now_of(body.tenant_id, body.agent_id, body.environment)

    @server.handler("promotion_execute")
    async def promotion_execute(body: ExecuteCall) -> dict[str, Any]:
        """Carry out an approved promotion if nothing changed and nothing blocks it."""
        agent = await registry.get(body.tenant_id, body.agent_id)
        done = _already_done(agent, body)
        if done is not None:
            return done
        now = await now_of(body.tenant_id, body.agent_id, body.environment)
        recorded = {
            "agent_id": body.agent_id,
            "version": body.agent_version,
            "spec_hash": body.spec_hash,
            "state": body.agent_state,
            "policy_digest": body.policy_digest,
            "policy_set_hash": body.policy_set_hash,
        }
        if now != recorded:
            return {"outcome": "stale", "snapshot": now}
        await ensure_promotable(freezes, drift, body.tenant_id, body.environment)
        action: Literal["sandbox", "promote"] = (
            "promote" if body.environment == "production" else "sandbox"
        )
        await registry.transition(body.tenant_id, body.agent_id, action, body.actor)
        agent = await registry.get(body.tenant_id, body.agent_id)
        result = _already_done(agent, body)
        if result is None:  # pragma: no cover - the transition above made it so
            raise Conflict(f"promotion_stale: agent {body.agent_id!r} changed meanwhile")
        return result
