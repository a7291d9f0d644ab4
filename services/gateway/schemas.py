"""Request and response bodies of the public HTTP API.

Shared by the server (:mod:`services.gateway.entrypoints`) and the typed client
(:mod:`services.gateway.client`), so both sides agree on every field and its limits. The limits are
deliberately tight: they make the published OpenAPI document precise, and they reject at the edge
anything the services behind the gateway could not store (NUL characters that PostgreSQL's jsonb
refuses, NaN, numbers beyond 64 bits) with a 422 instead of a 5xx further down.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    WithJsonSchema,
    model_validator,
)

from libs.usage import require_consistent

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$"
"""Run ids: safe in URLs, stream ids, subjects and CSV without quoting."""

MAX_TOKENS = 1_000_000_000
MAX_STEP_INDEX = 1_000_000
MAX_BATCH = 5000
MAX_PAGE = 500


def _no_nul(value: str) -> str:
    # PostgreSQL text and jsonb cannot hold U+0000; refusing it here keeps it a 422.
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


def _json_without_nul(value: Any) -> Any:
    # Arbitrary JSON (step input/output) may nest strings anywhere; one serialisation finds them.
    try:
        dumped = orjson.dumps(value)
    except TypeError as exc:  # pragma: no cover - a JSON body only ever holds JSON values
        raise ValueError(f"must be JSON: {exc}") from exc
    if b"\\u0000" in dumped:
        raise ValueError("must not contain NUL characters")
    return value


NoNul = AfterValidator(_no_nul)
AGENT_ID_PATTERN = r"^[^\x00-\x1f\x7f\\]{1,200}$"
"""Agent ids: free text, but no control characters or backslashes (they are query filters)."""
POLICY_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,199}$"
Id = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=200), NoNul]
AgentId = Annotated[str, StringConstraints(pattern=AGENT_ID_PATTERN)]
Kind = Annotated[str, StringConstraints(min_length=1, max_length=100), NoNul]
LabelKey = Annotated[str, StringConstraints(min_length=1, max_length=100), NoNul]
LabelValue = Annotated[str, StringConstraints(max_length=500), NoNul]
LongText = Annotated[str, StringConstraints(max_length=10_000), NoNul]
Reason = Annotated[str, StringConstraints(min_length=1, max_length=2000), NoNul]
Json = Annotated[Any, AfterValidator(_json_without_nul)]
Tokens = Annotated[int, Field(ge=0, le=MAX_TOKENS)]
StepIndex = Annotated[int, Field(ge=1, le=MAX_STEP_INDEX)]
Labels = Annotated[dict[LabelKey, LabelValue], Field(max_length=50)]
ProviderCost = Annotated[
    Decimal,
    Field(ge=0, le=1_000_000, max_digits=38, decimal_places=18),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": r"^[0-9]{1,7}(\.[0-9]{1,18})?$"},
                {"type": "number", "minimum": 0, "maximum": 1_000_000},
            ],
            "description": "USD the provider reported for the call, at most 18 decimal places.",
        }
    ),
]

RunStatus = Literal["running", "completed", "failed", "stopped_by_policy"]
RunStatusFilter = Literal["live", "running", "completed", "failed", "stopped_by_policy"]
IncidentStatus = Literal["open", "acknowledged", "resolved"]
Outcome = Literal["allow", "warn", "deny"]
CostGrouping = Literal["run", "agent", "model", "workflow", "day"]
ExportFormat = Literal["json", "csv"]


class _Body(BaseModel):
    """Request bodies reject unknown fields, so a typo is a 422 rather than silently ignored."""

    model_config = ConfigDict(extra="forbid")


class _Result(BaseModel):
    """Response bodies keep fields a newer server adds, so old clients keep working."""

    model_config = ConfigDict(extra="allow")


# --- runs and steps -------------------------------------------------------------------------------


class StartRunRequest(_Body):
    """Start a run; the server picks a run id when none is given."""

    run_id: Id | None = None
    agent_id: AgentId
    labels: Labels = Field(default_factory=dict)


class RunStartedResponse(_Result):
    """The run that was started."""

    run_id: str
    status: str


class Estimate(_Body):
    """What the step about to run may consume, for the admission decision."""

    input_tokens: Tokens = 0
    max_output_tokens: Tokens = 0


class AdmissionRequest(_Body):
    """Ask whether step ``step_index`` of a run may run."""

    step_index: StepIndex
    kind: Kind = "llm_call"
    model: Name | None = None
    tool: Name | None = None
    estimate: Estimate = Field(default_factory=Estimate)


class AdmissionReason(_Result):
    """Why a policy said what it said."""

    policy_id: str
    severity: str
    message: str
    runbook_url: str | None = None


class AdmissionResponse(_Result):
    """The admission decision; ``deny`` means the agent must not run the step."""

    decision_id: str
    outcome: Outcome
    reasons: list[AdmissionReason] = Field(default_factory=list)
    bundle_digest: str
    context: dict[str, Any] = Field(default_factory=dict)


class StepFields(_Body):
    """The outcome of one step of a run, with its usage (a streamed call: its final usage).

    ``input_tokens`` counts every prompt token, of which ``cached_input_tokens`` were read from
    the provider's cache and ``cache_write_tokens`` written to it; ``output_tokens`` counts every
    generated token, of which ``reasoning_tokens`` were reasoning (``libs.usage`` maps OpenAI's,
    Anthropic's and Gemini's usage objects onto these). ``provider_cost_usd`` is the provider's
    own figure for the call, when it reports one.
    """

    step_index: StepIndex
    kind: Kind = "llm_call"
    model: Name | None = None
    tool: Name | None = None
    status: Literal["ok", "error"] = "ok"
    input_tokens: Tokens = 0
    cached_input_tokens: Tokens = 0
    cache_write_tokens: Tokens = 0
    output_tokens: Tokens = 0
    reasoning_tokens: Tokens = 0
    provider_cost_usd: ProviderCost | None = None
    duration_ms: float = Field(default=0, ge=0, le=1e12, allow_inf_nan=False)
    input: Json = None
    output: Json = None
    error: LongText | None = None

    @model_validator(mode="after")
    def _usage_adds_up(self) -> StepFields:
        return require_consistent(self)


class StepBatchItem(StepFields):
    """One step of a batch, naming its run."""

    run_id: Id


class StepBatchRequest(_Body):
    """Up to 5,000 steps of any runs of the tenant."""

    items: Annotated[list[StepBatchItem], Field(min_length=1, max_length=MAX_BATCH)]


class StepsRecordedResponse(_Result):
    """How many steps were recorded and at which store positions."""

    recorded: int
    positions: list[int] = Field(default_factory=list)


class FinishRunRequest(_Body):
    """End a run on the agent's own terms."""

    status: Literal["completed", "failed"]
    reason: Reason | None = None


class RunFinishedResponse(_Result):
    """The run and the status it ended with."""

    run_id: str
    status: str


# --- incidents ------------------------------------------------------------------------------------


class AcknowledgeRequest(_Body):
    """Take ownership of an incident; ``by`` defaults to the API key's id."""

    by: Name | None = None


class ResolveRequest(_Body):
    """Close an incident with its resolution."""

    resolution: Reason
    by: Name | None = None


# --- prices ---------------------------------------------------------------------------------------

_PRICE_PATTERN = r"^(1000(\.0{1,18})?|[0-9]{1,3}(\.[0-9]{1,18})?)$"
Price = Annotated[
    Decimal,
    Field(ge=0, le=1000, max_digits=38, decimal_places=18),
    # Prices travel best as decimal strings (no binary rounding); numbers are accepted too.
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": _PRICE_PATTERN},
                {"type": "number", "minimum": 0, "maximum": 1000},
            ],
            "description": "USD per token, at most 18 decimal places.",
        }
    ),
]


class ModelPriceIn(_Body):
    """USD per token of one model, valid from ``effective_from`` (default: always).

    ``input_per_token`` prices uncached prompt tokens and ``output_per_token`` generated tokens.
    Cache reads (``cached_input_per_token``) and cache writes (``cache_write_per_token``) default
    to the input price, reasoning (``reasoning_per_token``) to the output price.
    """

    model: Name
    input_per_token: Price
    output_per_token: Price
    cached_input_per_token: Price | None = None
    cache_write_per_token: Price | None = None
    reasoning_per_token: Price | None = None
    effective_from: datetime | None = None


class SetPricesRequest(_Body):
    """Replace the tenant's custom price table."""

    prices: Annotated[list[ModelPriceIn], Field(min_length=1, max_length=1000)]


class PriceTableResponse(_Result):
    """A version of the tenant's price table."""

    version: int | str


# --- errors ---------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    """A machine-readable code and a human-readable message."""

    code: str
    message: str


class ErrorResponse(BaseModel):
    """The body of every non-2xx response of the API."""

    error: ErrorDetail
