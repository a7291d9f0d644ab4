"""Policy hooks: the one input context every lifecycle hook is decided on, and its decision.

Six hooks ask the bundle for a decision: ``on_create_attempt``, ``on_review_open`` and
``on_promotion_attempt`` about an agent spec; ``before_execute`` (admission's decision, see
:mod:`~services.policy_admission.domain`) and ``after_execute`` about a run's step;
``on_policy_update``, a batch scan of many agents. Each decision says allow, warn or deny and
carries ``violations``, ``warnings``, ``locked_fields`` and ``mutations``, every reason with its
policy, severity, message and runbook link.

Pure: no I/O. :func:`evaluate_hook` is what any caller needs (the agent registry included); the
handler adds the run's recorded step for ``after_execute``, the policy exceptions, and the
``policy.hook_evaluated`` event.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from libs.contracts.events import (
    HookDecided,
    LockedField,
    Mutation,
    Outcome,
    PolicyHookEvaluated,
    StepRecorded,
)
from libs.contracts.limits import MAX_ACTOR, MAX_NAME, RUN_ID_PATTERN
from libs.contracts.policy import DEFAULT_ENVIRONMENT, Environment, PolicyHook
from libs.errors import InvalidInput, PermanentError
from services.policy_admission.domain import RunContext, interpret
from services.policy_admission.exceptions import Waiver, waiving

Hook = PolicyHook
HOOKS: tuple[Hook, ...] = get_args(Hook)
ADMISSION_HOOK: Hook = "before_execute"
"""Admission's hook: its policies are ``data.missioncontrol.main.decision``."""
SCAN_HOOK: Hook = "on_policy_update"
MAX_SUBJECTS = 500
"""Agents one ``on_policy_update`` scan may name."""
UNNAMED_SUBJECT = "unnamed"


class HookActor(BaseModel):
    """Who asks: set by the gateway from the caller's credentials, never by the caller."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=MAX_ACTOR)
    roles: list[str] = Field(default_factory=list, max_length=16)
    human: bool = False


class HookContext(BaseModel):
    """The input context of every hook (``input`` in Rego, with ``tenant_id`` and ``settings``).

    ``agent`` is the agent spec as a JSON object (the registry's canonical spec); ``request`` is
    what the hook is about (a promotion's checks, a run's step, a scan's subjects); ``change`` is
    what the caller changes (``{"fields": ["model.name", ...]}``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    hook: Hook
    actor: HookActor
    environment: Environment = DEFAULT_ENVIRONMENT
    agent: dict[str, Any] | None = None
    request: dict[str, Any] = Field(default_factory=dict)
    change: dict[str, Any] | None = None

    def input_doc(self, tenant_id: str, settings: dict[str, Any] | None) -> dict[str, Any]:
        """The Rego ``input`` document (see ``policy-bundle/README.md``)."""
        doc: dict[str, Any] = {
            "hook": self.hook,
            "tenant_id": tenant_id,
            "actor": self.actor.model_dump(),
            "environment": self.environment,
            "agent": self.agent,
            "request": self.request,
            "change": self.change,
        }
        if self.hook == ADMISSION_HOOK:
            # Admission's document: the run and the step at the top, as every admission policy
            # reads them (policy-bundle/README.md, "Input document").
            for part in ("run", "step"):
                if not isinstance(self.request.get(part), dict):
                    raise InvalidInput(
                        f"hook_request_invalid: before_execute needs request.{part}, an object "
                        "(the admission input document)"
                    )
                doc[part] = self.request[part]
        if settings is not None:
            doc["settings"] = settings
        return doc


def parse_hook(hook: str) -> Hook:
    """``hook`` if it names one, else :class:`InvalidInput` listing them."""
    if hook in HOOKS:
        return hook
    raise InvalidInput(f"hook_unknown: no policy hook {hook!r}; one of {', '.join(HOOKS)}")


class HookDecision(HookDecided):
    """What the bundle decided for one hook (see :class:`HookDecided`): denies are
    ``violations``, warns ``warnings``."""

    @property
    def runbooks(self) -> list[str]:
        """The runbook links of every reason, once each, in reason order."""
        seen: list[str] = []
        for r in (*self.violations, *self.warnings):
            if r.runbook_url and r.runbook_url not in seen:
                seen.append(r.runbook_url)
        return seen

    def as_answer(self) -> dict[str, Any]:
        """The decision as the API answers it (with ``runbooks``)."""
        return {**self.model_dump(mode="json"), "runbooks": self.runbooks}


def _entries(raw: Any, kind: str, model: type[LockedField] | type[Mutation]) -> list[Any]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise PermanentError(f"hook decision {kind!r} is not a list: {raw!r}")
    try:
        return [model.model_validate(item) for item in raw]
    except ValidationError as exc:
        raise PermanentError(f"hook decision has a malformed {kind} entry: {exc}") from None


def interpret_hook(hook: Hook, raw: dict[str, Any] | None, bundle_digest: str) -> HookDecision:
    """The bundle's hook ``decision`` document as a :class:`HookDecision`; ``None`` (the bundle
    defines nothing for the hook) allows.

    Reasons are ordered as admission orders them (severity, then policy id); locked fields are
    listed once per (field, policy); mutations by path, then policy.
    """
    if raw is None:
        return HookDecision(hook=hook, outcome="allow", bundle_digest=bundle_digest)
    decision = interpret({"deny": raw.get("deny"), "warn": raw.get("warn")})
    locks: list[LockedField] = _entries(raw.get("locked_fields"), "locked_fields", LockedField)
    unique = {(lock.field, lock.policy_id): lock for lock in locks}
    mutations: list[Mutation] = _entries(raw.get("mutations"), "mutations", Mutation)
    return HookDecision(
        hook=hook,
        outcome=decision.outcome,
        violations=list(decision.denies),
        warnings=list(decision.reasons[len(decision.denies) :]),
        locked_fields=[unique[k] for k in sorted(unique)],
        mutations=sorted(mutations, key=lambda m: (m.path, m.policy_id, m.op)),
        bundle_digest=bundle_digest,
    )


class HookBundle(Protocol):
    """What :func:`evaluate_hook` needs of a compiled bundle."""

    digest: str

    def evaluate(self, input_doc: dict[str, Any]) -> dict[str, Any]: ...

    def evaluate_hook(self, hook: str, input_doc: dict[str, Any]) -> dict[str, Any] | None: ...


def evaluate_hook(
    bundle: HookBundle,
    context: HookContext,
    *,
    tenant_id: str = "",
    settings: dict[str, Any] | None = None,
) -> HookDecision:
    """The bundle's decision for ``context``: ``before_execute`` through admission's decision,
    every other hook through ``data.missioncontrol.hooks.<hook>.decision``.

    ``tenant_id`` and ``settings`` select the tenant's settings as at admission. No exception is
    applied here (see :func:`waive_hook`) and nothing is recorded.
    """
    doc = context.input_doc(tenant_id, settings)
    if context.hook == ADMISSION_HOOK:
        raw: dict[str, Any] | None = bundle.evaluate(doc)
    else:
        raw = bundle.evaluate_hook(context.hook, doc)
    return interpret_hook(context.hook, raw, bundle.digest)


# --- on_policy_update: a batch scan ----------------------------------------------------------


class ScanSubject(BaseModel):
    """One agent of a scan: its id and spec."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=MAX_NAME)
    agent: dict[str, Any]


def scan_subjects(context: HookContext) -> list[ScanSubject]:
    """The agents a scan names in ``request.subjects``; :class:`InvalidInput` when malformed."""
    raw = context.request.get("subjects")
    if not isinstance(raw, list) or not raw:
        raise InvalidInput(
            "hook_request_invalid: on_policy_update needs request.subjects, a non-empty list of "
            '{"id", "agent"}'
        )
    if len(raw) > MAX_SUBJECTS:
        raise InvalidInput(
            f"hook_request_invalid: request.subjects names {len(raw)} agents, over the "
            f"{MAX_SUBJECTS} a scan may take"
        )
    try:
        return [ScanSubject.model_validate(s) for s in raw]
    except ValidationError as exc:
        raise InvalidInput(f"hook_request_invalid: request.subjects: {exc}") from None


def iter_scan(
    bundle: HookBundle,
    context: HookContext,
    *,
    tenant_id: str = "",
    settings: dict[str, Any] | None = None,
) -> Iterator[tuple[str, HookDecision]]:
    """``on_policy_update``: each subject's decision, evaluated as the context's agent, one at a
    time (the subjects are all validated first)."""
    for subject in scan_subjects(context):
        one = context.model_copy(update={"agent": subject.agent, "request": {}})
        yield subject.id, evaluate_hook(bundle, one, tenant_id=tenant_id, settings=settings)


def evaluate_scan(
    bundle: HookBundle,
    context: HookContext,
    *,
    tenant_id: str = "",
    settings: dict[str, Any] | None = None,
) -> list[tuple[str, HookDecision]]:
    """``on_policy_update``: every subject's decision (see :func:`iter_scan`)."""
    return list(iter_scan(bundle, context, tenant_id=tenant_id, settings=settings))


def worst(outcomes: Iterable[Outcome]) -> Outcome:
    """deny over warn over allow."""
    seen = set(outcomes)
    return "deny" if "deny" in seen else "warn" if "warn" in seen else "allow"


# --- after_execute: a recorded step ----------------------------------------------------------


class AfterExecuteRequest(BaseModel):
    """``after_execute``'s ``request``: the recorded step to judge."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_id: str = Field(pattern=RUN_ID_PATTERN)
    step_index: int = Field(ge=1)


def parse_after_execute(context: HookContext) -> AfterExecuteRequest:
    """``context.request`` as an :class:`AfterExecuteRequest`; :class:`InvalidInput` if not."""
    try:
        return AfterExecuteRequest.model_validate(context.request)
    except ValidationError as exc:
        problems = "; ".join(
            f"request.{'.'.join(str(p) for p in err['loc']) or ''}: {err['msg']}"
            for err in exc.errors()
        )
        raise InvalidInput(f"hook_request_invalid: after_execute: {problems}") from None


def after_execute_context(context: HookContext, run: RunContext, step: StepRecorded) -> HookContext:
    """The context ``after_execute`` is decided on: ``request`` holds the run as admission folds
    it (the step included) and the step as recorded, so policies check what it really used."""
    request = {
        "run_id": run.run_id,
        "step_index": step.step_index,
        "run": run.as_input(),
        "step": {
            "index": step.step_index,
            "kind": step.kind,
            "model": step.model,
            "tool": step.tool,
            "status": step.status,
            "input_tokens": step.input_tokens,
            "output_tokens": step.output_tokens,
        },
    }
    return context.model_copy(update={"request": request})


def recorded_step(steps: Sequence[StepRecorded], step_index: int) -> StepRecorded | None:
    """The last recording of ``step_index`` among a run's recorded steps."""
    found = [s for s in steps if s.step_index == step_index]
    return found[-1] if found else None


def waive_hook(
    decision: HookDecision,
    waivers: Iterable[Waiver],
    *,
    agent_id: str | None,
    run_id: str,
    at: datetime,
) -> HookDecision:
    """A deny whose every violation is covered by a policy exception at ``at`` becomes a warn
    naming the exceptions, as at admission (the violations are kept to say what was waived);
    anything else is returned as it is. An exception never applies at or after its expiry."""
    if decision.outcome != "deny":
        return decision
    used = waiving(waivers, decision.violations, agent_id=agent_id, run_id=run_id, at=at)
    if not used:
        return decision
    return decision.model_copy(update={"outcome": "warn", "exceptions": list(used)})


# --- the record ------------------------------------------------------------------------------


def subject_of(context: HookContext) -> str:
    """What a decision is about: the agent's id (``id``, ``agent_id`` or ``identity.name``), a
    run's ``run_id`` for ``after_execute``, else ``unnamed``."""
    if context.hook == "after_execute" and isinstance(context.request.get("run_id"), str):
        return str(context.request["run_id"])
    agent = context.agent or {}
    identity = agent.get("identity")
    for candidate in (
        agent.get("id"),
        agent.get("agent_id"),
        identity.get("name") if isinstance(identity, dict) else None,
    ):
        if isinstance(candidate, str) and candidate.strip():
            return candidate.strip()[:MAX_NAME]
    return UNNAMED_SUBJECT


@dataclass(frozen=True)
class Evaluated:
    """One subject's decision, ready to record."""

    subject: str
    decision: HookDecision


def hook_events(
    evaluated: Sequence[Evaluated], *, decision_id: str, environment: str
) -> list[PolicyHookEvaluated]:
    """One ``policy.hook_evaluated`` per subject, all under ``decision_id``."""
    return [
        PolicyHookEvaluated(
            decision_id=decision_id,
            subject=e.subject,
            environment=environment,
            **e.decision.model_dump(),
        )
        for e in evaluated
    ]
