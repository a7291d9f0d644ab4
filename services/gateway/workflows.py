"""Request shapes of the gateway's agent, workflow and execution routes (in ``entrypoints``).

The routes forward to the workflow-engine (``mc.rpc.workflow.*``) with the caller's tenant. A
workflow document may be sent as JSON or, with ``Content-Type: application/yaml``, as YAML.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any, Literal

import orjson
import yaml
from fastapi import Path, Request
from pydantic import BaseModel, ConfigDict, Field

from libs import errors

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
MAX_DOCUMENT_BYTES = 256 * 1024

MAX_WAIT_S = 30.0
"""The longest long poll for work: below common proxies' idle timeouts."""

AgentNamePath = Annotated[str, Path(pattern=NAME_PATTERN, description="The agent's name.")]
WorkflowIdPath = Annotated[str, Path(pattern=NAME_PATTERN, description="The workflow's name.")]
ExecutionIdPath = Annotated[
    str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$", description="The execution's id.")
]
ExecutionStatus = Literal["pending", "running", "completed", "failed", "aborted"]


class RegisterAgentRequest(BaseModel):
    """An agent for the tenant's catalogue: workflow steps may name only registered agents."""

    model_config = ConfigDict(extra="forbid")

    agent_id: str = Field(pattern=NAME_PATTERN)
    description: str = Field(default="", max_length=2000)


class StartExecutionRequest(BaseModel):
    """Which version to run (default: the newest) and the inputs every step receives."""

    model_config = ConfigDict(extra="forbid")

    version: int | None = Field(default=None, ge=1)
    inputs: dict[str, Any] = Field(default_factory=dict)
    budget_usd: Decimal | None = Field(
        default=None,
        ge=0,
        le=1_000_000_000,
        decimal_places=10,
        description="A budget of this execution's own (USD), checked before its first step.",
    )


class AbortExecutionRequest(BaseModel):
    """Why the execution is aborted (recorded)."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=2000)


BudgetScope = Literal["tenant", "agent", "workflow", "execution"]


class SetBudgetRequest(BaseModel):
    """A budget's cap: per tenant, agent, workflow or execution, over a day, a month (in the
    tenant's time zone) or each execution."""

    model_config = ConfigDict(extra="forbid")

    scope: BudgetScope
    subject: str = Field(
        default="",
        pattern=r"^$|^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$",
        description="The agent, workflow or execution id; empty for the tenant.",
    )
    window: Literal["day", "month", "execution"]
    cap_usd: Decimal = Field(ge=0, le=1_000_000_000, decimal_places=10)


class SetBudgetTimezoneRequest(BaseModel):
    """The IANA time zone of the tenant's day and month budget windows (default UTC)."""

    model_config = ConfigDict(extra="forbid")

    timezone: str = Field(min_length=1, max_length=64, examples=["Europe/Paris"])


DOCUMENT_BODY = {
    "requestBody": {
        "required": True,
        "description": "A workflow document (see docs/workflows.md), as JSON or YAML.",
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "application/yaml": {"schema": {"type": "object"}},
        },
    }
}


async def read_document(request: Request) -> dict[str, Any]:
    """The request's workflow document, parsed as YAML or JSON by its content type."""
    raw = await request.body()
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise errors.InvalidInput(f"workflow document is over {MAX_DOCUMENT_BYTES} bytes")
    media = request.headers.get("content-type", "application/json")
    data: Any
    try:
        data = yaml.safe_load(raw) if "yaml" in media else orjson.loads(raw)
    except (yaml.YAMLError, orjson.JSONDecodeError, UnicodeDecodeError) as exc:
        kind = "YAML" if "yaml" in media else "JSON"
        first = (str(exc).splitlines() or ["unreadable"])[0]
        raise errors.InvalidInput(f"workflow document is not valid {kind}: {first}") from None
    if not isinstance(data, dict):
        raise errors.InvalidInput("workflow document must be a mapping with 'name' and 'steps'")
    return data
