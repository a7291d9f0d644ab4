"""Request and answer shapes of the gateway's policy simulation routes (in ``entrypoints``); the
routes forward to policy-admission (``mc.rpc.admission.start_simulation``, ``get_simulation``
and ``list_simulations``) with the caller's tenant. See ``docs/policies.md``, "Simulation".
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Path, Query
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from libs.contracts.policy import BUNDLE_DIGEST_PATTERN, Environment
from services.gateway.schemas import AgentId

SIMULATION_ID_PATTERN = r"^[0-9a-f-]{36}$"
CSV_MEDIA_TYPE = "text/csv; charset=utf-8"

SimulationIdPath = Annotated[
    str, Path(pattern=SIMULATION_ID_PATTERN, description="The simulation's id.")
]
SimulationStatus = Literal["queued", "running", "done", "failed"]
LIST_LIMIT = 200
ListLimitQuery = Annotated[int, Query(ge=1, le=LIST_LIMIT, description="Items per page, 1 to 200.")]
SimulationFormat = Annotated[
    Literal["json", "csv"] | None,
    Query(description="json (the default) or csv: the report's per-policy rows as CSV."),
]


class PolicySimulationIn(BaseModel):
    """A candidate bundle, evaluated on the decisions recorded in ``[since, until)``."""

    model_config = ConfigDict(extra="forbid")

    bundle_digest: str = Field(
        pattern=BUNDLE_DIGEST_PATTERN, description="An uploaded bundle's digest, sha256:<hex>."
    )
    since: AwareDatetime = Field(description="The window's start (included).")
    until: AwareDatetime = Field(description="The window's end (excluded); at most 31 days on.")
    agent_id: AgentId | None = Field(default=None, description="Only this agent's decisions.")
    environment: Environment = Field(
        default="production", description="The environment the candidate was uploaded to."
    )


class _Result(BaseModel):
    model_config = ConfigDict(extra="allow")


class SimulationPolicy(_Result):
    """One policy's share: its flips by kind, the runs it would have stopped and their cost."""

    policy_id: str
    flipped: int
    flips: dict[str, int]
    runs_stopped: int
    prevented_cost_usd: str
    unpriced_steps: int


class SimulationStop(_Result):
    """A run that would have stopped, at its first step the candidate denies."""

    run_id: str
    agent_id: str | None
    step_index: int
    decision_id: str
    policy_id: str
    prevented_cost_usd: str
    unpriced_steps: int


class SimulationFlip(_Result):
    """A decision whose outcome the candidate changes."""

    decision_id: str
    run_id: str
    agent_id: str | None
    step_index: int
    occurred_at: str
    recorded: str
    simulated: str
    kind: str
    policy_ids: list[str]
    exceptions: list[str]


class SimulationSummary(_Result):
    """A done simulation's totals (its report's head, without the per-policy rows)."""

    decisions: int
    flipped: int
    waived: int
    errors: int
    runs_stopped: int
    prevented_cost_usd: str


class SimulationReport(SimulationSummary):
    """What the candidate would have done to the window's decisions."""

    bundle_digest: str
    policies: list[SimulationPolicy]
    stopped_runs: list[SimulationStop]
    flipped_decisions: list[SimulationFlip]


class _SimulationJob(_Result):
    simulation_id: str
    status: SimulationStatus
    request: dict[str, Any]
    requested_by: str
    progress: dict[str, Any]
    error: str | None
    created_at: str
    updated_at: str


class PolicySimulationView(_SimulationJob):
    """A simulation job: ``queued``, ``running`` (see ``progress``), ``done`` (with its
    ``report``) or ``failed`` (with its ``error``)."""

    report: SimulationReport | None


class PolicySimulationListed(_SimulationJob):
    """A simulation in a listing: the job without its report; ``summary`` once it is done."""

    summary: SimulationSummary | None


class PolicySimulationListing(_Result):
    """A page of the tenant's simulations, newest first; pass ``next_cursor`` as ``cursor`` for
    the next (null: this is the last page)."""

    simulations: list[PolicySimulationListed]
    next_cursor: str | None
