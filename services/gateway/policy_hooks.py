"""Request and answer shapes of ``POST /v1/policy-hooks/{hook}/evaluate`` (in ``entrypoints``),
which forwards to policy-admission (``mc.rpc.admission.evaluate_hook``) with the caller's tenant
and identity. See ``docs/policies.md``, "Hooks and decisions".
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Path
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from libs.contracts.events import LockedField, Mutation, Reason
from libs.contracts.policy import DEFAULT_ENVIRONMENT, Environment, PolicyHook
from services.gateway.rbac import Principal, UserPrincipal
from services.gateway.schemas import Outcome, json_without_nul

HookPath = Annotated[
    PolicyHook,
    Path(
        description="The hook: on_create_attempt, on_review_open, on_promotion_attempt, "
        "before_execute, after_execute or on_policy_update."
    ),
]
JsonObject = Annotated[dict[str, Any], AfterValidator(json_without_nul)]


class PolicyHookIn(BaseModel):
    """A hook's input context, less the actor (the gateway names the caller)."""

    model_config = ConfigDict(extra="forbid")

    environment: Environment = Field(
        default=DEFAULT_ENVIRONMENT,
        description="Whose bundle decides, and the environment policies see (production by "
        "default).",
    )
    agent: JsonObject | None = Field(
        default=None, description="The agent spec as a JSON object (the registry's spec)."
    )
    request: JsonObject = Field(
        default_factory=dict,
        description="What the hook is about: a promotion's checks; for before_execute the "
        "admission input's run and step; for after_execute {run_id, step_index}; for "
        "on_policy_update the subjects to scan, [{id, agent}].",
    )
    change: JsonObject | None = Field(
        default=None, description='What the caller changes, e.g. {"fields": ["model.name"]}.'
    )


def hook_payload(hook: str, body: PolicyHookIn, principal: Principal) -> dict[str, Any]:
    """The ``evaluate_hook`` request: the context with the caller as its actor."""
    roles = sorted(principal.roles) if isinstance(principal, UserPrincipal) else []
    return {
        "hook": hook,
        "actor": {"id": principal.actor, "roles": roles, "human": principal.human},
        **body.model_dump(mode="json"),
    }


class _Result(BaseModel):
    model_config = ConfigDict(extra="allow")


class HookDecisionView(_Result):
    """One subject's decision."""

    hook: PolicyHook
    outcome: Outcome
    violations: list[Reason]
    warnings: list[Reason]
    locked_fields: list[LockedField]
    mutations: list[Mutation]
    exceptions: list[str] = Field(
        default_factory=list,
        description="The policy exceptions that turned a deny into this warn.",
    )
    runbooks: list[str]
    bundle_digest: str


class SubjectDecisionView(HookDecisionView):
    """One scanned agent's decision."""

    subject: str


class PolicyHookDecision(_Result):
    """A hook's decision (``decision_id`` names its ``policy.hook_evaluated`` record); for
    on_policy_update the worst outcome and each subject's decision."""

    decision_id: str
    hook: PolicyHook
    outcome: Outcome
    bundle_digest: str
    violations: list[Reason] | None = None
    warnings: list[Reason] | None = None
    locked_fields: list[LockedField] | None = None
    mutations: list[Mutation] | None = None
    exceptions: list[str] | None = None
    runbooks: list[str] | None = None
    subjects: list[SubjectDecisionView] | None = None
