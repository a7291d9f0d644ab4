"""The agent registry's routes (``/v1/agents/...``, ``/v1/agent-registry``) and their shapes.

They forward to policy-admission (``mc.rpc.admission.agent_*``) with the caller's tenant; the
registry lives there so admission knows each agent's state from its own data. See
``docs/agents.md``.

The older ``POST /v1/agents`` and ``GET /v1/agents`` are the workflow engine's agent catalogue
(the names workflow steps may use); the registry governs an agent's spec and lifecycle.
"""

# No ``from __future__ import annotations``: FastAPI resolves the routes' dependency annotations,
# which are local to agent_routes.
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Body, Depends, Path, Query, Response
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from libs import errors
from libs.contracts.agents import (
    MAX_AGENT_VERSION,
    REGISTRY_AGENT_ID_PATTERN,
    LifecycleState,
    Origin,
    VersionMadeBy,
)
from libs.contracts.policy import Environment
from services.gateway.schemas import Name, Reason, json_without_nul

MAX_LISTED = 500

RegistryAgentId = Annotated[str, Field(pattern=REGISTRY_AGENT_ID_PATTERN)]
AgentIdPath = Annotated[
    str,
    Path(
        pattern=REGISTRY_AGENT_ID_PATTERN,
        description="The registered agent's id: 1-100 letters, digits and ._- (first a letter "
        "or digit).",
    ),
]
VersionPath = Annotated[
    int, Path(ge=1, le=MAX_AGENT_VERSION, description="The version: 1 to the agent's newest.")
]
Spec = Annotated[dict[str, Any], AfterValidator(json_without_nul)]


class AgentDraftIn(BaseModel):
    """Create an agent, or autosave its draft: the spec may be partial (``validate`` names what
    is missing); the same spec again records nothing. ``origin`` counts on creation only."""

    model_config = ConfigDict(extra="forbid")

    agent_id: RegistryAgentId
    spec: Spec = Field(
        description="The agent spec (sections identity, role, model, tools, memory, triggers, "
        "limits, policies; see docs/agents.md), possibly partial."
    )
    origin: Origin | None = Field(
        default=None,
        description="How the agent came to be (on creation; scratch when left out).",
    )
    origin_ref: Name | None = Field(
        default=None, description="What it came from: a template, agent, workflow... id."
    )


class AgentValidateIn(BaseModel):
    """Validate a saved agent (recorded with the policy set used) or an unsaved spec (not
    recorded): send ``agent_id`` or ``spec``."""

    model_config = ConfigDict(extra="forbid")

    agent_id: RegistryAgentId | None = None
    spec: Spec | None = None
    environment: Environment = "production"


class AgentDisableIn(BaseModel):
    """Where to stop the agent (both environments when left out) and why (recorded)."""

    model_config = ConfigDict(extra="forbid")

    environments: list[Environment] | None = Field(default=None, min_length=1, max_length=2)
    reason: Reason


class _Result(BaseModel):
    model_config = ConfigDict(extra="allow")


class AgentProblemView(_Result):
    """One problem of a spec: ``code`` names it, ``path`` points into the spec."""

    code: str
    path: str
    message: str


class AgentValidation(_Result):
    """A validation: the verdict and the policy set it was made with."""

    environment: Environment
    passed: bool
    problems: list[AgentProblemView]
    policy_digest: str
    policy_set_hash: str
    agent_id: str | None = None
    version: int | None = None
    spec_hash: str | None = None


class AgentInEnvironment(_Result):
    """The agent in one environment: its state there and the version that runs (``None``:
    none may)."""

    state: LifecycleState
    version: int | None


class AgentOrigin(_Result):
    """How the agent came to be."""

    type: str | None
    ref: str | None


class AgentGoverned(_Result):
    """The governed version production runs, and the policy set it was promoted with."""

    version: int
    spec_hash: str
    policy_digest: str
    policy_set_hash: str
    promoted_by: str
    promoted_at: str | None


class AgentView(_Result):
    """A registered agent: its newest version (``spec``), per environment what runs, the
    governed version and the last validation. ``changed``: whether the request recorded
    anything."""

    agent_id: str
    version: int
    state: LifecycleState
    environments: dict[str, AgentInEnvironment]
    spec: dict[str, Any]
    spec_hash: str
    origin: AgentOrigin
    validation: dict[str, Any] | None
    sandboxed: dict[str, Any] | None
    governed: AgentGoverned | None
    disabled: list[Environment]
    created_at: str | None
    updated_at: str | None
    changed: bool | None = None
    created: bool | None = None


class AgentVersionSummary(_Result):
    """One stored version: its spec's hash, when and how the spec was set (``made_by``: a draft
    save, the fork that opened the version, or the promotion that made it, ``from_version``
    being where a fork or promotion started), whether it is the newest version (``current``) and
    whether production runs it (``governed``)."""

    version: int
    spec_hash: str
    saved_at: str | None
    made_by: VersionMadeBy
    from_version: int | None
    current: bool
    governed: bool


class AgentVersions(_Result):
    """The agent's versions, newest first (without their specs)."""

    agent_id: str
    version: int
    state: LifecycleState
    governed_version: int | None
    versions: list[AgentVersionSummary]


class AgentVersionSpec(AgentVersionSummary):
    """One stored version with its spec."""

    agent_id: str
    spec: dict[str, Any]


class AgentSummary(_Result):
    """One agent of the listing."""

    agent_id: str
    version: int
    state: LifecycleState
    governed_version: int | None
    disabled: list[str]
    spec_hash: str
    origin: str | None
    name: str | None
    updated_at: str


class AgentRegistryListing(_Result):
    """The tenant's registered agents, most recently changed first."""

    agents: list[AgentSummary]


class AgentActions(_Result):
    """What can be done with the agent now, and what it offers a workflow step."""

    agent_id: str
    version: int
    state: LifecycleState
    lifecycle_actions: list[str]
    tools: list[str]
    runnable_in: list[Environment]


DIRECT_TIERS = {"sandbox": "write", "promote": "irreversible"}
"""The approval tier a direct move falls under (as a promotion request into that environment)."""


def agent_routes(router: APIRouter, read: Any, author: Any, govern: Any) -> None:
    """Add the registry's routes to ``router``. ``read``, ``author`` and ``govern`` are the
    caller dependencies of the read, workflows and govern permissions."""
    Read = Annotated[Any, Depends(read)]
    Author = Annotated[Any, Depends(author)]
    Govern = Annotated[Any, Depends(govern)]
    tags: list[str | Any] = ["agents"]

    @router.post(
        "/agents/draft",
        response_model=AgentView,
        status_code=201,
        tags=tags,
        responses={200: {"model": AgentView, "description": "The draft was saved, or unchanged."}},
    )
    async def save_agent_draft(body: AgentDraftIn, call: Author) -> Any:
        """Create an agent (201, version 1, its origin recorded) or autosave its draft (200).
        A governed version cannot change (409 ``agent_version_immutable``): fork it."""
        payload = {**body.model_dump(mode="json"), "actor": call.actor}
        result = await call("admission", "agent_save_draft", payload)
        status = 201 if result.get("created") else 200
        return Response(orjson.dumps(result), status_code=status, media_type="application/json")

    @router.post("/agents/validate", response_model=AgentValidation, tags=tags)
    async def validate_agent(body: AgentValidateIn, call: Author) -> Any:
        """Check a spec against the canonical schema and the environment's policy set
        (allowlists, limits); each problem is named. For a saved agent the validation is
        recorded with the ``policy_digest`` and ``policy_set_hash`` it used."""
        payload = {**body.model_dump(mode="json", exclude_none=True), "actor": call.actor}
        return await call.answer("admission", "agent_validate", payload)

    @router.get("/agent-registry", response_model=AgentRegistryListing, tags=tags)
    async def list_registered_agents(
        call: Read,
        state: Annotated[
            LifecycleState | None, Query(description="Only agents in this state.")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LISTED)] = 100,
    ) -> Any:
        """The tenant's registered agents (of one state), most recently changed first."""
        payload: dict[str, Any] = {"limit": limit}
        if state is not None:
            payload["state"] = state
        return await call.answer("admission", "agent_list", payload)

    @router.get("/agents/{agent_id}", response_model=AgentView, tags=tags)
    async def get_agent(agent_id: AgentIdPath, call: Read) -> Any:
        """The agent, to resume editing: its newest version, what runs where, its last
        validation (404 ``agent_not_found``)."""
        return await call.answer("admission", "agent_get", {"agent_id": agent_id})

    @router.get("/agents/{agent_id}/versions", response_model=AgentVersions, tags=tags)
    async def list_agent_versions(agent_id: AgentIdPath, call: Read) -> Any:
        """Every version the agent has had, newest first, without the specs: each one's spec
        hash, when its spec was saved, what made it (draft, fork or promote) and whether it is
        the newest (``current``) or the one production runs (``governed``). 404
        ``agent_not_found``."""
        return await call.answer("admission", "agent_versions", {"agent_id": agent_id})

    @router.get("/agents/{agent_id}/versions/{version}", response_model=AgentVersionSpec, tags=tags)
    async def get_agent_version(agent_id: AgentIdPath, version: VersionPath, call: Read) -> Any:
        """One version's spec, as its last draft save left it (or as its fork or promotion
        started it). 404 ``agent_not_found`` or ``agent_version_not_found``; a version below 1
        is 422."""
        payload = {"agent_id": agent_id, "version": version}
        return await call.answer("admission", "agent_version", payload)

    @router.get("/agents/{agent_id}/actions", response_model=AgentActions, tags=tags)
    async def get_agent_actions(agent_id: AgentIdPath, call: Read) -> Any:
        """The lifecycle actions allowed now, the agent's tools and where it may run."""
        return await call.answer("admission", "agent_actions", {"agent_id": agent_id})

    async def _transition(call: Any, action: str, agent_id: str) -> Any:
        if action in DIRECT_TIERS:
            await _ensure_no_approval_needed(call, action)
        payload = {"agent_id": agent_id, "actor": call.actor}
        return await call.answer("admission", f"agent_{action}", payload)

    async def _ensure_no_approval_needed(call: Any, action: str) -> None:
        # A direct move is for tenants whose approval gates do not gate it; otherwise it must
        # be a promotion request, approved as the workflow engine's rules say.
        tier = DIRECT_TIERS[action]
        rules = (await call("workflow", "approval_rules"))["rules"]
        required = int((rules.get(tier) or {}).get("required") or 0)
        if required > 0:
            raise errors.Conflict(
                f"promotion_requires_approval: the tenant's {tier} tier needs {required} "
                f"approval(s); request the move at /v1/promotions/requests"
            )

    @router.post("/agents/{agent_id}/sandbox", response_model=AgentView, tags=tags)
    async def sandbox_agent(agent_id: AgentIdPath, call: Author) -> Any:
        """Move the draft to the sandbox, where it may run; it must pass validation against the
        sandbox's policy set (422 ``agent_invalid`` naming the problems). Only a draft moves
        (409 ``agent_illegal_transition``), only when the ``write`` approval tier needs no
        approval (409 ``promotion_requires_approval``) and no freeze or drift blocks it (409)."""
        return await _transition(call, "sandbox", agent_id)

    @router.post("/agents/{agent_id}/fork", response_model=AgentView, tags=tags)
    async def fork_agent(agent_id: AgentIdPath, call: Author) -> Any:
        """Open a new draft version (version + 1) from the governed one, which keeps running
        in production. Only a governed version is forked (409)."""
        return await _transition(call, "fork", agent_id)

    @router.post("/agents/{agent_id}/promote", response_model=AgentView, tags=tags)
    async def promote_agent(agent_id: AgentIdPath, call: Govern) -> Any:
        """Promote the sandboxed version to governed (version + 1, immutable): production runs
        it from now on. It must pass validation against production's policy set; the promotion
        records the ``policy_digest`` and ``policy_set_hash`` used. People only (admin). Only
        when the tenant's ``irreversible`` approval tier needs no approval (else 409
        ``promotion_requires_approval``: request it at ``/v1/promotions/requests``), and never
        while a freeze or unacknowledged drift blocks it (409)."""
        return await _transition(call, "promote", agent_id)

    @router.post("/agents/{agent_id}/disable", response_model=AgentView, tags=tags)
    async def disable_agent(
        agent_id: AgentIdPath, body: Annotated[AgentDisableIn, Body()], call: Govern
    ) -> Any:
        """Stop the agent running in one or both environments: admission denies its runs there
        (``agent_state``) on every replica. People only (admin)."""
        payload: dict[str, Any] = {
            "agent_id": agent_id,
            "reason": body.reason,
            "actor": call.actor,
        }
        if body.environments is not None:
            payload["environments"] = body.environments
        return await call.answer("admission", "agent_disable", payload)
