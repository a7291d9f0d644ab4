"""Every event type Mission Control publishes, at its current schema version.

Naming: ``<aggregate>.<past-tense fact>``. The NATS subject of an event is
``mc.evt.<tenant>.<event_type>`` (see ``libs.contracts.subjects``).
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, PlainSerializer, model_validator

from libs.contracts.envelope import DomainEvent
from libs.contracts.policy import PolicyHook
from libs.contracts.registry import register, upcaster
from libs.usage import require_consistent

Severity = Literal["low", "medium", "high", "critical"]
Outcome = Literal["allow", "warn", "deny"]
RunStatus = Literal["running", "completed", "failed", "stopped_by_policy"]

# Money travels as a plain decimal string ("0.0000001500", never "1.5E-7"), so every consumer,
# whatever its JSON library, reads the exact amount.
Usd = Annotated[
    Decimal, PlainSerializer(lambda d: format(d, "f"), return_type=str, when_used="json")
]
StepStatus = Literal["ok", "error"]
Irregularity = Literal["unadmitted", "duplicate", "out_of_order"]
"""How a recorded step broke the rules: ``unadmitted`` (no allowed admission of its index was
outstanding), ``duplicate`` (its index was recorded before), ``out_of_order`` (its index is
below the highest recorded, and it was not admitted while it was still ahead of that)."""
PolicyEnvironment = Literal["sandbox", "production"]
"""Where a bundle decides: agents in a sandbox, or in production."""
Enforcement = Literal["enforce", "warn"]
"""What a violation does: ``enforce`` stops the run and opens an incident; ``warn`` records it."""


# --- runs (owned by workflow-engine) -------------------------------------------------------------


@register
class RunStartedV1(DomainEvent):
    """Version 1 named the agent ``agent``; kept only so stored v1 events stay readable."""

    event_type = "run.started"
    schema_version = 1

    run_id: str
    agent: str


@register
class RunStarted(DomainEvent):
    """An agent run began."""

    event_type = "run.started"
    schema_version = 2

    run_id: str
    agent_id: str
    labels: dict[str, str] = Field(default_factory=dict)


@upcaster("run.started", 1)
def upcast_run_started_v1_v2(payload: dict[str, Any]) -> dict[str, Any]:
    """v1 → v2: ``agent`` was renamed ``agent_id`` and ``labels`` was added."""
    data = dict(payload)
    data["agent_id"] = data.pop("agent")
    data.setdefault("labels", {})
    return data


# Version 1 had no irregularities; kept so stored v1 events stay readable (its docstring is
# part of its published schema).
@register
class StepRecordedV1(DomainEvent):
    """A step of a run finished (successfully or not) and reported its outcome."""

    model_config = ConfigDict(title="StepRecorded")
    event_type = "run.step_recorded"
    schema_version = 1

    run_id: str
    agent_id: str
    step_index: int = Field(ge=1)
    kind: str = "llm_call"
    model: str | None = None
    tool: str | None = None
    status: StepStatus = "ok"
    input_tokens: int = Field(default=0, ge=0)
    output_tokens: int = Field(default=0, ge=0)
    duration_ms: float = Field(default=0, ge=0)
    input: Any = None
    output: Any = None
    error: str | None = None


# Version 2 had no cache or reasoning tokens; kept so stored v2 events stay readable.
@register
class StepRecordedV2(StepRecordedV1):
    """A step of a run finished (successfully or not) and reported its outcome.

    ``irregularities`` marks a step that was recorded against the rules (see
    :data:`Irregularity`): it is kept, never refused, and admission judges it as a violation of
    ``admission_required``. Empty for a step recorded as it should be.
    """

    event_type = "run.step_recorded"
    schema_version = 2

    irregularities: list[Irregularity] = Field(default_factory=list)


@register
class StepRecorded(StepRecordedV2):
    """A step of a run finished (successfully or not) and reported its outcome and usage.

    ``irregularities`` marks a step that was recorded against the rules (see
    :data:`Irregularity`): it is kept, never refused, and admission judges it as a violation of
    ``admission_required``. Empty for a step recorded as it should be.

    Usage (see ``libs.usage``): ``input_tokens`` counts every prompt token, of which
    ``cached_input_tokens`` were read from the provider's cache and ``cache_write_tokens`` were
    written to it; ``output_tokens`` counts every generated token, of which ``reasoning_tokens``
    were reasoning. A streamed call records its final usage. ``provider_cost_usd`` is the cost
    the provider itself reported for the call, if any, kept beside the computed cost.
    """

    event_type = "run.step_recorded"
    schema_version = 3

    cached_input_tokens: int = Field(default=0, ge=0)
    cache_write_tokens: int = Field(default=0, ge=0)
    reasoning_tokens: int = Field(default=0, ge=0)
    provider_cost_usd: Usd | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _usage_adds_up(self) -> StepRecorded:
        return require_consistent(self)


@upcaster("run.step_recorded", 1)
def upcast_step_recorded_v1_v2(payload: dict[str, Any]) -> dict[str, Any]:
    """v1 → v2: ``irregularities`` was added; a v1 step was judged by nothing, so none."""
    data = dict(payload)
    data.setdefault("irregularities", [])
    return data


@upcaster("run.step_recorded", 2)
def upcast_step_recorded_v2_v3(payload: dict[str, Any]) -> dict[str, Any]:
    """v2 → v3: cache, reasoning and provider-cost fields were added; a v2 step reported
    none, so its usage is all uncached input and plain output, exactly as it was priced."""
    data = dict(payload)
    for field in ("cached_input_tokens", "cache_write_tokens", "reasoning_tokens"):
        data.setdefault(field, 0)
    data.setdefault("provider_cost_usd", None)
    return data


@register
class RunCompleted(DomainEvent):
    """A run ended on its own: ``completed`` or ``failed``."""

    event_type = "run.completed"
    schema_version = 1

    run_id: str
    status: Literal["completed", "failed"]
    reason: str | None = None


@register
class RunStoppedByPolicy(DomainEvent):
    """A run was stopped because admission denied one of its steps."""

    event_type = "run.stopped_by_policy"
    schema_version = 1

    run_id: str
    step_index: int
    policy_id: str
    decision_id: str
    reason: str


# --- admission (owned by policy-admission) -------------------------------------------------------


class Reason(DomainEvent):
    """Why a policy said what it said."""

    event_type = "_reason"
    schema_version = 1

    policy_id: str
    severity: Severity
    message: str
    runbook_url: str | None = None


@register
class AdmissionDecided(DomainEvent):
    """Admission answered a before-step request."""

    event_type = "admission.decided"
    schema_version = 1

    decision_id: str
    run_id: str
    agent_id: str
    step_index: int
    outcome: Outcome
    reasons: list[Reason] = Field(default_factory=list)
    bundle_digest: str
    context: dict[str, Any] = Field(default_factory=dict)


# Version 1 had no enforcement (every violation was enforced); kept so stored v1 events stay
# readable (its docstring is part of its published schema).
@register
class PolicyViolationDetectedV1(DomainEvent):
    """A step was denied: the policy named would have been broken had the step run."""

    model_config = ConfigDict(title="PolicyViolationDetected")
    event_type = "policy.violation_detected"
    schema_version = 1

    violation_id: str
    decision_id: str
    run_id: str
    agent_id: str
    step_index: int
    policy_id: str
    severity: Severity
    message: str
    runbook_url: str | None = None
    bundle_digest: str
    trace_id: str | None = None


# Version 2 had no environment; kept so stored v2 events stay readable (its docstring is part of
# its published schema).
@register
class PolicyViolationDetectedV2(PolicyViolationDetectedV1):
    """A policy was broken, or would have been had the step run.

    Either admission denied a step before it ran (``decision_id`` is that decision), or a step
    was recorded against the rules (policy ``admission_required``; ``decision_id`` is the
    judgement's own id). ``enforcement`` says what follows: ``enforce`` stops the run and opens
    an incident, ``warn`` only records the violation.
    """

    model_config = ConfigDict(title="PolicyViolationDetected")
    event_type = "policy.violation_detected"
    schema_version = 2

    enforcement: Enforcement = "enforce"


@register
class PolicyViolationDetected(PolicyViolationDetectedV2):
    """A policy was broken, or would have been had the step run.

    Either admission denied a step before it ran (``decision_id`` is that decision), or a step
    was recorded against the rules (policy ``admission_required``; ``decision_id`` is the
    judgement's own id). ``enforcement`` says what follows: ``enforce`` stops the run and opens
    an incident, ``warn`` only records the violation. ``environment`` is the one the step was
    admitted for (a recorded step judged without admission counts as ``production``).
    """

    model_config = ConfigDict(title="PolicyViolationDetected")
    event_type = "policy.violation_detected"
    schema_version = 3

    environment: PolicyEnvironment = "production"


@upcaster("policy.violation_detected", 1)
def upcast_violation_detected_v1_v2(payload: dict[str, Any]) -> dict[str, Any]:
    """v1 → v2: ``enforcement`` was added; every v1 violation stopped its run."""
    data = dict(payload)
    data.setdefault("enforcement", "enforce")
    return data


@upcaster("policy.violation_detected", 2)
def upcast_violation_detected_v2_v3(payload: dict[str, Any]) -> dict[str, Any]:
    """v2 → v3: ``environment`` was added; before it every bundle decided for production."""
    data = dict(payload)
    data.setdefault("environment", "production")
    return data


class PolicyInfo(DomainEvent):
    """Metadata of one policy in a bundle."""

    event_type = "_policy_info"
    schema_version = 1

    policy_id: str
    title: str
    severity: Severity
    runbook_url: str | None = None
    description: str | None = None


# Version 1 had no environment, revision or signer; kept so stored v1 events stay readable (its
# docstring is part of its published schema).
@register
class PolicyBundleActivatedV1(DomainEvent):
    """A compiled policy bundle became the one admission decides with, for a tenant."""

    model_config = ConfigDict(title="PolicyBundleActivated")
    event_type = "policy.bundle_activated"
    schema_version = 1

    bundle_digest: str
    policies: list[PolicyInfo]
    data: dict[str, Any] = Field(default_factory=dict)


@register
class PolicyBundleActivated(PolicyBundleActivatedV1):
    """A policy bundle became the one admission decides with, for a tenant and environment.

    The repository's bundle is activated in ``system/policy/bundle`` (no revision, no signer).
    A tenant's uploaded bundle is activated in ``<tenant>/policy/bundles-<environment>`` by its
    digest, with the manifest's ``revision`` and the signing key (id and public key, so every
    replica can verify the stored archive again before it decides with it); ``data`` is then
    left empty (the archive holds it).
    """

    event_type = "policy.bundle_activated"
    schema_version = 2

    environment: Literal["sandbox", "production"] = "production"
    revision: str | None = None
    signer_key_id: str | None = None
    signer_public_key: str | None = None


@upcaster("policy.bundle_activated", 1)
def upcast_bundle_activated_v1_v2(payload: dict[str, Any]) -> dict[str, Any]:
    """v1 → v2: every v1 activation was the repository's bundle, for production."""
    data = dict(payload)
    data.setdefault("environment", "production")
    return data


@register
class PolicyBundleUploaded(DomainEvent):
    """A signed bundle archive was verified and stored (content-addressed by its sha256); it
    decides nothing until it is activated by that digest."""

    event_type = "policy.bundle_uploaded"
    schema_version = 1

    bundle_digest: str
    environment: Literal["sandbox", "production"]
    revision: str
    signer_key_id: str
    size_bytes: int = Field(ge=0)
    files: int = Field(ge=0)
    policies: list[PolicyInfo]


@register
class PolicySigningKeyRegistered(DomainEvent):
    """An ed25519 public key may sign the tenant's policy bundles from now on."""

    event_type = "policy.signing_key_registered"
    schema_version = 1

    key_id: str
    algorithm: Literal["EdDSA"] = "EdDSA"
    public_key: str
    fingerprint: str


@register
class PolicySigningKeyRetired(DomainEvent):
    """A signing key may no longer sign bundles: uploads and activations signed by it are
    refused. Bundles already active keep deciding. A retired key id is never reused."""

    event_type = "policy.signing_key_retired"
    schema_version = 1

    key_id: str
    reason: str | None = None


@register
class PolicySettingsChanged(DomainEvent):
    """The tenant's limits and allowlists (``PolicySettings``) as of ``version``; they replace
    the previous version whole."""

    event_type = "policy.settings_changed"
    schema_version = 1

    version: int = Field(ge=1)
    settings: dict[str, Any]


@register
class PolicyExceptionGranted(DomainEvent):
    """A time-bound waiver: denials of ``policy_id`` for one agent (``agent_id``) or one run
    (``run_id``) are admitted with a warning until ``expires_at`` (exclusive), because
    ``granted_by`` said so for ``reason``."""

    event_type = "policy.exception_granted"
    schema_version = 1

    exception_id: str
    policy_id: str
    agent_id: str | None = None
    run_id: str | None = None
    reason: str
    granted_by: str
    expires_at: datetime


@register
class PolicyExceptionRevoked(DomainEvent):
    """A waiver was withdrawn before its expiry: it applies to no decision from now on."""

    event_type = "policy.exception_revoked"
    schema_version = 1

    exception_id: str
    revoked_by: str
    reason: str | None = None


@register
class PolicyExceptionExpired(DomainEvent):
    """A waiver reached its ``expires_at`` and was closed. Decisions stopped applying it at that
    second already (they compare with their own clock); this records the fact."""

    event_type = "policy.exception_expired"
    schema_version = 1

    exception_id: str
    expires_at: datetime


@register
class PolicyDiffAcknowledged(DomainEvent):
    """A person acknowledged having viewed a diff (of two bundles or two agent specs), named by
    its ``diff_hash``; a promotion may require it. In ``<tenant>/policy/diff-<hex>``."""

    event_type = "policy.diff_acknowledged"
    schema_version = 1

    diff_hash: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    kind: Literal["documents", "bundles"]
    old: dict[str, str]
    new: dict[str, str]
    acknowledged_by: str = Field(min_length=1, max_length=200)
    acknowledged_at: datetime


# --- the agent registry (owned by policy-admission) ----------------------------------------------

AgentEnvironment = Literal["sandbox", "production"]


class AgentProblem(DomainEvent):
    """One thing wrong with an agent spec: ``code`` names it (``schema_invalid``,
    ``model_not_allowed``, ...), ``path`` points into the spec."""

    event_type = "_agent_problem"
    schema_version = 1

    code: str
    path: str
    message: str


@register
class AgentDraftSaved(DomainEvent):
    """A draft of ``version`` now holds ``spec`` (possibly partial). The first draft of an agent
    records its ``origin``; a save whose ``spec_hash`` equals the draft's records nothing."""

    event_type = "agent.draft_saved"
    schema_version = 1

    agent_id: str
    version: int = Field(ge=1)
    spec: dict[str, Any]
    spec_hash: str
    origin: str | None = None
    origin_ref: str | None = None


@register
class AgentValidated(DomainEvent):
    """``version`` (its spec ``spec_hash``) was checked against the schema and the policy set of
    ``environment`` (``policy_digest``, ``policy_set_hash``); ``passed`` unless ``problems``
    holds an error."""

    event_type = "agent.validated"
    schema_version = 1

    agent_id: str
    version: int = Field(ge=1)
    spec_hash: str
    environment: AgentEnvironment
    passed: bool
    problems: list[AgentProblem] = Field(default_factory=list)
    policy_digest: str
    policy_set_hash: str


@register
class AgentSandboxed(DomainEvent):
    """The draft ``version`` passed validation in the sandbox and may run there."""

    event_type = "agent.sandboxed"
    schema_version = 1

    agent_id: str
    version: int = Field(ge=1)
    spec_hash: str
    policy_digest: str
    policy_set_hash: str


@register
class AgentPromoted(DomainEvent):
    """The sandboxed ``from_version`` became the governed, immutable ``version``
    (``from_version + 1``), which production runs from now on."""

    event_type = "agent.promoted"
    schema_version = 1

    agent_id: str
    version: int = Field(ge=2)
    from_version: int = Field(ge=1)
    spec_hash: str
    environment: AgentEnvironment = "production"
    policy_digest: str
    policy_set_hash: str
    promoted_by: str


@register
class AgentForked(DomainEvent):
    """A new draft ``version`` (``from_version + 1``) was opened from the governed
    ``from_version``, which keeps running in production unchanged."""

    event_type = "agent.forked"
    schema_version = 1

    agent_id: str
    version: int = Field(ge=2)
    from_version: int = Field(ge=1)
    spec_hash: str


@register
class AgentDisabled(DomainEvent):
    """The agent may no longer run in ``environments``; admission denies its runs there."""

    event_type = "agent.disabled"
    schema_version = 1

    agent_id: str
    version: int = Field(ge=1)
    environments: list[AgentEnvironment] = Field(min_length=1)
    reason: str
    disabled_by: str


@register
class PolicyCanaryStarted(DomainEvent):
    """A reload of ``bundle_digest`` began as a canary: it decides for ``plan.percent`` % of the
    runs (by a stable hash of the run id) while ``stable_digest`` (the previous bundle; the
    repository's when ``stable_source`` is ``default``) keeps deciding for the rest."""

    event_type = "policy.canary_started"
    schema_version = 1

    reload_id: str
    environment: Literal["sandbox", "production"]
    bundle_digest: str
    revision: str | None = None
    stable_digest: str
    stable_source: Literal["tenant", "default"]
    plan: dict[str, Any]
    by: str


@register
class PolicyCanaryPromoted(DomainEvent):
    """The reload ``reload_id`` now decides for every run: its canary passed (``reason``
    ``window_passed``), an operator promoted it (``operator``), or the activation asked for no
    canary (``immediate``). ``figures`` is the impact report of the canary against the stable
    bundle."""

    event_type = "policy.canary_promoted"
    schema_version = 1

    reload_id: str
    environment: Literal["sandbox", "production"]
    bundle_digest: str
    stable_digest: str
    reason: str
    by: str
    figures: dict[str, Any] = Field(default_factory=dict)


@register
class PolicyCanaryRolledBack(DomainEvent):
    """The reload ``reload_id`` was withdrawn and ``restored_digest`` (the bundle it was tried
    against) decides for every run again: ``reason`` is ``evaluation_errors``, ``deny_rate``,
    ``latency`` (the figures crossed the plan's bounds) or ``operator`` (aborted by ``by``)."""

    event_type = "policy.canary_rolled_back"
    schema_version = 1

    reload_id: str
    environment: Literal["sandbox", "production"]
    bundle_digest: str
    restored_digest: str
    reason: str
    detail: str = ""
    by: str
    figures: dict[str, Any] = Field(default_factory=dict)


@register
class PolicyChaosRan(DomainEvent):
    """A chaos case was run against the policy engine in a non-production environment:
    ``case`` (``partial_reload_failure``, ``conflicting_policies`` or ``expiry_storm``),
    whether the engine kept deciding with its last good bundle, and the figures measured."""

    event_type = "policy.chaos_ran"
    schema_version = 1

    case: str
    environment: Literal["sandbox", "production"]
    kept_deciding: bool
    figures: dict[str, Any] = Field(default_factory=dict)
    by: str


class LockedField(DomainEvent):
    """A field of the subject that a policy locks: the caller may show it, not change it."""

    event_type = "_locked_field"
    schema_version = 1

    policy_id: str
    field: str
    message: str | None = None


class Mutation(DomainEvent):
    """A change a policy proposes to the subject (``op`` on the dotted ``path``); applying it is
    the caller's choice."""

    event_type = "_mutation"
    schema_version = 1

    policy_id: str
    op: Literal["add", "replace", "remove"]
    path: str
    value: Any = None
    message: str | None = None


class HookDecided(DomainEvent):
    """A lifecycle hook's decision on one subject: deny when anything is violated, else warn
    when anything warns (or a policy exception, named in ``exceptions``, waived the
    violations), else allow. Locked fields and mutations never change the outcome."""

    event_type = "_hook_decided"
    schema_version = 1

    hook: PolicyHook
    outcome: Outcome
    violations: list[Reason] = Field(default_factory=list)
    warnings: list[Reason] = Field(default_factory=list)
    locked_fields: list[LockedField] = Field(default_factory=list)
    mutations: list[Mutation] = Field(default_factory=list)
    exceptions: list[str] = Field(default_factory=list)
    bundle_digest: str


@register
class PolicyHookEvaluated(HookDecided):
    """A lifecycle hook's policies decided on one subject (an agent, or a run's recorded step
    for ``after_execute``). ``before_execute`` is admission's ``admission.decided``."""

    event_type = "policy.hook_evaluated"
    schema_version = 1

    decision_id: str
    subject: str
    environment: str


# --- incidents (owned by incident) ---------------------------------------------------------------


# Version 1 had no environment; kept so stored v1 events stay readable.
@register
class IncidentOpenedV1(DomainEvent):
    """An incident was opened for a policy violation."""

    model_config = ConfigDict(title="IncidentOpened")
    event_type = "incident.opened"
    schema_version = 1

    incident_id: str
    violation_id: str
    run_id: str
    agent_id: str
    policy_id: str
    step_index: int
    severity: Severity
    title: str
    trace_id: str | None = None


@register
class IncidentOpened(IncidentOpenedV1):
    """An incident was opened for a policy violation, in the environment the violating step was
    admitted for (a budget incident counts as ``production``)."""

    model_config = ConfigDict(title="IncidentOpened")
    event_type = "incident.opened"
    schema_version = 2

    environment: PolicyEnvironment = "production"


@upcaster("incident.opened", 1)
def upcast_incident_opened_v1_v2(payload: dict[str, Any]) -> dict[str, Any]:
    """v1 → v2: ``environment`` was added; before it every incident came from production."""
    data = dict(payload)
    data.setdefault("environment", "production")
    return data


@register
class IncidentAcknowledged(DomainEvent):
    """Somebody took ownership of an incident."""

    event_type = "incident.acknowledged"
    schema_version = 1

    incident_id: str
    by: str


@register
class IncidentResolved(DomainEvent):
    """An incident was closed, with the resolution recorded."""

    event_type = "incident.resolved"
    schema_version = 1

    incident_id: str
    by: str
    resolution: str


# --- cost (owned by cost) ------------------------------------------------------------------------


class ModelPrice(DomainEvent):
    """USD price per token of one model, valid from ``effective_from``."""

    event_type = "_model_price"
    schema_version = 1

    model: str
    input_per_token: Usd
    output_per_token: Usd
    effective_from: str = "1970-01-01T00:00:00+00:00"


class ComponentPrice(DomainEvent):
    """USD per token of each usage component of one model, valid from ``effective_from``.

    ``input_per_token`` prices uncached prompt tokens, ``cached_input_per_token`` prompt tokens
    read from the cache, ``cache_write_per_token`` prompt tokens written to it,
    ``output_per_token`` generated tokens other than reasoning and ``reasoning_per_token``
    reasoning tokens (most providers bill them as output, at the output price).
    """

    event_type = "_component_price"
    schema_version = 1

    model: str
    input_per_token: Usd
    cached_input_per_token: Usd
    cache_write_per_token: Usd
    output_per_token: Usd
    reasoning_per_token: Usd
    effective_from: str = "1970-01-01T00:00:00+00:00"


@register
class PriceTablePublishedV1(DomainEvent):
    """A tenant's custom prices changed; ``version`` is the new price-table version."""

    model_config = ConfigDict(title="PriceTablePublished")
    event_type = "cost.price_table_published"
    schema_version = 1

    version: int
    prices: list[ModelPrice]


@register
class PriceTablePublished(DomainEvent):
    """A tenant's custom prices changed; ``version`` is the new price-table version.

    Every price names all five usage components (see :class:`ComponentPrice`).
    """

    event_type = "cost.price_table_published"
    schema_version = 2

    version: int
    prices: list[ComponentPrice]


@upcaster("cost.price_table_published", 1)
def upcast_price_table_published_v1_v2(payload: dict[str, Any]) -> dict[str, Any]:
    """v1 → v2: a v1 price knew input and output only, and priced every prompt token at the
    input price and every generated token at the output price: so cached reads and cache writes
    keep the input price and reasoning the output price, as they were charged."""
    data = dict(payload)
    prices = []
    for price in data.get("prices", []):
        p = dict(price)
        p.setdefault("cached_input_per_token", p.get("input_per_token"))
        p.setdefault("cache_write_per_token", p.get("input_per_token"))
        p.setdefault("reasoning_per_token", p.get("output_per_token"))
        prices.append(p)
    data["prices"] = prices
    return data


PricingStatus = Literal["priced", "unpriced", "no_model"]


# Version 1 priced input and output tokens only; kept so stored v1 events stay readable.
@register
class CostRecordedV1(DomainEvent):
    """The cost of one recorded step, with the price-table version used to compute it."""

    model_config = ConfigDict(title="CostRecorded")
    event_type = "cost.recorded"
    schema_version = 1

    cost_id: str
    run_id: str
    agent_id: str
    step_index: int
    model: str | None
    input_tokens: int
    output_tokens: int
    pricing_status: PricingStatus
    input_cost_usd: Usd | None
    output_cost_usd: Usd | None
    total_cost_usd: Usd | None
    price_table_version: str


@register
class CostRecorded(CostRecordedV1):
    """The cost of one recorded step, per usage component, with the price-table version used.

    The token counts are the step's (see ``libs.usage``). ``input_cost_usd`` prices the
    uncached input, ``cached_input_cost_usd`` the cache reads, ``cache_write_cost_usd`` the cache
    writes, ``output_cost_usd`` the output other than reasoning and ``reasoning_cost_usd`` the
    reasoning; ``total_cost_usd`` is their sum. When the step carried the provider's own figure,
    ``provider_cost_usd`` holds it, ``cost_difference_usd`` is provider minus computed, and
    ``cost_mismatch`` flags a difference beyond the tolerance (``libs.pricing``).
    """

    event_type = "cost.recorded"
    schema_version = 2

    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cached_input_cost_usd: Usd | None = None
    cache_write_cost_usd: Usd | None = None
    reasoning_cost_usd: Usd | None = None
    provider_cost_usd: Usd | None = None
    cost_difference_usd: Usd | None = None
    cost_mismatch: bool = False


@upcaster("cost.recorded", 1)
def upcast_cost_recorded_v1_v2(payload: dict[str, Any]) -> dict[str, Any]:
    """v1 → v2: a v1 cost had no cache or reasoning tokens, so those components cost nothing
    (none when the step was unpriced), and no provider figure was kept."""
    data = dict(payload)
    for field in ("cached_input_tokens", "cache_write_tokens", "reasoning_tokens"):
        data.setdefault(field, 0)
    nothing = None if data.get("pricing_status") == "unpriced" else "0"
    for field in ("cached_input_cost_usd", "cache_write_cost_usd", "reasoning_cost_usd"):
        data.setdefault(field, nothing)
    data.setdefault("provider_cost_usd", None)
    data.setdefault("cost_difference_usd", None)
    data.setdefault("cost_mismatch", False)
    return data


# --- tenants (owned by gateway) ------------------------------------------------------------------


@register
class TenantCreated(DomainEvent):
    """A tenant was created."""

    event_type = "tenant.created"
    schema_version = 1

    tenant_id: str
    name: str


# --- workflow definitions and the agent catalogue (owned by workflow-engine) ---------------------


@register
class AgentRegistered(DomainEvent):
    """An agent was added to the tenant's catalogue, so workflow steps may name it."""

    event_type = "agent.registered"
    schema_version = 1

    agent_id: str
    description: str = ""


@register
class WorkflowDefinitionCreated(DomainEvent):
    """Version 1 of a workflow definition was saved (``document`` is the validated document)."""

    event_type = "workflow.definition_created"
    schema_version = 1

    workflow_id: str
    version: int = Field(ge=1)
    document: dict[str, Any]
    document_hash: str


@register
class WorkflowDefinitionRevised(DomainEvent):
    """A later version of a workflow definition was saved."""

    event_type = "workflow.definition_revised"
    schema_version = 1

    workflow_id: str
    version: int = Field(ge=2)
    document: dict[str, Any]
    document_hash: str
    previous_hash: str


# --- workflow executions (owned by workflow-engine) ----------------------------------------------


@register
class ExecutionStarted(DomainEvent):
    """An execution of a workflow version began; ``document`` is that version's definition."""

    event_type = "execution.started"
    schema_version = 1

    execution_id: str
    workflow_id: str
    workflow_version: int = Field(ge=1)
    document_hash: str
    document: dict[str, Any]
    inputs: dict[str, Any] = Field(default_factory=dict)
    approvals: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """The tenant's approval rule of each risk tier when the execution started (fixed for it)."""
    started_at: datetime


@register
class StepDispatched(DomainEvent):
    """An attempt of a step was handed to its agent's work queue, as the governed run ``run_id``."""

    event_type = "execution.step_dispatched"
    schema_version = 1

    execution_id: str
    step_id: str
    attempt: int = Field(ge=1)
    run_id: str
    agent_id: str
    workflow_id: str
    inputs: dict[str, Any] = Field(default_factory=dict)
    risk_tier: Literal["read_only", "write", "irreversible"]
    dispatched_at: datetime
    deadline_at: datetime


@register
class StepAttemptCompleted(DomainEvent):
    """An attempt's run completed: the step is done."""

    event_type = "execution.step_completed"
    schema_version = 1

    execution_id: str
    step_id: str
    attempt: int = Field(ge=1)
    run_id: str
    finished_at: datetime


@register
class StepAttemptFailed(DomainEvent):
    """An attempt failed or timed out; it is tried again at ``retry_at`` (None: no retry left)."""

    event_type = "execution.step_failed"
    schema_version = 1

    execution_id: str
    step_id: str
    attempt: int = Field(ge=1)
    run_id: str
    reason: str
    retry_at: datetime | None = None
    finished_at: datetime


@register
class StepAttemptBlocked(DomainEvent):
    """Admission stopped an attempt's run: the step is blocked by policy."""

    event_type = "execution.step_blocked"
    schema_version = 1

    execution_id: str
    step_id: str
    attempt: int = Field(ge=1)
    run_id: str
    reason: str
    finished_at: datetime


@register
class ExecutionCompleted(DomainEvent):
    """Every step of an execution ended (completed, or failed where failure may continue)."""

    event_type = "execution.completed"
    schema_version = 1

    execution_id: str
    finished_at: datetime


@register
class ExecutionFailed(DomainEvent):
    """An execution failed because of ``step_id``: its attempts were used up, or it was blocked."""

    event_type = "execution.failed"
    schema_version = 1

    execution_id: str
    step_id: str
    reason: str
    finished_at: datetime


@register
class ExecutionAborted(DomainEvent):
    """An operator aborted an execution."""

    event_type = "execution.aborted"
    schema_version = 1

    execution_id: str
    reason: str
    finished_at: datetime


# --- budgets (owned by workflow-engine) ----------------------------------------------------------

BudgetScope = Literal["tenant", "agent", "workflow", "execution"]
BudgetWindow = Literal["day", "month", "execution"]


@register
class BudgetSet(DomainEvent):
    """A budget was set (or its cap changed): ``cap_usd`` per ``window`` for ``scope/subject``.

    ``subject`` is the agent, workflow or execution id (empty for the tenant scope). A ``day`` or
    ``month`` window is a calendar window in the tenant's time zone; an ``execution`` window is
    each execution on its own.
    """

    event_type = "budget.set"
    schema_version = 1

    budget_id: str
    scope: BudgetScope
    subject: str = ""
    window: BudgetWindow
    cap_usd: Usd


@register
class BudgetTimezoneSet(DomainEvent):
    """The time zone the tenant's day and month budget windows follow (IANA name)."""

    event_type = "budget.timezone_set"
    schema_version = 1

    timezone: str


@register
class BudgetThresholdCrossed(DomainEvent):
    """A budget's committed spend (spent + reserved) reached ``threshold_pct`` of its cap in one
    window: once per threshold (80, 90, 100) per window."""

    event_type = "budget.threshold_crossed"
    schema_version = 1

    budget_id: str
    scope: BudgetScope
    subject: str = ""
    window: BudgetWindow
    window_key: str
    threshold_pct: int = Field(ge=1, le=100)
    cap_usd: Usd
    spent_usd: Usd
    reserved_usd: Usd
    run_id: str | None = None


@register
class ExecutionBudgetExceeded(DomainEvent):
    """A budget halted an execution: before its first step (its whole estimate is over a cap),
    or at ``step_id``'s dispatch (reserving its estimate would take the window over the cap)."""

    event_type = "execution.budget_exceeded"
    schema_version = 1

    execution_id: str
    step_id: str | None = None
    budget_id: str
    scope: BudgetScope
    subject: str = ""
    window: BudgetWindow
    window_key: str
    cap_usd: Usd
    committed_usd: Usd
    estimate_usd: Usd
    reason: str
    finished_at: datetime


@register
class StepStopped(DomainEvent):
    """A budget stopped a running attempt mid-way, on the usage its worker streamed.

    The attempt's call ``step_index`` had used the tokens below so far (cumulative, as the worker
    reported them), costing ``streamed_cost_usd``; with that, budget ``budget_id``'s window would
    have gone over its cap (spent + what others reserved + streamed > cap). The step is blocked,
    its run ended and the worker told to abort; ``execution.failed`` follows with ``reason``.
    """

    event_type = "execution.step_stopped"
    schema_version = 1

    execution_id: str
    step_id: str
    attempt: int = Field(ge=1)
    run_id: str
    step_index: int = Field(ge=1)
    model: str | None = None
    input_tokens: int = Field(default=0, ge=0)
    cached_input_tokens: int = Field(default=0, ge=0)
    cache_write_tokens: int = Field(default=0, ge=0)
    output_tokens: int = Field(default=0, ge=0)
    reasoning_tokens: int = Field(default=0, ge=0)
    streamed_cost_usd: Usd
    budget_id: str
    window_key: str
    cap_usd: Usd
    committed_usd: Usd
    """What the window held besides this attempt's own hold: spent plus others' reservations."""
    reason: str
    stopped_at: datetime

    @model_validator(mode="after")
    def _usage_adds_up(self) -> StepStopped:
        return require_consistent(self)


@register
class ApprovalRequested(DomainEvent):
    """A ready step's risk tier needs approval before it is dispatched."""

    event_type = "execution.approval_requested"
    schema_version = 1

    execution_id: str
    step_id: str
    risk_tier: str
    required: int = Field(ge=1)
    role: str
    requested_at: datetime
    expires_at: datetime


@register
class StepApproved(DomainEvent):
    """A person approved a step waiting for approval (``approver`` is their identity)."""

    event_type = "execution.step_approved"
    schema_version = 1

    execution_id: str
    step_id: str
    approver: str
    role: str
    reason: str
    approved_at: datetime


@register
class StepRejected(DomainEvent):
    """A step waiting for approval was rejected, by a person or by its SLA running out."""

    event_type = "execution.step_rejected"
    schema_version = 1

    execution_id: str
    step_id: str
    rejected_by: str
    reason: str
    rejected_at: datetime


@register
class ApprovalEscalated(DomainEvent):
    """A step's approval SLA ran out and the request now needs ``role``, with a new deadline."""

    event_type = "execution.approval_escalated"
    schema_version = 1

    execution_id: str
    step_id: str
    role: str
    escalated_at: datetime
    expires_at: datetime


@register
class ApprovalPolicySet(DomainEvent):
    """A tenant set the approvals each risk tier needs (``rules``: tier → rule)."""

    event_type = "approval_policy.set"
    schema_version = 1

    rules: dict[str, dict[str, Any]]


# --- people and credentials (owned by gateway) ---------------------------------------------------
# Users are global (one login, roles per tenant): their creation and disabling are recorded in the
# system's own streams, each grant and revocation in the stream of the tenant it concerns, so a
# tenant's log alone tells who could act in it and since when.

Role = Literal["viewer", "operator", "approver", "admin"]
KeyScope = Literal["ingest", "admit", "read"]


@register
class UserCreated(DomainEvent):
    """A user of the embedded identity provider was created (the password is never recorded)."""

    event_type = "user.created"
    schema_version = 1

    user_id: str


@register
class UserDisabled(DomainEvent):
    """A user was disabled: every token of theirs is refused from now on."""

    event_type = "user.disabled"
    schema_version = 1

    user_id: str


@register
class UserRoleGranted(DomainEvent):
    """A user was given a role in the tenant of the event."""

    event_type = "user.role_granted"
    schema_version = 1

    user_id: str
    role: Role


@register
class UserRoleRevoked(DomainEvent):
    """A user's role in the tenant of the event was taken away."""

    event_type = "user.role_revoked"
    schema_version = 1

    user_id: str
    role: Role


@register
class ApiKeyIssued(DomainEvent):
    """An API key of the tenant of the event was issued (its secret is never recorded)."""

    event_type = "api_key.issued"
    schema_version = 1

    key_id: str
    name: str
    scopes: list[KeyScope]


@register
class ApiKeyRevoked(DomainEvent):
    """An API key of the tenant of the event was revoked."""

    event_type = "api_key.revoked"
    schema_version = 1

    key_id: str


# --- the event store's anchors (written by the relay's host, libs/eventbus/anchor.py) ------------


@register
class AnchorCheckpointed(DomainEvent):
    """A signed Merkle root over every stream head of the event store was taken.

    ``horizon_xid``: the heads are each stream's last event with ``log_xid`` below it.
    ``merkle_root``: RFC 6962 root (hex) over the heads sorted by stream id. ``signature``:
    ed25519 (hex) over the RFC 8785 JSON of the other fields, by the key ``key_id`` names.
    """

    event_type = "anchor.checkpointed"
    schema_version = 1

    seq: int = Field(ge=1)
    horizon_xid: str = Field(pattern=r"^[0-9]{1,20}$")
    streams: int = Field(ge=0)
    events: int = Field(ge=0)
    merkle_root: str = Field(pattern=r"^[0-9a-f]{64}$")
    key_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    signature: str = Field(pattern=r"^([0-9a-f]{128})?$")


# --- promotion freeze (owned by policy-admission) ------------------------------------------


@register
class PolicyFreezeStarted(DomainEvent):
    """An incident at or above the tenant's freeze severity opened: promotions into its
    environment are frozen until it is resolved (or an admin overrides)."""

    event_type = "policy.freeze_started"
    schema_version = 1

    environment: PolicyEnvironment
    incident_id: str
    severity: Severity
    threshold: Severity
    title: str


@register
class PolicyFreezeLifted(DomainEvent):
    """The incident that froze promotions was resolved; the freeze holds while another does."""

    event_type = "policy.freeze_lifted"
    schema_version = 1

    environment: PolicyEnvironment
    incident_id: str
    resolved_by: str


@register
class PolicyFreezeOverridden(DomainEvent):
    """An admin let promotions through despite the freezing incidents named, with a reason.
    An incident opened later freezes again."""

    event_type = "policy.freeze_overridden"
    schema_version = 1

    environment: PolicyEnvironment
    incident_ids: list[str]
    by: str
    reason: str


# --- promotions (owned by workflow-engine) -------------------------------------------------------
# Stream ``<t>/promotion/<promotion_id>``: a request to move one agent version into an
# environment, its approvals (the workflow engine's approval gates: production is the
# ``irreversible`` tier, the sandbox the ``write`` tier) and how it ended.

PromotionTier = Literal["write", "irreversible"]


@register
class PromotionRequested(DomainEvent):
    """``requested_by`` asked to move ``agent_version`` of ``agent_id`` into ``environment``,
    as the agent and the environment's policy set stood then; ``rule`` is the approval rule of
    ``tier`` in force (``required`` 0: no approval needed)."""

    event_type = "promotion.requested"
    schema_version = 1

    promotion_id: str
    agent_id: str
    agent_version: int = Field(ge=1)
    spec_hash: str
    agent_state: str
    environment: PolicyEnvironment
    policy_digest: str
    policy_set_hash: str
    diff_hash: str | None = None
    reason: str | None = None
    requested_by: str
    approvers: list[str] = Field(default_factory=list)
    tier: PromotionTier
    rule: dict[str, Any]
    requested_at: datetime
    expires_at: datetime | None = None


@register
class PromotionApproved(DomainEvent):
    """``approver``, holding ``role``, approved the request."""

    event_type = "promotion.approved"
    schema_version = 1

    promotion_id: str
    approver: str
    role: str
    reason: str
    approved_at: datetime


@register
class PromotionRejected(DomainEvent):
    """``rejected_by`` rejected (or, as its requester, withdrew) the request."""

    event_type = "promotion.rejected"
    schema_version = 1

    promotion_id: str
    rejected_by: str
    reason: str
    rejected_at: datetime


@register
class PromotionEscalated(DomainEvent):
    """The request's approval SLA ran out: it now needs ``role``, until ``expires_at``."""

    event_type = "promotion.escalated"
    schema_version = 1

    promotion_id: str
    role: str
    escalated_at: datetime
    expires_at: datetime


@register
class PromotionExpired(DomainEvent):
    """The request's approval SLA ran out (after its escalation, if any): it is closed."""

    event_type = "promotion.expired"
    schema_version = 1

    promotion_id: str
    reason: str
    expired_at: datetime


@register
class PromotionWentStale(DomainEvent):
    """The agent or the environment's policy set changed after the request was made (each of
    ``reasons`` names what): the request is closed; a new one must be made."""

    event_type = "promotion.went_stale"
    schema_version = 1

    promotion_id: str
    reasons: list[str] = Field(min_length=1)
    detected_during: Literal["approve", "execute"]
    detected_at: datetime


@register
class PromotionExecuted(DomainEvent):
    """The approved request was carried out: ``agent_version`` of the agent now runs in
    ``environment``, admitted with ``policy_digest`` and ``policy_set_hash``."""

    event_type = "promotion.executed"
    schema_version = 1

    promotion_id: str
    agent_id: str
    environment: PolicyEnvironment
    from_version: int = Field(ge=1)
    agent_version: int = Field(ge=1)
    policy_digest: str
    policy_set_hash: str
    executed_by: str
    executed_at: datetime


# --- policy drift between environments (owned by policy-admission) ----------------------------


@register
class PolicyDriftDetected(DomainEvent):
    """A comparison found the tenant's sandbox and production deciding with different policy:
    ``dimensions`` names where they differ, ``snapshots`` holds each environment's hashes and
    ``fingerprint`` names the pair (the same drift found again records nothing)."""

    event_type = "policy.drift_detected"
    schema_version = 1

    fingerprint: str
    dimensions: list[str]
    snapshots: dict[str, dict[str, str]]


@register
class PolicyDriftResolved(DomainEvent):
    """The environments decide with the same policy again; the drift ``fingerprint`` is over."""

    event_type = "policy.drift_resolved"
    schema_version = 1

    fingerprint: str


@register
class PolicyDriftAcknowledged(DomainEvent):
    """An operator accepted the drift ``fingerprint`` with a reason; it no longer blocks
    promotions (drift that changes blocks again)."""

    event_type = "policy.drift_acknowledged"
    schema_version = 1

    fingerprint: str
    by: str
    reason: str


# --- compliance attestations (owned by audit-replay) ---------------------------------------------


@register
class AttestationGenerated(DomainEvent):
    """A compliance attestation (``standard``: SOC2 or ISO 27001) of the tenant's period
    ``[period_from, period_to)`` was generated, read from the store up to ``as_of_position`` at
    ``generated_at``; ``json_sha256`` and ``pdf_sha256`` are its two files' hashes, signed by the
    evidence key ``key_id``, against checkpoint ``checkpoint_seq`` (``None``: none existed). The
    same pin regenerates the same files. In ``<tenant>/attestation/history``."""

    event_type = "evidence.attestation_generated"
    schema_version = 1

    attestation_id: str
    standard: Literal["soc2", "iso27001"]
    period_from: datetime
    period_to: datetime
    as_of_position: int = Field(ge=0)
    generated_at: datetime
    json_sha256: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    pdf_sha256: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    key_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    checkpoint_seq: int | None = None
    requested_by: str
