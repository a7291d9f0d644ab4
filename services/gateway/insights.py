"""The console's analytics and the monthly usage statements: ``GET /v1/analytics/{view}``,
``GET /v1/statements`` and ``GET /v1/statements/{period}``.

audit-replay answers from its ClickHouse projections (``analytics``, ``statements`` and
``statement`` over the bus; see ``services/audit_replay/insights.py`` for the queries).
"""

# No ``from __future__ import annotations``: FastAPI resolves the routes' dependency annotation,
# which is local to insight_routes.
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query
from pydantic import BaseModel, ConfigDict, Field

MAX_DAYS = 366
DEFAULT_DAYS = 30
PERIOD_PATTERN = r"^\d{4}-(0[1-9]|1[0-2])$"
"""A month, ``YYYY-MM`` (audit-replay checks the same)."""

AnalyticsView = Literal[
    "cost_by_model_day",
    "cost_by_agent_day",
    "denials_by_policy",
    "incidents_by_day",
    "decisions_by_day",
    "productivity",
]
Days = Annotated[
    int,
    Query(ge=1, le=MAX_DAYS, description="The window: the last `days` days (UTC, today included)."),
]
Period = Annotated[str, Path(pattern=PERIOD_PATTERN, description="The month, `YYYY-MM` (UTC).")]


class _Result(BaseModel):
    model_config = ConfigDict(extra="allow")


class AnalyticsTable(_Result):
    """One analytics view as a table: ``rows`` are lists in ``columns`` order. Money is a
    decimal string in USD, ``null`` where no call was priced; days are ISO dates (UTC)."""

    view: AnalyticsView
    days: int
    columns: list[str]
    rows: list[list[Any]]
    truncated: bool = Field(description="Whether rows past the first 5,000 were left out.")


class StatementSummary(_Result):
    """One month's totals."""

    period: str = Field(description="`YYYY-MM` (UTC).")
    runs: int = Field(description="Runs with at least one recorded cost in the month.")
    tokens: int
    cost_usd: str | None = Field(description="Priced calls only; `null` when none was priced.")
    unpriced_calls: int = Field(description="Calls the price table could not price.")


class StatementListing(_Result):
    """The tenant's months with recorded costs, newest first (at most 120)."""

    statements: list[StatementSummary]


class StatementLine(_Result):
    """What one agent spent on one model in the month."""

    agent_id: str
    model: str | None
    runs: int
    tokens: int
    cost_usd: str | None
    unpriced_calls: int


class Statement(_Result):
    """A month's usage and chargeback statement: its costs by agent and model."""

    period: str
    runs: int
    tokens: int
    total_usd: str | None = Field(description="Priced calls only; `null` when none was priced.")
    unpriced_calls: int
    lines: list[StatementLine]
    truncated: bool


def insight_routes(router: APIRouter, read: Any) -> None:
    """Add the analytics and statement routes to ``router``; ``read`` is the read permission's
    dependency."""
    Read = Annotated[Any, Depends(read)]

    @router.get("/analytics/{view}", response_model=AnalyticsTable, tags=["costs"])
    async def get_analytics(view: AnalyticsView, call: Read, days: Days = DEFAULT_DAYS) -> Any:
        """One of the console's analytics over the last ``days`` days: cost and tokens by model
        or by agent per day, denials by policy, incidents opened and resolved per day and
        severity, admission decisions per day and outcome, and each agent's runs, outcomes,
        mean duration, tokens and cost (``productivity``). Budget burn is ``GET /v1/budgets``."""
        return await call.answer("audit", "analytics", {"view": view, "days": days})

    @router.get("/statements", response_model=StatementListing, tags=["costs"])
    async def list_statements(call: Read) -> Any:
        """The tenant's monthly usage statements, newest first: runs, tokens and cost per month."""
        return await call.answer("audit", "statements")

    @router.get("/statements/{period}", response_model=Statement, tags=["costs"])
    async def get_statement(period: Period, call: Read) -> Any:
        """One month's usage and chargeback statement: runs, tokens and cost by agent and model,
        with the month's totals."""
        return await call.answer("audit", "statement", {"period": period})
