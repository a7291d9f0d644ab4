"""The agent registry's I/O: commands on an agent's stream, the read table, the request routes.

Every command runs :mod:`services.policy_admission.agents`' pure decisions through the
repository, in one transaction with its row in ``policy_admission.agents`` (the listing, and
what each replica's admission loads). A change of what admission must know (an agent created,
sandboxed, promoted, forked or disabled) also adds an ``agents`` row to
``policy_admission.changes``, so every replica reloads the tenant's agents with its bundles,
settings and exceptions; admission then looks an agent up in memory, never in the database.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from libs.contracts.agents import (
    MAX_AGENT_VERSION,
    REGISTRY_AGENT_ID_PATTERN,
    LifecycleState,
    Origin,
    spec_hash,
)
from libs.contracts.envelope import DomainEvent, EventEnvelope, TenantId
from libs.contracts.limits import MAX_ACTOR, MAX_NAME, MAX_REASON
from libs.contracts.policy import ENVIRONMENTS, Environment, PolicyHook
from libs.errors import InvalidInput, NotFound
from libs.eventbus.repository import EventMeta, Repository, begin
from libs.eventbus.rpc import RpcServer
from libs.eventbus.uow import UnitOfWork
from services.policy_admission import agents
from services.policy_admission.agents import (
    AGENT_HISTORIES,
    AGENTS,
    Agent,
    AgentGate,
    AgentHistory,
    PolicyView,
)
from services.policy_admission.drift_handlers import DriftWatch
from services.policy_admission.freeze_handlers import Freezes
from services.policy_admission.hooks import HookActor, HookContext, evaluate_hook
from services.policy_admission.promotion_guard import ensure_promotable
from services.policy_admission.tenant_bundles import CHANGES_LOCK, TenantPolicies, log_change

MAX_LISTED = 500
HISTORIES_CACHED = 256
"""Agents whose versions are kept in memory: each holds a spec per version (up to 64 KiB each),
and versions are read when a person looks, not on every decision."""


class AgentRegistry:
    """Agents' lifecycle commands and reads for every tenant (one per process)."""

    def __init__(self, tenants: TenantPolicies) -> None:
        self.tenants = tenants
        self.store = tenants.store
        self.agents = Repository(tenants.store, AGENTS, max_retries=4)
        self.histories = Repository(tenants.store, AGENT_HISTORIES, cache_size=HISTORIES_CACHED)

    def policy(self, tenant_id: str, environment: Environment) -> PolicyView:
        """What decides for ``tenant_id`` in ``environment`` now (in memory)."""
        bundle = self.tenants.bundle_for(tenant_id, environment)
        return PolicyView(
            tenant_id=tenant_id,
            environment=environment,
            policy_digest=bundle.digest,
            policy_set_hash=self.tenants.policy_set_hash_for(tenant_id, environment),
            data=bundle.data,
            settings=self.tenants.settings_for(tenant_id),
        )

    def verdict(
        self,
        tenant_id: str,
        spec: Mapping[str, Any],
        environment: Environment,
        hook: PolicyHook,
        actor: str,
    ) -> agents.Verdict:
        """Validate ``spec`` for ``environment``: the schema, the tenant's policy view, and the
        bundle's ``hook`` (``on_create_attempt`` for validations and the sandbox,
        ``on_promotion_attempt`` for production), each violation a problem."""
        policy = self.policy(tenant_id, environment)
        # What the hook's policies may require of the request: the registry's own validation
        # (schema, allowlists, limits) of this spec for this environment.
        validated = agents.validate_agent(spec, policy)
        context = HookContext(
            hook=hook,
            actor=HookActor(id=actor[:MAX_ACTOR] or "unknown"),
            environment=environment,
            agent=dict(spec),
            request={"validation_passed": validated.passed},
        )
        decision = evaluate_hook(
            self.tenants.bundle_for(tenant_id, environment),
            context,
            tenant_id=tenant_id,
            settings=self.tenants.settings_for(tenant_id),
        )
        return agents.validate_agent(spec, policy, decision)

    async def get(self, tenant_id: str, agent_id: str) -> Agent:
        """The agent; ``agent_not_found`` (404) if it was never saved."""
        agent = await self.agents.load(tenant_id, agents.agent_entity(agent_id))
        if not agent.exists:
            raise NotFound(f"agent_not_found: no agent {agent_id!r} in the registry")
        return agent

    async def history(self, tenant_id: str, agent_id: str) -> AgentHistory:
        """The agent with every version's spec (not checked to exist: the views say so)."""
        return await self.histories.load(tenant_id, agents.agent_entity(agent_id))

    async def change(
        self,
        tenant_id: str,
        agent_id: str,
        decide: Callable[[Agent], Sequence[DomainEvent]],
        actor: str,
    ) -> tuple[Agent, list[EventEnvelope]]:
        """Decide on the agent and record what was decided with its row; ``(agent, stored)``."""
        before: list[AgentGate | None] = [None]

        def decide_noting(agent: Agent) -> Sequence[DomainEvent]:
            before[0] = agent.gate() if agent.exists else None
            return decide(agent)

        async with begin(self.store) as uow:
            await uow.lock(CHANGES_LOCK)
            agent, stored = await self.agents.execute(
                tenant_id,
                agents.agent_entity(agent_id),
                decide_noting,
                EventMeta(correlation_id=f"agent:{agent_id}", actor=actor),
                uow=uow,
            )
            gate_changed = bool(stored) and before[0] != agent.gate()
            if stored:
                await _write_row(uow, tenant_id, agent)
            if gate_changed:
                await log_change(uow, tenant_id, "agents")
        if gate_changed:
            # This replica applies it at once; the others follow the change log.
            await self.tenants.reload(tenant_id)
        return agent, stored

    async def save_draft(
        self,
        tenant_id: str,
        agent_id: str,
        spec: Any,
        origin: str | None,
        origin_ref: str | None,
        actor: str,
    ) -> dict[str, Any]:
        """Create the agent or autosave its draft (the same content again records nothing)."""
        agent, stored = await self.change(
            tenant_id,
            agent_id,
            lambda a: agents.save_draft(a, spec, origin=origin, origin_ref=origin_ref),
            actor,
        )
        # Only the first draft of an agent records its origin.
        created = bool(stored) and stored[0].payload.get("origin") is not None
        return {**agents.agent_view(agent), "changed": bool(stored), "created": created}

    async def validate(
        self, tenant_id: str, agent_id: str, environment: Environment, actor: str
    ) -> dict[str, Any]:
        """Validate the agent's current spec against ``environment``'s policy set; recorded."""
        agent = await self.get(tenant_id, agent_id)
        verdict = self.verdict(tenant_id, agent.spec, environment, "on_create_attempt", actor)
        agent, _ = await self.change(
            tenant_id, agent_id, lambda a: agents.record_validation(a, verdict), actor
        )
        return {
            **agents.validation_view(verdict),
            "agent_id": agent_id,
            "version": agent.version,
            "spec_hash": agent.spec_hash,
        }

    def validate_spec(self, tenant_id: str, spec: Any, environment: Environment) -> dict[str, Any]:
        """Validate a spec that is not saved (nothing recorded)."""
        checked = agents.check_draft(spec)
        verdict = self.verdict(tenant_id, checked, environment, "on_create_attempt", "unknown")
        return {
            **agents.validation_view(verdict),
            "agent_id": None,
            "version": None,
            "spec_hash": spec_hash(checked),
        }

    async def transition(
        self,
        tenant_id: str,
        agent_id: str,
        action: Literal["sandbox", "promote", "fork"],
        actor: str,
    ) -> dict[str, Any]:
        """Sandbox, promote or fork the agent (validated against the target environment)."""
        agent = await self.get(tenant_id, agent_id)
        decide: Callable[[Agent], Sequence[DomainEvent]]
        if action == "fork":
            decide = agents.fork
        else:
            environment: Environment = "sandbox" if action == "sandbox" else "production"
            hook: PolicyHook = (
                "on_create_attempt" if action == "sandbox" else "on_promotion_attempt"
            )
            verdict = self.verdict(tenant_id, agent.spec, environment, hook, actor)
            if action == "sandbox":
                decide = lambda a: agents.sandbox(a, verdict)  # noqa: E731
            else:
                decide = lambda a: agents.promote(a, verdict, actor)  # noqa: E731
        agent, stored = await self.change(tenant_id, agent_id, decide, actor)
        return {**agents.agent_view(agent), "changed": bool(stored)}

    async def disable(
        self,
        tenant_id: str,
        agent_id: str,
        environments: Sequence[Environment],
        reason: str,
        actor: str,
    ) -> dict[str, Any]:
        """Stop the agent running in ``environments`` (every replica denies its runs there)."""
        await self.get(tenant_id, agent_id)
        agent, stored = await self.change(
            tenant_id, agent_id, lambda a: agents.disable(a, environments, reason, actor), actor
        )
        return {**agents.agent_view(agent), "changed": bool(stored)}

    async def listing(
        self, tenant_id: str, state: LifecycleState | None, limit: int
    ) -> dict[str, Any]:
        """The tenant's agents from the read table (newest change first)."""
        async with begin(self.store) as uow:
            conn = _conn(uow)
            cur = await conn.execute(
                "SELECT agent_id, version, state, governed_version, disabled, spec_hash, origin, "
                "name, updated_at FROM policy_admission.agents WHERE tenant_id = %s "
                "AND (%s::text IS NULL OR state = %s) ORDER BY updated_at DESC, agent_id LIMIT %s",
                (tenant_id, state, state, limit),
            )
            rows = await cur.fetchall()
        return {
            "agents": [
                {
                    "agent_id": r["agent_id"],
                    "version": r["version"],
                    "state": r["state"],
                    "governed_version": r["governed_version"],
                    "disabled": list(r["disabled"]),
                    "spec_hash": r["spec_hash"],
                    "origin": r["origin"],
                    "name": r["name"],
                    "updated_at": r["updated_at"].isoformat(),
                }
                for r in rows
            ]
        }


def _conn(uow: UnitOfWork) -> Any:
    conn = uow.conn
    if conn is None:  # pragma: no cover - begin() always has a connection
        raise NotFound("no database connection for the agent registry")
    return conn


async def _write_row(uow: UnitOfWork, tenant_id: str, agent: Agent) -> None:
    identity = agent.spec.get("identity")
    name = identity.get("name") if isinstance(identity, dict) else None
    gate = agent.gate()
    await _conn(uow).execute(
        "INSERT INTO policy_admission.agents (tenant_id, agent_id, version, state, "
        "governed_version, disabled, spec_hash, origin, name, updated_at) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, now()) "
        "ON CONFLICT (tenant_id, agent_id) DO UPDATE SET version = excluded.version, "
        "state = excluded.state, governed_version = excluded.governed_version, "
        "disabled = excluded.disabled, spec_hash = excluded.spec_hash, name = excluded.name, "
        "updated_at = excluded.updated_at",
        (
            tenant_id,
            agent.agent_id,
            gate.version,
            gate.state,
            gate.governed_version,
            sorted(gate.disabled),
            agent.spec_hash,
            agent.origin,
            name if isinstance(name, str) else None,
        ),
    )


# --- the request routes --------------------------------------------------------------------------

AgentIdField = Field(pattern=REGISTRY_AGENT_ID_PATTERN)


class _Call(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant_id: TenantId


class _AgentCall(_Call):
    agent_id: str = AgentIdField
    actor: str = Field(default="service:gateway", min_length=1, max_length=MAX_ACTOR)


class SaveDraftCall(_AgentCall):
    """``agent_save_draft``: the (possibly partial) spec; origin only counts on creation."""

    spec: dict[str, Any]
    origin: Origin | None = None
    origin_ref: str | None = Field(default=None, min_length=1, max_length=MAX_NAME)


class ValidateCall(_Call):
    """``agent_validate``: a saved agent (recorded) or an unsaved spec (not recorded)."""

    agent_id: str | None = Field(default=None, pattern=REGISTRY_AGENT_ID_PATTERN)
    spec: dict[str, Any] | None = None
    environment: Environment = "production"
    actor: str = Field(default="service:gateway", min_length=1, max_length=MAX_ACTOR)


class DisableCall(_AgentCall):
    """``agent_disable``: where (both environments when left out) and why."""

    environments: list[Environment] = Field(
        default_factory=lambda: list(ENVIRONMENTS), min_length=1, max_length=2
    )
    reason: str = Field(min_length=1, max_length=MAX_REASON)


class GetCall(_Call):
    """``agent_get``, ``agent_actions`` and ``agent_versions``."""

    agent_id: str = AgentIdField


class VersionCall(GetCall):
    """``agent_version``: one version of the agent."""

    version: int = Field(ge=1, le=MAX_AGENT_VERSION)


class ListCall(_Call):
    """``agent_list``."""

    state: LifecycleState | None = None
    limit: int = Field(default=100, ge=1, le=MAX_LISTED)


def agent_routes(
    server: RpcServer,
    registry: AgentRegistry,
    freezes: Freezes | None = None,
    drift: DriftWatch | None = None,
) -> None:
    """The agent registry's requests (``docs/agents.md``). A direct ``sandbox`` or ``promote``
    passes the same freeze and drift checks as a promotion request carried out."""

    @server.handler("agent_save_draft")
    async def agent_save_draft(body: SaveDraftCall) -> dict[str, Any]:
        """Create an agent or autosave its draft."""
        return await registry.save_draft(
            body.tenant_id, body.agent_id, body.spec, body.origin, body.origin_ref, body.actor
        )

    @server.handler("agent_validate")
    async def agent_validate(body: ValidateCall) -> dict[str, Any]:
        """Validate an agent (recorded) or a spec (not recorded) against an environment."""
        if body.agent_id is not None:
            return await registry.validate(
                body.tenant_id, body.agent_id, body.environment, body.actor
            )
        if body.spec is None:
            raise InvalidInput("agent_validate_invalid: name an agent_id or send a spec")
        return registry.validate_spec(body.tenant_id, body.spec, body.environment)

    @server.handler("agent_get")
    async def agent_get(body: GetCall) -> dict[str, Any]:
        """The agent: its newest version, the governed one, its last validation."""
        return agents.agent_view(await registry.get(body.tenant_id, body.agent_id))

    @server.handler("agent_versions")
    async def agent_versions(body: GetCall) -> dict[str, Any]:
        """The agent's versions, newest first, without their specs."""
        return agents.versions_view(await registry.history(body.tenant_id, body.agent_id))

    @server.handler("agent_version")
    async def agent_version(body: VersionCall) -> dict[str, Any]:
        """One version of the agent with its spec."""
        history = await registry.history(body.tenant_id, body.agent_id)
        return agents.version_view(history, body.version)

    @server.handler("agent_list")
    async def agent_list(body: ListCall) -> dict[str, Any]:
        """The tenant's agents (of one state)."""
        return await registry.listing(body.tenant_id, body.state, body.limit)

    @server.handler("agent_sandbox")
    async def agent_sandbox(body: _AgentCall) -> dict[str, Any]:
        """Move the draft to the sandbox."""
        await ensure_promotable(freezes, drift, body.tenant_id, "sandbox")
        return await registry.transition(body.tenant_id, body.agent_id, "sandbox", body.actor)

    @server.handler("agent_promote")
    async def agent_promote(body: _AgentCall) -> dict[str, Any]:
        """Promote the sandboxed version to governed (production)."""
        await ensure_promotable(freezes, drift, body.tenant_id, "production")
        return await registry.transition(body.tenant_id, body.agent_id, "promote", body.actor)

    @server.handler("agent_fork")
    async def agent_fork(body: _AgentCall) -> dict[str, Any]:
        """Open a new draft version from the governed one."""
        return await registry.transition(body.tenant_id, body.agent_id, "fork", body.actor)

    @server.handler("agent_disable")
    async def agent_disable(body: DisableCall) -> dict[str, Any]:
        """Disable the agent in one or both environments."""
        return await registry.disable(
            body.tenant_id, body.agent_id, body.environments, body.reason, body.actor
        )

    @server.handler("agent_actions")
    async def agent_actions(body: GetCall) -> dict[str, Any]:
        """What can be done with the agent now, and the tools it offers a workflow step."""
        return agents.actions_view(await registry.get(body.tenant_id, body.agent_id))
