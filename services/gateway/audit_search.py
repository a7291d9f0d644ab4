"""Audit search's route (``GET /v1/audit/search``) and its shapes.

audit-replay answers from its ClickHouse search table (``search`` over the bus); see
``docs/clickhouse.md`` for the table and ``services/audit_replay/domain/search.py`` for the
query and its cursor.
"""

# No ``from __future__ import annotations``: FastAPI resolves the route's dependency annotation,
# which is local to audit_search_routes.
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints

from libs.contracts.limits import AGENT_ID_PATTERN, RUN_ID_PATTERN
from services.gateway.schemas import POLICY_ID_PATTERN, NoNul, Outcome

MAX_SEARCH_PAGE = 200
"""The most events a page holds (audit-replay's own bound too)."""

SearchText = Annotated[str, StringConstraints(min_length=1, max_length=200), NoNul]
Actor = Annotated[str, StringConstraints(min_length=1, max_length=200), NoNul]
Cursor = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,400}$")]
EventType = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+){0,3}$")]
Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,199}$")]


class AuditEvent(BaseModel):
    """One event of the audit log, with the ids searches filter on (``null`` where the event
    type has none) and the start of its searchable text."""

    model_config = ConfigDict(extra="allow")

    event_id: str
    position: int = Field(description="The event's position in the event store.")
    occurred_at: str = Field(description="ISO 8601, UTC, with microseconds and `Z`.")
    event_type: str
    stream_id: str
    actor: str
    run_id: str | None = None
    agent_id: str | None = None
    workflow_id: str | None = None
    execution_id: str | None = None
    policy_ids: list[str] = Field(default_factory=list)
    outcome: str | None = None
    incident_id: str | None = None
    excerpt: str | None = Field(
        None,
        description="The first 500 characters of the searchable text (reasons, messages, "
        "errors, a step's input and output), lower-cased.",
    )


class AuditSearchResponse(BaseModel):
    """A page of matching events, newest first; pass ``next_cursor`` back as ``cursor`` for
    the next page (``null`` on the last)."""

    model_config = ConfigDict(extra="allow")

    events: list[AuditEvent]
    next_cursor: str | None
    limit: int


def audit_search_routes(router: APIRouter, read: Any) -> None:
    """Add ``GET /audit/search`` to ``router``; ``read`` is the read permission's dependency."""
    Read = Annotated[Any, Depends(read)]

    @router.get("/audit/search", response_model=AuditSearchResponse, tags=["audit"])
    async def search_audit(
        call: Read,
        run_id: Annotated[str | None, Query(pattern=RUN_ID_PATTERN)] = None,
        agent_id: Annotated[str | None, Query(pattern=AGENT_ID_PATTERN)] = None,
        workflow_id: Annotated[Name | None, Query()] = None,
        execution_id: Annotated[Name | None, Query()] = None,
        policy_id: Annotated[str | None, Query(pattern=POLICY_ID_PATTERN)] = None,
        outcome: Outcome | None = None,
        incident_id: Annotated[Name | None, Query()] = None,
        actor: Annotated[Actor | None, Query(description="e.g. `user:alice`")] = None,
        event_type: Annotated[EventType | None, Query()] = None,
        since: Annotated[AwareDatetime | None, Query(description="At or after (ISO 8601).")] = None,
        until: Annotated[AwareDatetime | None, Query(description="Before (ISO 8601).")] = None,
        q: Annotated[
            SearchText | None,
            Query(
                description="Full text: events whose reasons, messages, errors or step input "
                "and output hold every word (case-insensitive; words are runs of letters and "
                "digits)."
            ),
        ] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_SEARCH_PAGE)] = 50,
        cursor: Annotated[Cursor | None, Query(description="`next_cursor` of a page.")] = None,
    ) -> Any:
        """Search the tenant's audit log: every filter given must match (workflow: the
        workflow's own events and those of its runs and executions). Newest first, a page at a
        time; a cursor stays valid while events arrive (no event is repeated or skipped)."""
        query = {
            "run_id": run_id,
            "agent_id": agent_id,
            "workflow_id": workflow_id,
            "execution_id": execution_id,
            "policy_id": policy_id,
            "outcome": outcome,
            "incident_id": incident_id,
            "actor": actor,
            "event_type": event_type,
            "since": since.isoformat() if since else None,
            "until": until.isoformat() if until else None,
            "q": q,
            "limit": limit,
            "cursor": cursor,
        }
        return await call.answer("audit", "search", {k: v for k, v in query.items() if v})
