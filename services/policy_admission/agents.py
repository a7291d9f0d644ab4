"""The agent registry's pure core: an agent's lifecycle, decided and folded from its events.

Stream ``<t>/policy/agent-<agent_id>`` (category ``policy``): ``agent.draft_saved``,
``agent.validated``, ``agent.sandboxed``, ``agent.promoted``, ``agent.forked`` and
``agent.disabled``. The I/O (loading, appending, the read table admission follows) is in
:mod:`services.policy_admission.agent_registry`.

Lifecycle, per environment::

    draft ──sandbox──▶ sandbox ──promote──▶ governed ──fork──▶ draft (version + 1) ...
      ▲                   │
      └──── save draft ───┘          disable (sandbox, production or both) from any state

* A draft's spec may be partial; saving the same content again (same :func:`spec_hash`) records
  nothing, so autosave is idempotent.
* ``sandbox`` and ``promote`` take a :class:`Verdict` of :func:`validate_agent` for the spec
  against the environment's policy set and refuse a failing one.
* The version goes up on promote (the governed version is a new, immutable version) and on fork
  (the new draft). A governed version is never edited: saving a draft on it is
  ``agent_version_immutable``; fork first.
* Production runs the governed version; the sandbox runs the newest version. A run of a
  registered agent is denied (:func:`admission_denial`) in an environment where it is disabled,
  and in production while it has no governed version.
* Every version stays readable (:class:`AgentHistory`, folded from the same stream): its spec
  is the one its last draft save recorded, or, never edited, the one its fork or promotion
  started it from.

No I/O here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal

from pydantic import ValidationError

from libs.contracts.agents import (
    MAX_SPEC_BYTES,
    SPEC_SECTIONS,
    AgentSpec,
    LifecycleState,
    VersionMadeBy,
    spec_hash,
)
from libs.contracts.canonical import canonical_json
from libs.contracts.envelope import DomainEvent
from libs.contracts.events import (
    AgentDisabled,
    AgentDraftSaved,
    AgentForked,
    AgentProblem,
    AgentPromoted,
    AgentSandboxed,
    AgentValidated,
    HookDecided,
)
from libs.contracts.policy import ENVIRONMENTS, Environment
from libs.errors import Conflict, InvalidInput, NotFound
from libs.eventbus.repository import Aggregate, Recorded

AGENT_CATEGORY = "policy"
AGENT_STATE_POLICY = "agent_state"
"""The policy a run of a registered agent is denied by when the agent may not run in the
environment (disabled there, or not governed in production)."""
AGENT_STATE_RUNBOOK = (
    "https://github.com/mission-control/mission-control/blob/main/docs/agents.md#admission"
)

HeadState = Literal["draft", "sandbox", "governed"]


def agent_entity(agent_id: str) -> str:
    """The entity id of an agent's stream (``<t>/policy/agent-<agent_id>``)."""
    return f"agent-{agent_id}"


# --- state ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Validation:
    """The last validation recorded for the agent."""

    version: int
    spec_hash: str
    environment: Environment
    passed: bool
    problems: tuple[AgentProblem, ...]
    policy_digest: str
    policy_set_hash: str
    at: datetime


@dataclass(frozen=True)
class Governed:
    """The governed version production runs."""

    version: int
    spec: Mapping[str, Any]
    spec_hash: str
    policy_digest: str
    policy_set_hash: str
    promoted_by: str
    promoted_at: datetime


@dataclass(frozen=True)
class Agent:
    """One agent as its stream folds: the newest version (``version``, ``state``, ``spec``), the
    governed one production runs, and the environments it is disabled in."""

    agent_id: str
    version: int = 0
    state: HeadState | None = None
    spec: Mapping[str, Any] = field(default_factory=dict)
    spec_hash: str = ""
    origin: str | None = None
    origin_ref: str | None = None
    validation: Validation | None = None
    sandboxed: tuple[str, str] | None = None
    """(policy digest, policy set hash) the current version was sandboxed with."""
    governed: Governed | None = None
    disabled: frozenset[str] = frozenset()
    created_at: datetime | None = None
    updated_at: datetime | None = None

    @property
    def exists(self) -> bool:
        """Whether a draft was ever saved."""
        return self.version > 0

    @property
    def lifecycle(self) -> LifecycleState:
        """The agent's state: ``disabled`` once disabled everywhere, else its newest version's."""
        if self.disabled >= set(ENVIRONMENTS):
            return "disabled"
        return self.state or "draft"

    def state_in(self, environment: str) -> LifecycleState:
        """What runs in ``environment``: production runs the governed version, the sandbox the
        newest one."""
        if environment in self.disabled:
            return "disabled"
        if environment == "production" and self.governed is not None:
            return "governed"
        return self.state or "draft"

    def version_in(self, environment: str) -> int | None:
        """The version that runs in ``environment`` (``None``: none may)."""
        if environment in self.disabled:
            return None
        if environment == "production":
            return self.governed.version if self.governed is not None else None
        return self.version

    def gate(self) -> AgentGate:
        """What admission keeps of the agent."""
        return AgentGate(
            version=self.version,
            state=self.lifecycle,
            governed_version=self.governed.version if self.governed is not None else None,
            disabled=frozenset(self.disabled),
        )


def evolve(agent: Agent, event: DomainEvent, at: datetime) -> Agent:
    """``agent`` after ``event``."""
    if isinstance(event, AgentDraftSaved):
        return replace(
            agent,
            version=event.version,
            state="draft",
            spec=event.spec,
            spec_hash=event.spec_hash,
            origin=agent.origin or event.origin,
            origin_ref=agent.origin_ref or event.origin_ref,
            sandboxed=None,
            created_at=agent.created_at or at,
            updated_at=at,
        )
    if isinstance(event, AgentValidated):
        validation = Validation(
            version=event.version,
            spec_hash=event.spec_hash,
            environment=event.environment,
            passed=event.passed,
            problems=tuple(event.problems),
            policy_digest=event.policy_digest,
            policy_set_hash=event.policy_set_hash,
            at=at,
        )
        return replace(agent, validation=validation, updated_at=at)
    if isinstance(event, AgentSandboxed):
        return replace(
            agent,
            state="sandbox",
            sandboxed=(event.policy_digest, event.policy_set_hash),
            updated_at=at,
        )
    if isinstance(event, AgentPromoted):
        governed = Governed(
            version=event.version,
            spec=agent.spec,
            spec_hash=event.spec_hash,
            policy_digest=event.policy_digest,
            policy_set_hash=event.policy_set_hash,
            promoted_by=event.promoted_by,
            promoted_at=at,
        )
        return replace(
            agent, version=event.version, state="governed", governed=governed, updated_at=at
        )
    if isinstance(event, AgentForked):
        return replace(
            agent,
            version=event.version,
            state="draft",
            sandboxed=None,
            validation=None,
            updated_at=at,
        )
    if isinstance(event, AgentDisabled):
        return replace(agent, disabled=agent.disabled | set(event.environments), updated_at=at)
    return agent


def _fold(agent: Agent, recorded: Sequence[Recorded]) -> Agent:
    for r in recorded:
        agent = evolve(agent, r.event, r.envelope.occurred_at)
    return agent


AGENTS = Aggregate[Agent](
    category=AGENT_CATEGORY,
    initial=lambda tenant_id, entity_id: Agent(agent_id=entity_id.removeprefix("agent-")),
    fold=_fold,
)


# --- stored versions -----------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredVersion:
    """One version of the agent as its stream keeps it: the spec it holds and what set it."""

    version: int
    spec: Mapping[str, Any]
    spec_hash: str
    saved_at: datetime
    """When its spec was set (its last draft save, else its fork or promotion)."""
    made_by: VersionMadeBy
    from_version: int | None
    """The version a fork or a promotion opened it from; ``None`` for version 1."""


@dataclass(frozen=True)
class AgentHistory:
    """The agent (:class:`Agent`, folded as ever) and every version it has had."""

    agent: Agent
    versions: Mapping[int, StoredVersion] = field(default_factory=dict)


def _stored_version(
    versions: Mapping[int, StoredVersion], event: DomainEvent, at: datetime
) -> StoredVersion | None:
    """The version ``event`` sets, or ``None`` when it sets none."""
    if isinstance(event, AgentDraftSaved):
        # Autosave saves one version many times: the last save is the version's spec.
        before = versions.get(event.version)
        return StoredVersion(
            version=event.version,
            spec=event.spec,
            spec_hash=event.spec_hash,
            saved_at=at,
            made_by="draft",
            from_version=before.from_version if before is not None else None,
        )
    if isinstance(event, AgentForked | AgentPromoted):
        # Both open version N + 1 with the spec of the version they start from.
        source = versions.get(event.from_version)
        return StoredVersion(
            version=event.version,
            spec=source.spec if source is not None else {},
            spec_hash=event.spec_hash,
            saved_at=at,
            made_by="fork" if isinstance(event, AgentForked) else "promote",
            from_version=event.from_version,
        )
    return None


def evolve_history(history: AgentHistory, event: DomainEvent, at: datetime) -> AgentHistory:
    """``history`` after ``event``."""
    stored = _stored_version(history.versions, event, at)
    versions = history.versions if stored is None else {**history.versions, stored.version: stored}
    return AgentHistory(agent=evolve(history.agent, event, at), versions=versions)


def _fold_history(history: AgentHistory, recorded: Sequence[Recorded]) -> AgentHistory:
    for r in recorded:
        history = evolve_history(history, r.event, r.envelope.occurred_at)
    return history


AGENT_HISTORIES = Aggregate[AgentHistory](
    category=AGENT_CATEGORY,
    initial=lambda tenant_id, entity_id: AgentHistory(
        agent=Agent(agent_id=entity_id.removeprefix("agent-"))
    ),
    fold=_fold_history,
)
"""The agent's stream folded with every version's spec (read when someone asks for versions;
commands and admission fold :data:`AGENTS`, which keeps the newest spec only)."""


# --- validation (the one policy port) ------------------------------------------------------------


@dataclass(frozen=True)
class PolicyView:
    """What decides for a tenant in one environment: the bundle's digest and data, the tenant's
    settings, and the policy set hash of the three with its exceptions."""

    tenant_id: str
    environment: Environment
    policy_digest: str
    policy_set_hash: str
    data: Mapping[str, Any]
    settings: Mapping[str, Any] | None = None

    def setting(self, name: str) -> Any:
        """A tenant setting as the bundle's ``lib/config.rego`` resolves it: the tenant's
        policy settings, else its override in the bundle's data, else the bundle default."""
        if self.settings is not None and self.settings.get(name) is not None:
            return self.settings[name]
        config = (self.data.get("missioncontrol") or {}).get("config") or {}
        tenant = (config.get("tenants") or {}).get(self.tenant_id) or {}
        if tenant.get(name) is not None:
            return tenant[name]
        return (config.get("defaults") or {}).get(name)


@dataclass(frozen=True)
class Verdict:
    """The outcome of :func:`validate_agent`: ``passed`` when no problem is an error."""

    environment: Environment
    passed: bool
    problems: tuple[AgentProblem, ...]
    policy_digest: str
    policy_set_hash: str

    def summary(self) -> str:
        """The problems, one clause each."""
        return "; ".join(f"{p.path}: {p.code}: {p.message}" for p in self.problems)


def _problem(code: str, path: str, message: str) -> AgentProblem:
    return AgentProblem(code=code, path=path, message=message)


def schema_problems(spec: Mapping[str, Any]) -> tuple[AgentSpec | None, list[AgentProblem]]:
    """``spec`` as an :class:`AgentSpec`, or the schema's problems, one per field."""
    try:
        return AgentSpec.model_validate(dict(spec)), []
    except ValidationError as exc:
        return None, [
            _problem(
                "schema_missing" if err["type"] == "missing" else "schema_invalid",
                ".".join(str(p) for p in err["loc"]) or "spec",
                err["msg"],
            )
            for err in exc.errors()
        ]


def _allowlist(policy: PolicyView, name: str) -> list[str]:
    value = policy.setting(name)
    return [str(v) for v in value] if isinstance(value, list) else []


def policy_problems(agent: AgentSpec, policy: PolicyView) -> list[AgentProblem]:
    """What the environment's policy set says of a complete spec: its model and tools against
    the tenant's allowlists (an empty allowlist allows everything, as in admission) and its
    limits against the tenant's."""
    problems: list[AgentProblem] = []
    models = _allowlist(policy, "model_allowlist")
    if models and agent.model.model not in models:
        problems.append(
            _problem(
                "model_not_allowed",
                "model.model",
                f"model {agent.model.model!r} is not in the tenant's model allowlist",
            )
        )
    tools = _allowlist(policy, "tool_allowlist")
    for i, tool in enumerate(agent.tools):
        if tools and tool.name not in tools:
            problems.append(
                _problem(
                    "tool_not_allowed",
                    f"tools.{i}.name",
                    f"tool {tool.name!r} is not in the tenant's tool allowlist",
                )
            )
    tenant_tokens = policy.setting("max_tokens_per_run")
    own_tokens = agent.limits.max_tokens_per_run
    if (
        isinstance(tenant_tokens, int | float)
        and own_tokens is not None
        and own_tokens > tenant_tokens
    ):
        problems.append(
            _problem(
                "limit_above_tenant",
                "limits.max_tokens_per_run",
                f"{own_tokens} is above the tenant's max_tokens_per_run ({tenant_tokens:g})",
            )
        )
    tenant_cost = policy.setting("max_cost_usd_per_run")
    own_cost = agent.limits.max_cost_usd_per_run
    if (
        isinstance(tenant_cost, int | float)
        and own_cost is not None
        and float(own_cost) > float(tenant_cost)
    ):
        problems.append(
            _problem(
                "limit_above_tenant",
                "limits.max_cost_usd_per_run",
                f"{own_cost} is above the tenant's max_cost_usd_per_run ({tenant_cost:g})",
            )
        )
    return problems


def validate_agent(
    spec: Mapping[str, Any], policy: PolicyView, hook: HookDecided | None = None
) -> Verdict:
    """Check ``spec`` against the canonical schema, then against ``policy``: the one place the
    registry asks policy about an agent (``validate``, ``sandbox`` and ``promote`` all come
    here). ``hook`` is the bundle's lifecycle hook decision on the spec (``on_create_attempt``,
    ``on_promotion_attempt``): each of its violations is a problem too, named
    ``policy_<policy_id>``; its warnings are not."""
    parsed, problems = schema_problems(spec)
    if parsed is not None:
        problems = policy_problems(parsed, policy)
    if hook is not None:
        problems = [
            *problems,
            *(_problem(f"policy_{v.policy_id}", "policy", v.message) for v in hook.violations),
        ]
    return Verdict(
        environment=policy.environment,
        passed=not problems,
        problems=tuple(problems),
        policy_digest=policy.policy_digest,
        policy_set_hash=policy.policy_set_hash,
    )


# --- decisions (pure) ----------------------------------------------------------------------------


def check_draft(spec: Any) -> dict[str, Any]:
    """A draft's spec: a JSON object of known sections within :data:`MAX_SPEC_BYTES`, fields
    inside them possibly missing (that is for ``validate`` to name)."""
    if not isinstance(spec, dict):
        raise InvalidInput("agent_draft_invalid: spec must be a JSON object")
    unknown = sorted(set(spec) - SPEC_SECTIONS)
    if unknown:
        raise InvalidInput(
            f"agent_draft_invalid: unknown spec section(s) {', '.join(map(repr, unknown))}; "
            f"the sections are {', '.join(sorted(SPEC_SECTIONS))}"
        )
    try:
        size = len(canonical_json(spec))
    except Exception:  # e.g. an integer past what JSON numbers carry exactly
        raise InvalidInput("agent_draft_invalid: the spec is not JSON every reader takes") from None
    if size > MAX_SPEC_BYTES:
        raise InvalidInput(
            f"agent_draft_invalid: the spec is {size:,} bytes, over the {MAX_SPEC_BYTES:,} allowed"
        )
    return spec


def _require(agent: Agent) -> None:
    if not agent.exists:
        raise NotFound(f"agent_not_found: no agent {agent.agent_id!r} in the registry")


def _require_enabled(agent: Agent, environment: str | None = None) -> None:
    if agent.lifecycle == "disabled":
        raise Conflict(f"agent_disabled: agent {agent.agent_id!r} is disabled")
    if environment is not None and environment in agent.disabled:
        raise Conflict(f"agent_disabled: agent {agent.agent_id!r} is disabled in {environment}")


def _illegal(agent: Agent, action: str, why: str) -> Conflict:
    return Conflict(
        f"agent_illegal_transition: cannot {action} agent {agent.agent_id!r}: version "
        f"{agent.version} is {agent.state}; {why}"
    )


def save_draft(
    agent: Agent, spec: Any, *, origin: str | None, origin_ref: str | None
) -> list[DomainEvent]:
    """Create the agent (version 1, recording its origin) or replace its draft's spec; nothing
    when the spec is the draft's already. A sandboxed version goes back to draft; a governed
    one is immutable (``agent_version_immutable``: fork it)."""
    spec = check_draft(spec)
    digest = spec_hash(spec)
    if not agent.exists:
        return [
            AgentDraftSaved(
                agent_id=agent.agent_id,
                version=1,
                spec=spec,
                spec_hash=digest,
                origin=origin or "scratch",
                origin_ref=origin_ref,
            )
        ]
    _require_enabled(agent)
    if agent.state == "governed":
        raise Conflict(
            f"agent_version_immutable: version {agent.version} of agent {agent.agent_id!r} is "
            "governed and cannot change; fork it to open a new draft version"
        )
    if digest == agent.spec_hash:
        return []  # autosave of the same content
    return [
        AgentDraftSaved(agent_id=agent.agent_id, version=agent.version, spec=spec, spec_hash=digest)
    ]


def record_validation(agent: Agent, verdict: Verdict) -> list[DomainEvent]:
    """``agent.validated`` for the current version; nothing when the same spec was validated
    with the same policy set in the same environment already (the verdict would be the same)."""
    _require(agent)
    last = agent.validation
    if (
        last is not None
        and last.version == agent.version
        and last.spec_hash == agent.spec_hash
        and last.environment == verdict.environment
        and last.policy_set_hash == verdict.policy_set_hash
        and last.passed == verdict.passed
        and last.problems == verdict.problems
    ):
        return []
    return [
        AgentValidated(
            agent_id=agent.agent_id,
            version=agent.version,
            spec_hash=agent.spec_hash,
            environment=verdict.environment,
            passed=verdict.passed,
            problems=list(verdict.problems),
            policy_digest=verdict.policy_digest,
            policy_set_hash=verdict.policy_set_hash,
        )
    ]


def _advance(
    agent: Agent,
    verdict: Verdict,
    action: Literal["sandbox", "promote"],
    move: tuple[HeadState, HeadState],
    why: str,
) -> bool:
    """Whether ``action`` moves the agent from ``move[0]`` to ``move[1]`` now: ``False`` when
    it is there already; refused when the agent is disabled in the action's environment, in
    another state, or fails ``verdict``."""
    _require(agent)
    _require_enabled(agent, "sandbox" if action == "sandbox" else "production")
    source, target = move
    if agent.state == target:
        return False
    if agent.state != source:
        raise _illegal(agent, action, why)
    if not verdict.passed:
        raise InvalidInput(
            f"agent_invalid: cannot {action} agent {agent.agent_id!r} version {agent.version}: "
            f"{verdict.summary()}"
        )
    return True


def sandbox(agent: Agent, verdict: Verdict) -> list[DomainEvent]:
    """Move the draft to the sandbox, if it passes the sandbox's policy set (again: nothing)."""
    why = "only a draft moves to the sandbox (fork it first)"
    if not _advance(agent, verdict, "sandbox", ("draft", "sandbox"), why):
        return []
    return [
        *record_validation(agent, verdict),
        AgentSandboxed(
            agent_id=agent.agent_id,
            version=agent.version,
            spec_hash=agent.spec_hash,
            policy_digest=verdict.policy_digest,
            policy_set_hash=verdict.policy_set_hash,
        ),
    ]


def promote(agent: Agent, verdict: Verdict, promoted_by: str) -> list[DomainEvent]:
    """Make the sandboxed version the governed one (version + 1), if it passes production's
    policy set; nothing if the newest version is governed already."""
    why = "move it to the sandbox first"
    if not _advance(agent, verdict, "promote", ("sandbox", "governed"), why):
        return []
    return [
        *record_validation(agent, verdict),
        AgentPromoted(
            agent_id=agent.agent_id,
            version=agent.version + 1,
            from_version=agent.version,
            spec_hash=agent.spec_hash,
            policy_digest=verdict.policy_digest,
            policy_set_hash=verdict.policy_set_hash,
            promoted_by=promoted_by,
        ),
    ]


def fork(agent: Agent) -> list[DomainEvent]:
    """Open a new draft version from the governed one (which keeps running in production)."""
    _require(agent)
    _require_enabled(agent)
    if agent.state != "governed":
        raise _illegal(agent, "fork", "only a governed version is forked; edit the draft")
    return [
        AgentForked(
            agent_id=agent.agent_id,
            version=agent.version + 1,
            from_version=agent.version,
            spec_hash=agent.spec_hash,
        )
    ]


def disable(
    agent: Agent, environments: Iterable[Environment], reason: str, disabled_by: str
) -> list[DomainEvent]:
    """Stop the agent running in ``environments``; nothing if it is disabled there already."""
    _require(agent)
    wanted = [e for e in ENVIRONMENTS if e in set(environments)]
    if not wanted:
        raise InvalidInput("agent_disable_invalid: name at least one environment")
    if all(e in agent.disabled for e in wanted):
        return []
    return [
        AgentDisabled(
            agent_id=agent.agent_id,
            version=agent.version,
            environments=[e for e in wanted if e not in agent.disabled],
            reason=reason,
            disabled_by=disabled_by,
        )
    ]


# --- admission -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AgentGate:
    """What admission holds in memory of a registered agent."""

    version: int
    state: LifecycleState
    governed_version: int | None
    disabled: frozenset[str]


def admission_denial(gate: AgentGate | None, agent_id: str, environment: str) -> str | None:
    """Why a run of ``agent_id`` may not take a step in ``environment``, or ``None``.

    An agent id that is not registered (``gate`` is ``None``) is not judged here: runs of
    unregistered agents are admitted by the bundle alone, as before the registry existed.
    """
    if gate is None:
        return None
    if environment in gate.disabled:
        return f"agent {agent_id!r} is disabled in {environment}"
    if environment == "production" and gate.governed_version is None:
        return (
            f"agent {agent_id!r} has no governed version (version {gate.version} is "
            f"{gate.state}); production runs governed agents only"
        )
    return None


def admission_reason(message: str) -> dict[str, Any]:
    """The deny entry (as the bundle writes them) for :func:`admission_denial`'s message."""
    return {
        "policy_id": AGENT_STATE_POLICY,
        # Medium: the run is stopped and an incident opened, but an agent that tried to run
        # before it was promoted must not freeze the very promotion that would let it run
        # (the freeze starts at high by default).
        "severity": "medium",
        "message": message,
        "runbook_url": AGENT_STATE_RUNBOOK,
    }


def with_deny(rego_output: dict[str, Any], reason: dict[str, Any]) -> dict[str, Any]:
    """The bundle's decision document with one more deny entry (a malformed ``deny`` is left
    as it is, for :func:`~services.policy_admission.domain.interpret` to refuse)."""
    deny = rego_output.get("deny")
    if deny is None:
        deny = []
    if not isinstance(deny, list):
        return rego_output
    return {**rego_output, "deny": [*deny, reason]}


# --- views ---------------------------------------------------------------------------------------


def _iso(at: datetime | None) -> str | None:
    return at.isoformat() if at is not None else None


def validation_view(v: Validation | Verdict) -> dict[str, Any]:
    """A validation (recorded or just made) as the API shows it."""
    return {
        "environment": v.environment,
        "passed": v.passed,
        "problems": [p.model_dump(mode="json", exclude={"event_type"}) for p in v.problems],
        "policy_digest": v.policy_digest,
        "policy_set_hash": v.policy_set_hash,
    }


def agent_view(agent: Agent) -> dict[str, Any]:
    """The agent as the API shows it."""
    last = agent.validation
    governed = agent.governed
    return {
        "agent_id": agent.agent_id,
        "version": agent.version,
        "state": agent.lifecycle,
        "environments": {
            env: {"state": agent.state_in(env), "version": agent.version_in(env)}
            for env in ENVIRONMENTS
        },
        "spec": dict(agent.spec),
        "spec_hash": agent.spec_hash,
        "origin": {"type": agent.origin, "ref": agent.origin_ref},
        "validation": (
            None
            if last is None
            else {
                **validation_view(last),
                "version": last.version,
                "spec_hash": last.spec_hash,
                "current": last.version == agent.version and last.spec_hash == agent.spec_hash,
                "at": _iso(last.at),
            }
        ),
        "sandboxed": (
            None
            if agent.sandboxed is None
            else {"policy_digest": agent.sandboxed[0], "policy_set_hash": agent.sandboxed[1]}
        ),
        "governed": (
            None
            if governed is None
            else {
                "version": governed.version,
                "spec_hash": governed.spec_hash,
                "policy_digest": governed.policy_digest,
                "policy_set_hash": governed.policy_set_hash,
                "promoted_by": governed.promoted_by,
                "promoted_at": _iso(governed.promoted_at),
            }
        ),
        "disabled": sorted(agent.disabled),
        "created_at": _iso(agent.created_at),
        "updated_at": _iso(agent.updated_at),
    }


def actions_view(agent: Agent) -> dict[str, Any]:
    """What can be done with the agent now (lifecycle actions) and what it offers a workflow
    step (its tools, and the environments it may run in)."""
    allowed: list[str] = []
    if agent.lifecycle != "disabled":
        if agent.state in ("draft", "sandbox"):
            allowed.append("save_draft")
        allowed.append("validate")
        if agent.state == "draft" and "sandbox" not in agent.disabled:
            allowed.append("sandbox")
        if agent.state == "sandbox" and "production" not in agent.disabled:
            allowed.append("promote")
        if agent.state == "governed":
            allowed.append("fork")
    if agent.disabled < set(ENVIRONMENTS):
        allowed.append("disable")
    tools = agent.spec.get("tools")
    return {
        "agent_id": agent.agent_id,
        "version": agent.version,
        "state": agent.lifecycle,
        "lifecycle_actions": allowed,
        "tools": [
            t["name"]
            for t in (tools if isinstance(tools, list) else [])
            if isinstance(t, dict) and isinstance(t.get("name"), str)
        ],
        "runnable_in": [e for e in ENVIRONMENTS if admission_denial(agent.gate(), "", e) is None],
    }


def _version_summary(agent: Agent, stored: StoredVersion) -> dict[str, Any]:
    return {
        "version": stored.version,
        "spec_hash": stored.spec_hash,
        "saved_at": _iso(stored.saved_at),
        "made_by": stored.made_by,
        "from_version": stored.from_version,
        "current": stored.version == agent.version,
        "governed": agent.governed is not None and agent.governed.version == stored.version,
    }


def versions_view(history: AgentHistory) -> dict[str, Any]:
    """The agent's versions, newest first, without their specs (``agent_not_found``, 404, if it
    was never saved). ``current`` marks the newest version, ``governed`` the one production
    runs."""
    agent = history.agent
    _require(agent)
    return {
        "agent_id": agent.agent_id,
        "version": agent.version,
        "state": agent.lifecycle,
        "governed_version": agent.governed.version if agent.governed is not None else None,
        "versions": [
            _version_summary(agent, history.versions[n])
            for n in sorted(history.versions, reverse=True)
        ],
    }


def version_view(history: AgentHistory, version: int) -> dict[str, Any]:
    """One version with its spec: ``agent_not_found`` (404) for an agent never saved,
    ``agent_version_not_found`` (404) for a version it never had."""
    agent = history.agent
    _require(agent)
    stored = history.versions.get(version)
    if stored is None:
        known = sorted(history.versions)
        raise NotFound(
            f"agent_version_not_found: agent {agent.agent_id!r} has no version {version}; its "
            f"versions are {known[0]} to {known[-1]}"
        )
    return {
        "agent_id": agent.agent_id,
        **_version_summary(agent, stored),
        "spec": dict(stored.spec),
    }
