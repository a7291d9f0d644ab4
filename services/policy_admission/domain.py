"""Admission's pure core: the run context it decides on, the Rego input, and the decision events.

No I/O here. The handler loads the run context through the repository (the shared run fold plus
prices, reservations and violations, see ``fold_events``), builds the input with
:func:`build_input`, lets the bundle evaluate it, reads the result with :func:`interpret` and
appends what :func:`decide` returns.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from libs.contracts.envelope import DomainEvent, EventEnvelope
from libs.contracts.events import (
    AdmissionDecided,
    Enforcement,
    Outcome,
    PolicyViolationDetected,
    Reason,
    RunStatus,
    RunStoppedByPolicy,
    StepRecorded,
)
from libs.contracts.limits import MAX_KIND, MAX_NAME, MAX_TOKENS, RUN_ID_PATTERN
from libs.contracts.policy import DEFAULT_ENVIRONMENT, Environment
from libs.contracts.registry import decode
from libs.domain.run import RunState, empty_run
from libs.domain.run import fold as fold_run
from libs.errors import InvalidInput, PermanentError
from libs.pricing import PriceTable, price_recorded, price_step

# The policy the Rego aggregator reports for stopped, finished or already-violating runs.
RUN_STATE_POLICY = "run_state"

# The policy a step recorded against the rules breaks: without an allowed admission, a second
# time, or out of order. Judged here when the step is recorded, not at an admission.
ADMISSION_REQUIRED = "admission_required"
ADMISSION_REQUIRED_SETTING = "admission_required"
ADMISSION_REQUIRED_RUNBOOK = (
    "https://github.com/mission-control/mission-control/blob/main/policy-bundle/runbooks/"
    "admission_required.md"
)
ENFORCEMENTS: tuple[Enforcement, ...] = ("enforce", "warn")

# Fixed forever: a judgement's id is derived from the step event it judges, so a redelivered
# step is never judged twice.
JUDGEMENT_NAMESPACE = uuid.UUID("0b3c9a57-2d41-5e8f-a6c7-3f9e1d2b4a60")

_SEVERITY_RANK = {"critical": 0, "high": 1, "medium": 2, "low": 3}


# --- the request ---------------------------------------------------------------------------------


class StepEstimate(BaseModel):
    """What the caller expects the step to consume, before it runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_tokens: int = Field(ge=0, le=MAX_TOKENS)
    max_output_tokens: int = Field(ge=0, le=MAX_TOKENS)


class AdmitRequest(BaseModel):
    """The body of ``admission.admit`` (without ``tenant_id``, which the gateway sets).

    Unknown fields are refused rather than ignored: a misspelt ``model`` or ``tool`` would
    otherwise skip its allowlist silently.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_id: str = Field(pattern=RUN_ID_PATTERN)
    step_index: int = Field(ge=1)
    kind: str = Field(default="llm_call", min_length=1, max_length=MAX_KIND)
    model: str | None = Field(default=None, min_length=1, max_length=MAX_NAME)
    tool: str | None = Field(default=None, min_length=1, max_length=MAX_NAME)
    estimate: StepEstimate
    environment: Environment | None = None
    """Which of the tenant's bundles decides: ``production`` (when left out) or ``sandbox``."""

    @property
    def bundle_environment(self) -> Environment:
        """The environment whose bundle decides."""
        return self.environment or DEFAULT_ENVIRONMENT


def parse_request(body: dict[str, Any]) -> AdmitRequest:
    """``body`` as an :class:`AdmitRequest`; :class:`InvalidInput` naming every bad field."""
    try:
        return AdmitRequest.model_validate(body)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
            for err in exc.errors()
        )
        raise InvalidInput(f"invalid admit request: {problems}") from None


# --- the run context -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RunContext:
    """What admission knows about a run: the run stream's shared fold plus admission's own view.

    ``run`` is the run as :mod:`libs.domain.run` folds it (status, agent, steps, tokens). On top
    of it admission keeps what only it knows: ``cost_usd`` sums the priced steps only;
    ``unpriced_steps`` counts the steps whose model had no price, so a cost that is a lower bound
    is visible as one. ``violated`` lists the policies a step of this run was already denied by,
    in order, without repeats.

    ``reservations`` holds, per step index, the estimate (tokens, USD or None) of every step that
    was admitted but has not recorded its outcome yet. Policies count them as spent, which is
    what keeps steps admitted in parallel from overrunning a budget together. Recording the
    step releases its reservation; admitting the same step again replaces it.
    """

    tenant_id: str
    run_id: str
    run: RunState = None  # type: ignore[assignment]  # the empty run, set in __post_init__
    cost_usd: Decimal = Decimal(0)
    unpriced_steps: int = 0
    violated: tuple[str, ...] = ()
    reservations: tuple[tuple[int, int, Decimal | None], ...] = ()
    judged: frozenset[str] = frozenset()
    """Ids of the violations recorded for this run (a judgement is recorded at most once)."""

    def __post_init__(self) -> None:
        if self.run is None:
            object.__setattr__(self, "run", empty_run(self.tenant_id, self.run_id))

    @property
    def status(self) -> RunStatus | None:
        """The run's status; ``None`` before it started."""
        return None if self.run.status == "new" else self.run.status

    @property
    def agent_id(self) -> str | None:
        """The run's agent, once an event named it."""
        return self.run.agent_id or None

    @property
    def steps_recorded(self) -> int:
        """How many steps reported their outcome."""
        return len(self.run.steps)

    @property
    def last_step_index(self) -> int:
        """The highest step index recorded."""
        return self.run.last_step_index

    @property
    def tokens_used(self) -> int:
        """Tokens the recorded steps used."""
        return self.run.tokens_used

    @property
    def tokens_reserved(self) -> int:
        """Tokens held by admitted, unrecorded steps."""
        return sum(tokens for _, tokens, _ in self.reservations)

    @property
    def cost_reserved_usd(self) -> Decimal:
        """USD held by admitted, unrecorded steps (unpriced estimates hold nothing)."""
        return sum((cost for _, _, cost in self.reservations if cost is not None), Decimal(0))

    def as_input(self) -> dict[str, Any]:
        """The ``input.run`` document (JSON types only)."""
        return {
            "run_id": self.run_id,
            "agent_id": self.agent_id,
            "status": self.status,
            "steps_recorded": self.steps_recorded,
            "last_step_index": self.last_step_index,
            "tokens_used": self.tokens_used,
            "cost_usd": float(self.cost_usd),
            "unpriced_steps": self.unpriced_steps,
            "violated": list(self.violated),
            "tokens_reserved": self.tokens_reserved,
            "cost_reserved_usd": float(self.cost_reserved_usd),
        }


def _with_violation(state: RunContext, policy_id: str) -> RunContext:
    if policy_id in state.violated:
        return state
    return replace(state, violated=(*state.violated, policy_id))


def _release(
    reservations: tuple[tuple[int, int, Decimal | None], ...], step_index: int
) -> tuple[tuple[int, int, Decimal | None], ...]:
    return tuple(r for r in reservations if r[0] != step_index)


def _reservation(event: AdmissionDecided) -> tuple[int, int, Decimal | None]:
    estimate = event.context.get("estimate") or {}
    tokens = int(estimate.get("input_tokens") or 0) + int(estimate.get("max_output_tokens") or 0)
    cost = estimate.get("cost_usd")
    return (event.step_index, tokens, None if cost is None else Decimal(str(cost)))


def _is_decision_event(event: DomainEvent) -> bool:
    """Admission's own events (its decisions stream); everything else is the run's."""
    return isinstance(event, AdmissionDecided | PolicyViolationDetected)


def _apply_decision_event(state: RunContext, event: DomainEvent) -> RunContext:
    if isinstance(event, AdmissionDecided):
        held = _release(state.reservations, event.step_index)
        if event.outcome != "deny" and event.step_index > state.last_step_index:
            held = (*held, _reservation(event))
        return replace(state, reservations=held)
    if isinstance(event, PolicyViolationDetected):
        state = replace(state, judged=state.judged | {event.violation_id})
        if event.enforcement != "enforce":
            return state  # a warning does not stop the run: later steps are admitted as before
        return _with_violation(state, event.policy_id)
    return state


def _apply_run_events(
    state: RunContext, events: Sequence[tuple[DomainEvent, datetime]], prices: PriceTable
) -> RunContext:
    """Run-stream events: the shared run fold (once per batch), then pricing and releases."""
    run = fold_run(state.run, [e for e, _ in events])
    cost, unpriced, held = state.cost_usd, state.unpriced_steps, state.reservations
    stopped_by: list[str] = []
    for event, at in events:
        if isinstance(event, StepRecorded):
            price = price_recorded(prices, event, at)
            if price.total_cost_usd is None:
                unpriced += 1
            else:
                cost += price.total_cost_usd
            held = _release(held, event.step_index)
        elif isinstance(event, RunStoppedByPolicy):
            stopped_by.append(event.policy_id)
    state = replace(state, run=run, cost_usd=cost, unpriced_steps=unpriced, reservations=held)
    for policy_id in stopped_by:
        state = _with_violation(state, policy_id)
    return state


def evolve(
    state: RunContext, event: DomainEvent, *, occurred_at: datetime, prices: PriceTable
) -> RunContext:
    """``state`` after ``event``. Steps are priced with ``prices`` as of ``occurred_at``."""
    return fold_events(state, [(event, occurred_at)], prices=prices)


def fold_events(
    state: RunContext, events: Iterable[tuple[DomainEvent, datetime]], *, prices: PriceTable
) -> RunContext:
    """``state`` after every ``(event, occurred_at)``, in order.

    Consecutive run events are folded in one batch, so catching up a long run stays linear.
    """
    batch: list[tuple[DomainEvent, datetime]] = []
    for event, at in events:
        if not _is_decision_event(event):
            batch.append((event, at))
            continue
        if batch:
            state, batch = _apply_run_events(state, batch, prices), []
        state = _apply_decision_event(state, event)
    if batch:
        state = _apply_run_events(state, batch, prices)
    return state


def fold(
    state: RunContext, envelopes: Iterable[EventEnvelope], *, prices: PriceTable
) -> RunContext:
    """``state`` after every event in ``envelopes``, in order."""
    return fold_events(state, [(decode(env), env.occurred_at) for env in envelopes], prices=prices)


# --- the Rego input and output -------------------------------------------------------------------


def estimate_cost_usd(
    prices: PriceTable, request: AdmitRequest, at: datetime
) -> tuple[Decimal | None, str]:
    """The step's worst-case cost (its whole output budget) and the pricing status."""
    price = price_step(
        prices,
        request.model,
        request.estimate.input_tokens,
        request.estimate.max_output_tokens,
        at,
    )
    return price.total_cost_usd, price.pricing_status


def build_input(
    context: RunContext, request: AdmitRequest, *, prices: PriceTable, at: datetime
) -> dict[str, Any]:
    """The Rego ``input`` document for one admission request (see ``policy-bundle/README.md``)."""
    cost, status = estimate_cost_usd(prices, request, at)
    return {
        "tenant_id": context.tenant_id,
        "environment": request.bundle_environment,
        "run": context.as_input(),
        "step": {
            "index": request.step_index,
            "kind": request.kind,
            "model": request.model,
            "tool": request.tool,
            "estimate": {
                "input_tokens": request.estimate.input_tokens,
                "max_output_tokens": request.estimate.max_output_tokens,
                # null, not 0, for an unpriced model: the cost cap must know it cannot check.
                "cost_usd": None if cost is None else float(cost),
                "pricing_status": status,
            },
        },
    }


@dataclass(frozen=True)
class Decision:
    """What the bundle said: the outcome and every reason, denies first.

    Denies are ordered run state first (a stopped run is the cause, whatever else is over its
    limit), then by severity, then by policy id, so the first reason is stable across
    evaluations and names the policy the violation is recorded against.
    """

    outcome: Outcome
    reasons: tuple[Reason, ...]
    denies: tuple[Reason, ...] = ()
    """The bundle's deny reasons (a waived decision keeps them)."""
    exceptions: tuple[str, ...] = ()
    """The policy exceptions that turned a deny into this warn (see :func:`waive`)."""

    @property
    def violated(self) -> Reason | None:
        """The reason a denied step is recorded against; ``None`` unless denied."""
        return self.reasons[0] if self.outcome == "deny" and self.reasons else None


def _reasons(entries: Any, kind: str) -> list[Reason]:
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise PermanentError(f"policy decision {kind!r} is not a list: {entries!r}")
    out: list[Reason] = []
    for entry in entries:
        try:
            out.append(Reason.model_validate(entry))
        except ValidationError as exc:
            raise PermanentError(f"policy decision has a malformed {kind} entry: {exc}") from None
    return out


def _order(reason: Reason) -> tuple[int, int, str, str]:
    return (
        0 if reason.policy_id == RUN_STATE_POLICY else 1,
        _SEVERITY_RANK.get(reason.severity, len(_SEVERITY_RANK)),
        reason.policy_id,
        reason.message,
    )


def interpret(rego_output: dict[str, Any]) -> Decision:
    """The bundle's ``decision`` document (``{"deny": [...], "warn": [...]}``) as a Decision."""
    deny = sorted(_reasons(rego_output.get("deny"), "deny"), key=_order)
    warn = sorted(_reasons(rego_output.get("warn"), "warn"), key=_order)
    outcome: Outcome = "deny" if deny else "warn" if warn else "allow"
    return Decision(outcome=outcome, reasons=(*deny, *warn), denies=tuple(deny))


def waive(decision: Decision, exception_ids: tuple[str, ...] | None) -> Decision:
    """A deny whose every deny reason is covered by a policy exception becomes a ``warn``
    naming those exceptions (its reasons are kept, so the answer still says what was waived);
    anything else is returned as it is."""
    if decision.outcome != "deny" or not exception_ids:
        return decision
    return replace(decision, outcome="warn", exceptions=exception_ids)


def decision_context(input_doc: dict[str, Any], decision: Decision | None = None) -> dict[str, Any]:
    """What the decision saw, recorded with it: the run document, the step asked for (kind,
    model, tool) and its estimate, so a denied step that never ran still shows what it wanted;
    the environment whose bundle decided; the ids of the policy exceptions that waived its
    denies (``exceptions``), if any; and the ``policy_set_hash`` and registered ``agent``
    (version, state) the decision saw."""
    step = input_doc["step"]
    context = {
        **input_doc["run"],
        "step": {"kind": step["kind"], "model": step["model"], "tool": step["tool"]},
        "estimate": step["estimate"],
        "environment": input_doc["environment"],
    }
    if decision is not None and decision.exceptions:
        context["exceptions"] = list(decision.exceptions)
    # The policy set the decision was made with, and the registered agent's state, when known.
    for key in ("policy_set_hash", "agent"):
        if key in input_doc:
            context[key] = input_doc[key]
    return context


def decide(
    context: RunContext,
    request: AdmitRequest,
    decision: Decision,
    *,
    decision_id: str,
    bundle_digest: str,
    input_doc: dict[str, Any],
    trace_id: str | None,
) -> list[DomainEvent]:
    """The events one admission appends: always ``admission.decided``; on deny also
    ``policy.violation_detected`` against the first deny reason (violation id = decision id).

    A step refused only because the run is already stopped, finished or has violated a policy
    (``run_state``) is recorded but is no new violation: the run's first violation already
    opened the incident, and an agent retrying a stopped run must not open one per retry.
    """
    agent_id = context.agent_id or ""
    events: list[DomainEvent] = [
        AdmissionDecided(
            decision_id=decision_id,
            run_id=context.run_id,
            agent_id=agent_id,
            step_index=request.step_index,
            outcome=decision.outcome,
            reasons=list(decision.reasons),
            bundle_digest=bundle_digest,
            context=decision_context(input_doc, decision),
        )
    ]
    violated = decision.violated
    if violated is not None and violated.policy_id != RUN_STATE_POLICY:
        events.append(
            PolicyViolationDetected(
                violation_id=decision_id,
                decision_id=decision_id,
                run_id=context.run_id,
                agent_id=agent_id,
                step_index=request.step_index,
                policy_id=violated.policy_id,
                severity=violated.severity,
                message=violated.message,
                runbook_url=violated.runbook_url,
                bundle_digest=bundle_digest,
                trace_id=trace_id,
                environment=request.bundle_environment,
            )
        )
    return events


# --- judging recorded steps ----------------------------------------------------------------------


def admission_required_mode(
    data: dict[str, Any], tenant_id: str, settings: dict[str, Any] | None = None
) -> Enforcement:
    """The tenant's ``admission_required`` setting: from its policy settings
    (``PUT /v1/policy-settings``), else its override in the bundle's
    ``missioncontrol.config.tenants``, else the bundle default, else ``enforce``.

    Raises :class:`PermanentError` for any other value (the bundle is wrong; guessing would
    either stop runs or let the bypass through unnoticed).
    """
    config = (data.get("missioncontrol") or {}).get("config") or {}
    tenant = (config.get("tenants") or {}).get(tenant_id) or {}
    defaults = config.get("defaults") or {}
    value = tenant.get(ADMISSION_REQUIRED_SETTING, defaults.get(ADMISSION_REQUIRED_SETTING))
    if settings is not None and settings.get(ADMISSION_REQUIRED_SETTING) is not None:
        value = settings[ADMISSION_REQUIRED_SETTING]
    if value is None:
        return "enforce"
    if value not in ENFORCEMENTS:
        raise PermanentError(
            f"policy bundle: {ADMISSION_REQUIRED_SETTING} must be one of "
            f"{', '.join(ENFORCEMENTS)}, got {value!r}"
        )
    return "warn" if value == "warn" else "enforce"


def judgement_id(step_event_id: uuid.UUID | str) -> str:
    """The id of the judgement (and its violation) of one recorded step event."""
    return str(uuid.uuid5(JUDGEMENT_NAMESPACE, str(step_event_id)))


def judgement_message(step: StepRecorded) -> str:
    """Why a marked step breaks ``admission_required``, in words."""
    what = {
        "unadmitted": "without an allowed admission",
        "duplicate": "a second time",
        "out_of_order": "below a step index already recorded",
    }
    return (
        f"step {step.step_index} of run {step.run_id} was recorded "
        + ", ".join(what[i] for i in step.irregularities)
        + f" ({', '.join(step.irregularities)})"
    )


def judge(
    context: RunContext,
    step: StepRecorded,
    *,
    step_event_id: uuid.UUID | str,
    enforcement: Enforcement,
    bundle_digest: str,
    trace_id: str | None,
) -> list[DomainEvent]:
    """The events judging one recorded step: none for a step recorded as it should be (or one
    judged already); else a ``policy.violation_detected`` of ``admission_required`` with the
    tenant's ``enforcement``, which stops the run and opens an incident (``enforce``) or only
    records the warning (``warn``).

    As with admission's ``run_state`` denials, a marked step of a run that already violated an
    enforced policy, or was stopped, is no new violation: the first one stopped the run and
    opened its incident, and an agent that keeps going must not open one per step. The step
    itself stays marked in the run's stream.
    """
    if not step.irregularities:
        return []
    violation_id = judgement_id(step_event_id)
    if violation_id in context.judged:
        return []
    if context.violated or context.status == "stopped_by_policy":
        return []
    return [
        PolicyViolationDetected(
            violation_id=violation_id,
            decision_id=violation_id,
            run_id=step.run_id,
            agent_id=step.agent_id,
            step_index=step.step_index,
            policy_id=ADMISSION_REQUIRED,
            severity="high",
            message=judgement_message(step),
            runbook_url=ADMISSION_REQUIRED_RUNBOOK,
            bundle_digest=bundle_digest,
            trace_id=trace_id,
            enforcement=enforcement,
        )
    ]
