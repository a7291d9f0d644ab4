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
    SecretStr,
    StringConstraints,
    WithJsonSchema,
    model_validator,
)

from libs.contracts.limits import (
    AGENT_ID_PATTERN,
    MAX_BY,
    MAX_JSON_DEPTH,
    MAX_KIND,
    MAX_LABEL_KEY,
    MAX_LABEL_VALUE,
    MAX_LABELS,
    MAX_NAME,
    MAX_REASON,
    MAX_STEP_INDEX,
    MAX_TOKENS,
    RUN_ID_PATTERN,
)
from libs.contracts.policy import Environment
from libs.usage import require_consistent
from services.gateway.rbac import USER_ID_PATTERN

ID_PATTERN = RUN_ID_PATTERN

"""Run ids: safe in URLs, stream ids, subjects and CSV without quoting."""

MAX_BATCH = 5000
MAX_PAGE = 500


def _no_nul(value: str) -> str:
    # PostgreSQL text and jsonb cannot hold U+0000, and no encoder along the way takes a lone
    # surrogate (JSON lets a body escape one); refusing them here keeps them a 422.
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (a lone surrogate is not)") from None
    return value


def _json_depth(value: Any) -> int:
    depth, level = 0, [value]
    while level:
        depth += 1
        nested: list[Any] = []
        for v in level:
            if isinstance(v, dict):
                nested.extend(v.values())
            elif isinstance(v, list):
                nested.extend(v)
        level = nested
    return depth


def json_without_nul(value: Any) -> Any:
    """``value`` when it is JSON every store and encoder takes: no NUL, not too deep, no huge
    number; else :class:`ValueError` saying which."""
    # Arbitrary JSON (step input/output) is stored inside events and serialised on the way, with
    # a few levels of envelope around it; past MAX_JSON_DEPTH some encoder along the way refuses.
    if _json_depth(value) > MAX_JSON_DEPTH:
        raise ValueError(f"must not nest deeper than {MAX_JSON_DEPTH} levels")
    # NUL characters may sit in strings anywhere; one serialisation finds them.
    try:
        dumped = orjson.dumps(value)
    except TypeError as exc:  # a number past 64 bits, which orjson (and so the bus) refuses
        raise ValueError(f"must be JSON every part of the system can carry: {exc}") from exc
    if b"\\u0000" in dumped:
        raise ValueError("must not contain NUL characters")
    return value


NoNul = AfterValidator(_no_nul)
POLICY_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,199}$"
Id = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=MAX_NAME), NoNul]
By = Annotated[str, StringConstraints(min_length=1, max_length=MAX_BY), NoNul]
AgentId = Annotated[str, StringConstraints(pattern=AGENT_ID_PATTERN)]
Kind = Annotated[str, StringConstraints(min_length=1, max_length=MAX_KIND), NoNul]
LabelKey = Annotated[str, StringConstraints(min_length=1, max_length=MAX_LABEL_KEY), NoNul]
LabelValue = Annotated[str, StringConstraints(max_length=MAX_LABEL_VALUE), NoNul]
LongText = Annotated[str, StringConstraints(max_length=10_000), NoNul]
Reason = Annotated[str, StringConstraints(min_length=1, max_length=MAX_REASON), NoNul]
Json = Annotated[Any, AfterValidator(json_without_nul)]
Tokens = Annotated[int, Field(ge=0, le=MAX_TOKENS)]
StepIndex = Annotated[int, Field(ge=1, le=MAX_STEP_INDEX)]
Labels = Annotated[dict[LabelKey, LabelValue], Field(max_length=MAX_LABELS)]
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
CostGrouping = Literal["run", "agent", "model", "workflow", "day", "step"]
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
    positions: list[int] = Field(default_factory=list)


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
    environment: Environment | None = Field(
        default=None,
        description="Whose bundle decides: the tenant's production (the default) or sandbox "
        "one (docs/policies.md).",
    )


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
    exceptions: list[str] = Field(
        default_factory=list,
        description="The policy exceptions that turned a deny into this warn (docs/policies.md).",
    )


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


class UsageReport(_Body):
    """The usage so far of a call still running (cumulative, not a delta), reported while the
    provider streams. The same counts as a recorded step, adding up the same way."""

    model: Name | None = None
    input_tokens: Tokens = 0
    cached_input_tokens: Tokens = 0
    cache_write_tokens: Tokens = 0
    output_tokens: Tokens = 0
    reasoning_tokens: Tokens = 0

    @model_validator(mode="after")
    def _usage_adds_up(self) -> UsageReport:
        return require_consistent(self)


class UsageVerdict(_Result):
    """Whether the worker must stop the step now, and why; what the usage costs so far."""

    abort: bool
    reason: str | None = None
    cost_usd: str | None = None
    pricing_status: Literal["priced", "unpriced", "no_model"] = "no_model"


class StreamMessage(_Result):
    """One message of an event stream (``text/event-stream``): its ``id:`` (the cursor to
    resume after, ``<events sequence>-<live sequence>``), its ``event:`` name (``snapshot``,
    ``usage``, ``end``, or a stored event's type) and its ``data:`` (JSON)."""

    id: str
    event: str
    data: dict[str, Any]


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
    positions: list[int] = Field(default_factory=list)


# --- reading runs ---------------------------------------------------------------------------------

Timestamp = Annotated[str, Field(description="ISO 8601, UTC, with microseconds and `Z`.")]
Usd = Annotated[str, Field(description="US dollars as a decimal string with 10 places.")]


class RunSummary(_Result):
    """A run with its totals; ``cost_usd`` sums its priced steps only (``null``: none priced)."""

    run_id: str
    agent_id: str
    status: str
    started_at: Timestamp | None
    ended_at: Timestamp | None
    stopped_at_step: int | None
    violation_policy_id: str | None
    violation_decision_id: str | None
    stop_reason: str | None
    last_step_index: int
    version: int
    tokens_used: int
    cost_usd: Usd | None
    unpriced_steps: int


class Run(RunSummary):
    """A run with the ids of the incidents it caused."""

    incident_ids: list[str]


class RunList(_Result):
    """A page of runs, newest first."""

    runs: list[RunSummary]
    limit: int
    offset: int


class InflectionPoint(_Result):
    """The step where the run went wrong, and which policy said so."""

    step_index: int
    policy_id: str | None
    decision_id: str | None
    reason: str | None


class StepDecision(_Result):
    """The admission decision that governed a step."""

    decision_id: str
    outcome: str
    policy_ids: list[str]
    reasons: list[dict[str, Any]]


class StepCost(_Result):
    """What a step cost, or why it could not be priced."""

    cost_id: str
    step_index: int
    model: str | None
    pricing_status: str
    input_cost_usd: Usd | None
    output_cost_usd: Usd | None
    total_cost_usd: Usd | None
    price_table_version: str | None


class TraceStep(_Result):
    """One step of a trace; a denied step never ran and has status ``denied``."""

    step_index: int
    kind: str | None
    model: str | None
    tool: str | None
    status: str
    input_tokens: int
    output_tokens: int
    duration_ms: float
    input: Any = None
    output: Any = None
    error: str | None
    occurred_at: Timestamp | None
    event_id: str | None
    decision: StepDecision | None
    cost: StepCost | None
    inflection: bool


class TraceResponse(_Result):
    """A run's steps in order, with their decisions and costs, and its inflection point."""

    run: Run
    steps: list[TraceStep]
    inflection_point: InflectionPoint | None


class ReplayResponse(_Result):
    """The run folded from the event store up to a point (``state`` null: nothing there yet).

    ``at_version`` is the run stream's version at that point and ``events_total`` how many
    events the run's stream holds (its last version), so a client stepping through
    ``at_version=1..events_total`` knows the end from one answer. ``at_step`` is the step the
    point is in: the highest step index among the events replayed (0 before the first step).
    """

    state: Run | None
    events_applied: int
    inflection_point: InflectionPoint | None
    at_position: int | None
    at_version: int
    at_step: int
    events_total: int


# --- incidents ------------------------------------------------------------------------------------


class AcknowledgeRequest(_Body):
    """Take ownership of an incident; ``by`` defaults to the API key's id."""

    by: By | None = None


class ResolveRequest(_Body):
    """Close an incident with its resolution."""

    resolution: Reason
    by: By | None = None


class Incident(_Result):
    """An incident and what was done about it."""

    incident_id: str
    violation_id: str
    run_id: str
    policy_id: str
    step_index: int
    severity: str
    status: str
    title: str
    trace_id: str | None
    opened_at: Timestamp | None
    acknowledged_at: Timestamp | None
    acknowledged_by: str | None
    resolved_at: Timestamp | None
    resolved_by: str | None
    resolution: str | None
    version: int


class IncidentList(_Result):
    """A page of incidents, newest first."""

    incidents: list[Incident]
    limit: int
    offset: int


# --- policies and costs ---------------------------------------------------------------------------


class PolicyView(_Result):
    """A policy of the active bundle, with the tenant's incidents under it."""

    policy_id: str
    title: str
    severity: str
    runbook_url: str | None
    description: str | None
    incident_count: int
    open_incidents: int


class CanaryState(_Result):
    """A reload in its canary: its bundle decides for ``percent`` % of runs."""

    reload_id: str
    bundle_digest: str
    percent: int


class EnvironmentBundleView(_Result):
    """What decides in one environment: the tenant's own bundle, or the default one (during a
    canary: for the runs outside it)."""

    bundle_digest: str
    source: Literal["tenant", "default"]
    revision: str | None = None
    canary: CanaryState | None = None


class PolicySettingsState(_Result):
    """The tenant's policy settings and their version (0: never set)."""

    version: int
    settings: dict[str, Any]


class PoliciesResponse(_Result):
    """The active policy bundle (null digest: none activated yet), what decides in each
    environment, and the tenant's settings."""

    bundle_digest: str | None
    activated_at: Timestamp | None
    policies: list[PolicyView]
    environments: dict[str, EnvironmentBundleView] = Field(default_factory=dict)
    settings: PolicySettingsState | None = None


class CostTotals(_Result):
    """Steps, tokens and priced cost of a group; unpriced steps are counted, never as zero."""

    steps: int
    priced_steps: int
    unpriced_steps: int
    input_tokens: int
    output_tokens: int
    total_cost_usd: Usd | None


class CostRow(CostTotals):
    """One group: a run, an agent or a model."""

    key: str | None


class CostsResponse(_Result):
    """Costs grouped by run, agent or model, and their totals."""

    group_by: CostGrouping
    rows: list[CostRow]
    totals: CostTotals


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


class PricesPublishedResponse(_Result):
    """The version of the custom price table just published."""

    version: int
    price_table_version: str


class PriceRow(_Result):
    """USD per token of one model (decimal strings), built in or the tenant's own."""

    model: str
    input_per_token: str
    output_per_token: str
    effective_from: str
    source: Literal["builtin", "override"]


class PriceListing(_Result):
    """The tenant's price table: its custom prices over the built-in ones."""

    version: int
    price_table_version: str
    prices: list[PriceRow]


# --- operations -----------------------------------------------------------------------------------


class RebuildResponse(_Result):
    """What a projection rebuild read and wrote."""

    events: int
    rows: dict[str, int]
    position: int | None
    duration_s: float


# --- errors ---------------------------------------------------------------------------------------


# --- people ---------------------------------------------------------------------------------------


class TokenRequest(_Body):
    """``POST /v1/auth/token``: a user of the embedded identity provider signs in."""

    username: str = Field(pattern=USER_ID_PATTERN, description="The user's id.")
    password: SecretStr = Field(min_length=1, max_length=1024)


class TokenResponse(_Result):
    """A short-lived bearer token and the roles its user held per tenant when it was issued."""

    access_token: str
    token_type: Literal["Bearer"]
    expires_in: int = Field(description="Seconds until the token expires.")
    tenants: dict[str, list[str]]


class WhoAmIResponse(_Result):
    """Who the presented credentials name."""

    kind: Literal["user", "api_key"]
    actor: str = Field(description="How the caller is named in the events it causes.")
    tenant_id: str
    roles: list[str]
    scopes: list[str]


class ErrorDetail(BaseModel):
    """A machine-readable code and a human-readable message."""

    code: str
    message: str


class ErrorResponse(BaseModel):
    """The body of every non-2xx response of the API."""

    error: ErrorDetail
