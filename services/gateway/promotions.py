"""Promotion requests' routes (``/v1/promotions/requests...``) and their shapes.

The workflow engine keeps the requests and their approvals (its approval gates and SLA sweep);
policy-admission knows the agent and the environment's policy set, and alone moves an agent.
Each route asks the one that owns the answer, and carries what admission says to the engine:

* request: admission's snapshot of the agent and the environment → the engine opens the request;
* approve: the snapshot of now → the engine approves, or closes the request as stale (409);
* execute: the engine's plan (409 unless approved) → admission checks that nothing changed,
  that no freeze or drift blocks it, and moves the agent → the engine records the outcome.

If the gateway dies after admission moved the agent, executing again finds the move done and
records it. See ``docs/policies.md#promotions``.
"""

# No ``from __future__ import annotations``: FastAPI resolves the routes' dependency annotations,
# which are local to promotion_routes.
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from libs.contracts.agents import REGISTRY_AGENT_ID_PATTERN
from libs.contracts.policy import Environment
from libs.errors import Conflict
from services.gateway.schemas import By, Reason
from services.gateway.workflows import ApprovalDecision, highest_role

MAX_LISTED = 500
PROMOTION_ID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"

PromotionIdPath = Annotated[
    str, Path(pattern=PROMOTION_ID_PATTERN, description="The promotion request's id (a UUID).")
]
DiffHash = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9:._-]{1,200}$")]


class PromotionRequestIn(BaseModel):
    """Ask to move an agent's version into an environment: a draft into the ``sandbox``, a
    sandboxed version into ``production``. ``version`` must be the agent's newest version.
    ``diff_hash``: the diff you reviewed, acknowledged with the request."""

    model_config = ConfigDict(extra="forbid")

    agent_id: Annotated[str, Field(pattern=REGISTRY_AGENT_ID_PATTERN)]
    version: int = Field(ge=1, le=2**31 - 1)
    environment: Environment = "production"
    diff_hash: DiffHash | None = None
    reason: Reason | None = None
    approvers: list[By] = Field(
        default_factory=list,
        max_length=20,
        description="Who may approve (actors such as user:alice); anyone with the role when "
        "empty. An escalated request may be approved by any admin.",
    )


class _Result(BaseModel):
    model_config = ConfigDict(extra="allow")


class PromotionApproval(_Result):
    """What the request needs: ``required`` distinct people holding ``role``, before
    ``expires_at``; then ``on_expiry`` (reject, or escalate once to an admin)."""

    required: int
    role: str
    approvers: list[str]
    named_approvers: list[str]
    expires_at: str | None
    escalated: bool
    on_expiry: str


class PromotionExecution(_Result):
    """What executing the request did: the version now running and the policy set used."""

    agent_version: int
    policy_digest: str
    policy_set_hash: str
    executed_by: str
    executed_at: str


class PromotionView(_Result):
    """A promotion request. ``stale``: the agent or the environment's policy set changed after
    it was made (``stale_reasons`` say what); a stale request is closed."""

    promotion_id: str
    agent_id: str
    agent_version: int
    spec_hash: str
    environment: Environment
    tier: Literal["write", "irreversible"]
    status: Literal["pending", "approved", "rejected", "expired", "stale", "executed"]
    pending: bool
    stale: bool
    stale_reasons: list[str]
    requested_by: str
    requested_at: str
    reason: str | None
    diff_hash: str | None
    diff_acknowledged: bool
    policy_digest: str
    policy_set_hash: str
    approval: PromotionApproval
    closed_by: str | None
    close_reason: str | None
    executed: PromotionExecution | None


class PromotionListing(_Result):
    """Promotion requests, newest first."""

    promotions: list[PromotionView]


class PromotionEvent(_Result):
    """One event of a request's timeline."""

    sequence: int
    event_type: str
    schema_version: int
    actor: str
    occurred_at: str
    data: dict[str, Any]


class PromotionTimeline(_Result):
    """A request's events in order, with who caused each and when."""

    promotion_id: str
    events: list[PromotionEvent]


def promotion_routes(router: APIRouter, read: Any, author: Any, approve: Any) -> None:
    """Add the promotion routes to ``router``. ``read``, ``author`` and ``approve`` are the
    caller dependencies of the read, workflows and approve permissions."""
    Read = Annotated[Any, Depends(read)]
    Author = Annotated[Any, Depends(author)]
    Approve = Annotated[Any, Depends(approve)]
    tags: list[str | Any] = ["promotions"]

    async def snapshot(call: Any, agent_id: str, environment: str) -> dict[str, Any]:
        found: dict[str, Any] = await call(
            "admission", "promotion_snapshot", {"agent_id": agent_id, "environment": environment}
        )
        return found

    async def promotion(call: Any, promotion_id: str) -> dict[str, Any]:
        found: dict[str, Any] = await call(
            "workflow", "promotion_get", {"promotion_id": promotion_id}
        )
        return found

    @router.post("/promotions/requests", response_model=PromotionView, status_code=201, tags=tags)
    async def request_promotion(body: PromotionRequestIn, call: Author) -> Any:
        """Request a promotion. It needs the approvals of the environment's tier (production:
        ``irreversible``, sandbox: ``write``; ``GET /v1/approval-rules``); a tier that needs
        none approves it at once. 409 ``promotion_version_mismatch`` when ``version`` is not
        the agent's newest, ``promotion_not_promotable`` when that version cannot move there."""
        now = await snapshot(call, body.agent_id, body.environment)
        if now["version"] != body.version:
            raise Conflict(
                f"promotion_version_mismatch: agent {body.agent_id!r} is at version "
                f"{now['version']}, not {body.version}"
            )
        payload = {
            "snapshot": now,
            "environment": body.environment,
            "actor": call.actor,
            "diff_hash": body.diff_hash,
            "reason": body.reason,
            "approvers": body.approvers,
        }
        return await call.answer("workflow", "promotion_request", payload, status=201)

    @router.get("/promotions/requests", response_model=PromotionListing, tags=tags)
    async def list_promotions(
        call: Read,
        pending: Annotated[
            bool | None, Query(description="Only pending requests (false: only the others).")
        ] = None,
        approver_id: Annotated[
            By | None,
            Query(description="Only requests naming or approved by this actor (user:<id>)."),
        ] = None,
        agent_id: Annotated[
            str | None, Query(pattern=REGISTRY_AGENT_ID_PATTERN, description="Only this agent's.")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LISTED)] = 100,
    ) -> Any:
        """The tenant's promotion requests, newest first."""
        payload: dict[str, Any] = {"limit": limit}
        for name, value in (
            ("pending", pending),
            ("approver_id", approver_id),
            ("agent_id", agent_id),
        ):
            if value is not None:
                payload[name] = value
        return await call.answer("workflow", "promotion_list", payload)

    @router.get("/promotions/requests/{promotion_id}", response_model=PromotionView, tags=tags)
    async def get_promotion(promotion_id: PromotionIdPath, call: Read) -> Any:
        """One promotion request (404 ``promotion_not_found``)."""
        return await call.answer("workflow", "promotion_get", {"promotion_id": promotion_id})

    @router.get(
        "/promotions/requests/{promotion_id}/events", response_model=PromotionTimeline, tags=tags
    )
    async def promotion_events(promotion_id: PromotionIdPath, call: Read) -> Any:
        """The request's timeline: its events in order, with actor and time."""
        return await call.answer("workflow", "promotion_events", {"promotion_id": promotion_id})

    @router.post(
        "/promotions/requests/{promotion_id}/approve", response_model=PromotionView, tags=tags
    )
    async def approve_promotion(
        promotion_id: PromotionIdPath, body: ApprovalDecision, call: Approve
    ) -> Any:
        """Approve as yourself (people only; never the requester: 403
        ``promotion_self_approval``). 409 ``promotion_stale`` when the agent or the policy set
        changed since the request (the request is closed), ``promotion_expired`` or
        ``promotion_escalated`` when its SLA ran out."""
        found = await promotion(call, promotion_id)
        now = await snapshot(call, found["agent_id"], found["environment"])
        payload = {
            "promotion_id": promotion_id,
            "actor": call.actor,
            "role": highest_role(call.principal),
            "reason": body.reason,
            "snapshot": now,
        }
        return await call.answer("workflow", "promotion_approve", payload)

    @router.post(
        "/promotions/requests/{promotion_id}/reject", response_model=PromotionView, tags=tags
    )
    async def reject_promotion(
        promotion_id: PromotionIdPath, body: ApprovalDecision, call: Approve
    ) -> Any:
        """Reject an open request as yourself (its requester withdraws it); it is closed."""
        payload = {
            "promotion_id": promotion_id,
            "actor": call.actor,
            "role": highest_role(call.principal),
            "reason": body.reason,
        }
        return await call.answer("workflow", "promotion_reject", payload)

    @router.post(
        "/promotions/requests/{promotion_id}/execute", response_model=PromotionView, tags=tags
    )
    async def execute_promotion(promotion_id: PromotionIdPath, call: Author) -> Any:
        """Carry out an approved request: the agent moves into the environment, validated
        against its policy set, and the promotion records the ``policy_digest`` and
        ``policy_set_hash`` used. 409 ``promotion_pending`` (or its other status) unless
        approved; ``promotion_stale`` when the agent or the policy set changed (the request is
        closed); ``promotion_frozen`` naming the open incidents that freeze the environment."""
        plan: dict[str, Any] = await call(
            "workflow", "promotion_plan", {"promotion_id": promotion_id}
        )
        done: dict[str, Any] = await call(
            "admission", "promotion_execute", {**plan, "actor": call.actor}
        )
        outcome = done.pop("outcome")
        payload = {
            "promotion_id": promotion_id,
            "outcome": outcome,
            "result": done,
            "actor": call.actor,
        }
        return await call.answer("workflow", "promotion_record_execution", payload)
