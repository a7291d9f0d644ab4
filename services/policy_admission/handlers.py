"""Admission's I/O: parse, execute on the run-context repository, reply.

Admission reads its own writes (``docs/architecture.md``): every ``admit`` catches the run's
context up with the store (only the versions after the cached ones of ``<t>/run/<run_id>`` and
``<t>/decisions/<run_id>``), so a step whose recording was acknowledged before the request is
always counted. Admissions of one run are serialised by a lock on its run stream id, held until
the decision commits (across replicas): the second sees the first's decision and reservation, so
parallel steps cannot overrun a budget together.

Decisions are group-committed: the requests waiting at one moment are decided one after the other
in one transaction, their events appended together at its end (one append, one WAL flush for all
of them), and each is answered only after that commit, so no answer is ever given for a decision
that could still be lost.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Histogram
from pydantic import TypeAdapter, ValidationError

from libs.contracts import new_uuid7, stream_id_for, utcnow
from libs.contracts.envelope import DomainEvent, EventEnvelope, TenantId, TraceContext
from libs.contracts.events import PolicyBundleActivated, StepRecorded
from libs.contracts.policy import DEFAULT_ENVIRONMENT
from libs.contracts.registry import decode
from libs.domain.prices import PRICE_TABLE_ID, PRICES
from libs.domain.run import RUN_CATEGORY
from libs.errors import InvalidInput, NotFound
from libs.eventbus.repository import (
    Aggregate,
    EventMeta,
    Fold,
    Recorded,
    Repository,
    Store,
    begin,
)
from libs.eventbus.uow import DeferredAppends, UnitOfWork
from libs.observability import trace_id_of
from libs.pricing import PriceTable, builtin_price_table
from services.policy_admission.agents import admission_denial, admission_reason, with_deny
from services.policy_admission.bundle import BundleError, PolicyBundle
from services.policy_admission.domain import (
    AdmitRequest,
    Decision,
    RunContext,
    admission_required_mode,
    build_input,
    decide,
    decision_context,
    fold_events,
    interpret,
    judge,
    parse_request,
    waive,
)
from services.policy_admission.exceptions import waiving
from services.policy_admission.tenant_bundles import Choice, TenantPolicies

log = structlog.get_logger("policy_admission")

ACTOR = "service:policy-admission"
SYSTEM_TENANT = "system"
BUNDLE_STREAM = stream_id_for(SYSTEM_TENANT, "policy", "bundle")
DECISIONS_CATEGORY = "decisions"

# A few thousand active runs fit easily (a context is a few hundred bytes); an evicted run is
# simply refolded from its streams on its next admission.
DEFAULT_MAX_RUNS = 4096
DEFAULT_MAX_TENANTS = 1024

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_EVAL_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05)

_tenant_adapter: TypeAdapter[str] = TypeAdapter(TenantId)


def _context_fold(prices: PriceTable) -> Fold[RunContext]:
    def fold(state: RunContext, recorded: Sequence[Recorded]) -> RunContext:
        return fold_events(
            state, [(r.event, r.envelope.occurred_at) for r in recorded], prices=prices
        )

    return fold


def _run_lock(tenant_id: str, run_id: str) -> str:
    return stream_id_for(tenant_id, RUN_CATEGORY, run_id)


def _run_streams(tenant_id: str, run_id: str) -> tuple[str, ...]:
    return (
        stream_id_for(tenant_id, DECISIONS_CATEGORY, run_id),
        stream_id_for(tenant_id, RUN_CATEGORY, run_id),
    )


RUN_CONTEXT = Aggregate[RunContext](
    category=DECISIONS_CATEGORY,
    initial=RunContext,
    fold=_context_fold(builtin_price_table()),
    # The run's own stream and admission's decisions on it, merged in store order; decisions
    # are appended to the first.
    streams=_run_streams,
    lock_key=_run_lock,
)
"""A run as admission decides on it (see :class:`~services.policy_admission.domain.RunContext`)."""


def _bundle_digest(state: str | None, recorded: Sequence[Recorded]) -> str | None:
    for r in recorded:
        if isinstance(r.event, PolicyBundleActivated):
            state = r.event.bundle_digest
    return state


BUNDLE = Aggregate[str | None](
    category="policy", initial=lambda tenant_id, entity_id: None, fold=_bundle_digest
)
"""``system/policy/bundle``: the digest of the bundle activated last."""


def _tenant(tenant_id: Any) -> str:
    try:
        return _tenant_adapter.validate_python(tenant_id)
    except ValidationError:
        raise InvalidInput(f"tenant_id: invalid tenant id {tenant_id!r}") from None


@dataclass
class _Pending:
    """An admission request waiting for its decision to be committed."""

    tenant: str
    req: AdmitRequest
    headers: Mapping[str, str]
    answer: asyncio.Future[dict[str, Any]]


def _settle(
    p: _Pending, answer: dict[str, Any] | None = None, *, exc: BaseException | None = None
) -> None:
    if p.answer.done():  # the caller went away (cancelled)
        return
    if exc is not None:
        p.answer.set_exception(exc)
    else:
        p.answer.set_result(answer or {})


class AdmissionHandler:
    """Answers ``admit`` and ``policies`` with one compiled bundle.

    One instance per process: the bundle's interpreter is used from the event loop thread only.
    """

    def __init__(
        self,
        store: Store,
        bundle: PolicyBundle,
        *,
        registry: CollectorRegistry | None = None,
        max_runs: int = DEFAULT_MAX_RUNS,
        max_tenants: int = DEFAULT_MAX_TENANTS,
        tenants: TenantPolicies | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.store = store
        self.clock = clock
        self.bundle = bundle
        self.tenants = tenants
        self.runs = Repository(store, RUN_CONTEXT, cache_size=max_runs)
        self._waiting: list[_Pending] = []
        self._committer: asyncio.Task[None] | None = None
        self.prices = Repository(store, PRICES, cache_size=max_tenants)
        self._latency = Histogram(
            "mc_admission_decision_seconds",
            "Time to answer one admission request (store reads, evaluation, append).",
            ["outcome"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self._evaluation = Histogram(
            "mc_admission_evaluation_seconds",
            "Time the policy bundle takes to evaluate one decision.",
            buckets=_EVAL_BUCKETS,
            registry=registry,
        )

    async def admit(
        self, tenant_id: Any, request: dict[str, Any], headers: Mapping[str, str]
    ) -> dict[str, Any]:
        """Decide whether step ``request["step_index"]`` of a run may run, and record why.

        Returns ``{decision_id, outcome, reasons, bundle_digest, context}`` once the decision is
        durable. Raises :class:`InvalidInput` for a malformed request and :class:`NotFound` for
        a run the tenant does not have.
        """
        tenant = _tenant(tenant_id)
        req = parse_request({k: v for k, v in request.items() if k != "tenant_id"})
        return await self.admit_parsed(tenant, req, headers)

    async def admit_parsed(
        self, tenant: str, req: AdmitRequest, headers: Mapping[str, str]
    ) -> dict[str, Any]:
        """:meth:`admit` for a request already validated (the RPC route parses it with pydantic)."""
        started = time.perf_counter()
        pending = _Pending(tenant, req, headers, asyncio.get_running_loop().create_future())
        self._waiting.append(pending)
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit_waiting())
        answer = await pending.answer
        decision: Decision = answer["decision"]
        self._latency.labels(outcome=decision.outcome).observe(time.perf_counter() - started)
        return {
            "decision_id": answer["decision_id"],
            "outcome": decision.outcome,
            "reasons": [r.model_dump(mode="json") for r in decision.reasons],
            "bundle_digest": answer["bundle_digest"],
            "context": decision_context(answer["input"], decision),
            "exceptions": list(decision.exceptions),
        }

    async def _commit_waiting(self) -> None:
        """Group commit: decide everything waiting in one transaction, then answer each.

        While one batch commits, new requests wait; the next batch takes all of them. One
        request alone runs in its own transaction as it would without batching.
        """
        while self._waiting:
            batch, self._waiting = self._waiting, []
            try:
                if len(batch) == 1:
                    await self._answer_alone(batch[0])
                else:
                    await self._answer_together(batch)
            except BaseException as exc:  # never leave a caller waiting
                for p in batch:
                    _settle(p, exc=exc)
                if not isinstance(exc, Exception):
                    # Cancelled (shutdown): nobody is left to decide what is still waiting.
                    waiting, self._waiting = self._waiting, []
                    for p in waiting:
                        _settle(p, exc=exc)
                    raise

    async def _answer_alone(self, p: _Pending) -> None:
        try:
            answer = await self._decide_one(p, None)
        except Exception as exc:
            _settle(p, exc=exc)
            return
        _settle(p, answer)

    async def _answer_together(self, batch: list[_Pending]) -> None:
        # Every run of the batch is locked first, in one order, before anything is appended:
        # replicas committing overlapping batches then take locks in the same order and cannot
        # deadlock (the append takes its own lock last).
        batch.sort(key=lambda p: _run_lock(p.tenant, p.req.run_id))
        done: list[tuple[_Pending, dict[str, Any]]] = []
        try:
            async with begin(self.store) as outer:
                uow = DeferredAppends(outer)
                for key in sorted({_run_lock(p.tenant, p.req.run_id) for p in batch}):
                    await uow.lock(key)
                for p in batch:
                    try:
                        done.append((p, await self._decide_one(p, uow)))
                    except Exception as exc:  # this request only: what it decided is dropped
                        _settle(p, exc=exc)
                # Every decision of the batch in one append, just before the one commit.
                await uow.flush()
        except Exception as exc:
            for p, _ in done:
                _settle(p, exc=exc)
            return
        # Committed: now, and only now, the decisions are durable and may be answered.
        for p, answer in done:
            _settle(p, answer)

    async def _decide_one(self, p: _Pending, uow: UnitOfWork | None) -> dict[str, Any]:
        """Decide one request (in ``uow``, or in a transaction of its own)."""
        decision_id = str(new_uuid7())
        traceparent = p.headers.get("traceparent")
        answer: dict[str, Any] = {"decision_id": decision_id}
        prices: list[PriceTable] = []

        async def prepare(uow: UnitOfWork) -> Fold[RunContext]:
            # In the decision's transaction, after the run's lock: the tenant's prices price
            # both the steps folded now and the estimate.
            table = (await self.prices.load(p.tenant, PRICE_TABLE_ID, uow=uow)).table
            prices[:] = [table]
            return _context_fold(table)

        decide_admission = partial(
            self._decide,
            req=p.req,
            prices=prices,
            decision_id=decision_id,
            trace_id=trace_id_of(traceparent),
            answer=answer,
        )
        meta = EventMeta(
            correlation_id=p.headers.get("Mc-Correlation-Id") or decision_id,
            actor=ACTOR,
            trace_context=TraceContext(
                traceparent=traceparent, tracestate=p.headers.get("tracestate")
            ),
            # The violation is a consequence of the decision recorded just before it.
            chain_causation=True,
        )
        await self.runs.execute(
            p.tenant, p.req.run_id, decide_admission, meta, uow=uow, prepare=prepare
        )
        return answer

    def _decide(
        self,
        context: RunContext,
        *,
        req: AdmitRequest,
        prices: list[PriceTable],
        decision_id: str,
        trace_id: str | None,
        answer: dict[str, Any],
    ) -> list[DomainEvent]:
        """Evaluate the bundle on ``context``; the decision's events (the answer on the side)."""
        if not context.run.version:
            raise NotFound(f"run {req.run_id!r} not found")
        at = self.clock()
        input_doc = build_input(context, req, prices=prices[0], at=at)
        # The tenant's bundle for the environment and its settings: in-memory lookups, taken
        # once, so the whole decision is made by one bundle.
        denial = self._agent_state(context, req.bundle_environment, input_doc)
        bundle, decision = self._evaluate(context.tenant_id, req, input_doc, denial)
        if decision.outcome == "deny" and self.tenants is not None:
            # In memory, compared with this decision's clock: never applied at or after expiry.
            decision = waive(
                decision,
                waiving(
                    self.tenants.exceptions_for(context.tenant_id),
                    decision.denies,
                    agent_id=context.agent_id,
                    run_id=context.run_id,
                    at=at,
                ),
            )
        answer.update(decision=decision, input=input_doc, bundle_digest=bundle.digest)
        return decide(
            context,
            req,
            decision,
            decision_id=decision_id,
            bundle_digest=bundle.digest,
            input_doc=input_doc,
            trace_id=trace_id,
        )

    def _agent_state(
        self, context: RunContext, environment: str, input_doc: dict[str, Any]
    ) -> str | None:
        """Note the policy set hash and the registered agent in ``input_doc`` (and so in the
        decision's context); why the agent may not run in ``environment``, if so (in memory)."""
        if self.tenants is None:
            return None
        input_doc["policy_set_hash"] = self.tenants.policy_set_hash_for(
            context.tenant_id, environment
        )
        gate = self.tenants.agent_gate(context.tenant_id, context.agent_id)
        if gate is None:
            return None
        input_doc["agent"] = {
            "registered": True,
            "version": gate.version,
            "state": gate.state,
            "governed_version": gate.governed_version,
        }
        return admission_denial(gate, context.agent_id or "", environment)

    def _evaluate(
        self, tenant_id: str, req: AdmitRequest, input_doc: dict[str, Any], denial: str | None
    ) -> tuple[PolicyBundle, Decision]:
        """The bundle that decides and its decision. During a canary the run's arm decides
        and is counted; a candidate that fails to evaluate is counted as an error and the
        stable bundle decides instead (no decision is lost to a bad reload). ``denial`` (the
        registered agent may not run here) is added to whichever bundle's answer."""

        def decide(bundle: PolicyBundle) -> Decision:
            raw = bundle.evaluate(input_doc)
            if denial is not None:
                raw = with_deny(raw, admission_reason(denial))
            return interpret(raw)

        settings = self.settings_for(tenant_id)
        if settings is not None:
            input_doc["settings"] = settings
        if self.tenants is None:
            choice = Choice(self.bundle)
        else:
            choice = self.tenants.choose(tenant_id, req.bundle_environment, req.run_id)
        started = time.perf_counter()
        try:
            decision = decide(choice.bundle)
        except BundleError:
            if self.tenants is not None:
                self.tenants.observe(tenant_id, choice, denied=False, error=True, seconds=0.0)
            if choice.fallback is None:
                raise
            log.warning(
                "policy_canary.evaluation_failed",
                reload_id=choice.reload_id,
                bundle_digest=choice.bundle.digest,
            )
            choice = Choice(choice.fallback)
            started = time.perf_counter()
            decision = decide(choice.bundle)
        seconds = time.perf_counter() - started
        self._evaluation.observe(seconds)
        if self.tenants is not None:
            self.tenants.observe(
                tenant_id, choice, denied=decision.outcome == "deny", error=False, seconds=seconds
            )
        return choice.bundle, decision

    async def judge_steps(self, envelopes: Sequence[EventEnvelope]) -> None:
        """``BatchEventConsumer`` handler of ``run.step_recorded``: judge every marked step.

        A step recorded without an allowed admission, a second time or out of order is marked
        by the workflow engine; here it becomes a violation of ``admission_required`` with the
        tenant's enforcement, appended to the run's decisions stream under the run's lock, so
        the stop and the incident follow the path of any other violation. Unmarked steps (all
        but a few) cost nothing. A redelivered step finds its judgement and adds nothing.
        """
        for env in envelopes:
            if not env.payload.get("irregularities"):
                continue  # the common case, without decoding the step (v1 steps have none)
            step = decode(env)
            if not isinstance(step, StepRecorded) or not step.irregularities:
                continue
            bundle = self.bundle_for(env.tenant_id, DEFAULT_ENVIRONMENT)
            enforcement = admission_required_mode(
                bundle.data, env.tenant_id, self.settings_for(env.tenant_id)
            )
            judged = partial(
                judge,
                step=step,
                step_event_id=env.event_id,
                enforcement=enforcement,
                bundle_digest=bundle.digest,
                trace_id=trace_id_of(env.trace_context.traceparent),
            )
            _, stored = await self.runs.execute(
                env.tenant_id,
                step.run_id,
                judged,
                EventMeta.caused_by(env, ACTOR),
                prepare=partial(self._tenant_fold, env.tenant_id),
            )
            if stored:
                log.warning(
                    "admission.step_judged",
                    run_id=step.run_id,
                    step_index=step.step_index,
                    irregularities=list(step.irregularities),
                    enforcement=enforcement,
                )

    async def _tenant_fold(self, tenant: str, uow: UnitOfWork) -> Fold[RunContext]:
        """The run-context fold at the tenant's prices (what admissions fold it with too)."""
        table = (await self.prices.load(tenant, PRICE_TABLE_ID, uow=uow)).table
        return _context_fold(table)

    def bundle_for(self, tenant_id: str, environment: str) -> PolicyBundle:
        """The bundle deciding for the tenant in ``environment`` (the repository's unless the
        tenant activated one of its own)."""
        if self.tenants is None:
            return self.bundle
        return self.tenants.bundle_for(tenant_id, environment)

    def settings_for(self, tenant_id: str) -> dict[str, Any] | None:
        """The tenant's ``input.settings`` (``None`` when it set none)."""
        return None if self.tenants is None else self.tenants.settings_for(tenant_id)

    def policies(self) -> dict[str, Any]:
        """``{bundle_digest, policies}``: the active bundle and every policy's metadata."""
        return {
            "bundle_digest": self.bundle.digest,
            "policies": [p.model_dump(mode="json") for p in self.bundle.policies],
        }


async def activate_bundle(store: Store, bundle: PolicyBundle) -> bool:
    """Append ``policy.bundle_activated`` to ``system/policy/bundle`` unless it is already the
    latest there; return whether an event was appended.

    Replicas starting together race on the append; the loser re-reads and finds the digest.
    """

    def activate(current: str | None) -> list[DomainEvent]:
        if current == bundle.digest:
            return []
        return [
            PolicyBundleActivated(
                bundle_digest=bundle.digest, policies=list(bundle.policies), data=bundle.data
            )
        ]

    _, stored = await Repository(store, BUNDLE, max_retries=4).execute(
        SYSTEM_TENANT,
        "bundle",
        activate,
        EventMeta(correlation_id=bundle.digest, actor=ACTOR),
    )
    return bool(stored)
