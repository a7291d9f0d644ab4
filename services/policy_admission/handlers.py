"""Admission's I/O: read the run from the event store, evaluate, append the decision.

Admission reads its own writes (``docs/architecture.md``): every ``admit`` reads the run stream
from the store, so a step whose recording was acknowledged before the request is always counted.
To keep that cheap, the folded context of each run and the last version read are cached (LRU),
and each ``admit`` reads only the versions after the cached one.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from prometheus_client import CollectorRegistry, Histogram
from pydantic import TypeAdapter, ValidationError

from libs.contracts import envelope_for, new_uuid7, stream_id_for, utcnow
from libs.contracts.envelope import EventEnvelope, TenantId, TraceContext
from libs.contracts.events import PolicyBundleActivated
from libs.contracts.registry import decode
from libs.errors import ConcurrencyError, Conflict, InvalidInput, NotFound
from libs.eventbus.db import transaction
from libs.eventbus.store import EventStore
from libs.observability import trace_id_of
from libs.pricing import PriceTable, builtin_price_table, latest_published, with_overrides
from services.policy_admission.bundle import PolicyBundle
from services.policy_admission.domain import (
    RunContext,
    build_input,
    decide,
    decision_context,
    fold,
    interpret,
    parse_request,
)

ACTOR = "service:policy-admission"
SYSTEM_TENANT = "system"
BUNDLE_STREAM = stream_id_for(SYSTEM_TENANT, "policy", "bundle")

# A few thousand active runs fit easily (a context is a few hundred bytes); an evicted run is
# simply refolded from its stream on its next admission.
DEFAULT_MAX_RUNS = 4096
DEFAULT_MAX_TENANTS = 1024

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_EVAL_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05)

_tenant_adapter: TypeAdapter[str] = TypeAdapter(TenantId)

K = TypeVar("K")
V = TypeVar("V")


class _Lru(Generic[K, V]):
    """A bounded mapping that forgets the least recently used key first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True)
class _RunEntry:
    """A run's folded context and the last versions of its two streams folded into it."""

    context: RunContext
    run_version: int
    decisions_version: int


@dataclass(frozen=True)
class _PriceEntry:
    """A tenant's price table, the last version of its price stream read and the table version."""

    table: PriceTable
    stream_version: int
    published_version: int | None


def _tenant(tenant_id: Any) -> str:
    try:
        return _tenant_adapter.validate_python(tenant_id)
    except ValidationError:
        raise InvalidInput(f"tenant_id: invalid tenant id {tenant_id!r}") from None


class AdmissionHandler:
    """Answers ``admit`` and ``policies`` with one compiled bundle.

    One instance per process: the caches assume they are the only writer of their entries, and
    the bundle's interpreter is used from the event loop thread only.
    """

    def __init__(
        self,
        store: EventStore,
        bundle: PolicyBundle,
        *,
        registry: CollectorRegistry | None = None,
        max_runs: int = DEFAULT_MAX_RUNS,
        max_tenants: int = DEFAULT_MAX_TENANTS,
    ) -> None:
        self.store = store
        self.bundle = bundle
        self._runs: _Lru[tuple[str, str], _RunEntry] = _Lru(max_runs)
        self._prices: _Lru[str, _PriceEntry] = _Lru(max_tenants)
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

        Returns ``{decision_id, outcome, reasons, bundle_digest, context}``. Raises
        :class:`InvalidInput` for a malformed request and :class:`NotFound` for a run the
        tenant does not have.
        """
        started = time.perf_counter()
        tenant = _tenant(tenant_id)
        body = {k: v for k, v in request.items() if k != "tenant_id"}
        req = parse_request(body)

        run_key = (tenant, req.run_id)
        run_sid = stream_id_for(tenant, "run", req.run_id)
        decisions_sid = stream_id_for(tenant, "decisions", req.run_id)
        prices_sid = stream_id_for(tenant, "prices", "table")
        # One transaction per decision. It first takes a lock on this run, so two admissions of
        # the same run (from any replica) decide one after the other: the second sees the first's
        # decision and its reservation, and parallel steps cannot overrun a budget together.
        async with transaction(self.store.pool) as conn:
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (run_sid,))
            cached = self._runs.get(run_key)
            cached_prices = self._prices.get(tenant)
            read = await self.store.read_streams(
                [
                    (prices_sid, (cached_prices.stream_version if cached_prices else 0) + 1),
                    (run_sid, (cached.run_version if cached else 0) + 1),
                    (decisions_sid, (cached.decisions_version if cached else 0) + 1),
                ],
                conn=conn,
            )
            price_events, run_events = read[prices_sid], read[run_sid]
            decision_events = read[decisions_sid]

            prices = self._price_entry(tenant, cached_prices, price_events).table
            if cached is None and not run_events:
                raise NotFound(f"run {req.run_id!r} not found")
            base = cached.context if cached else RunContext(tenant_id=tenant, run_id=req.run_id)
            # One history, in store order: appends commit in position order, so everything read
            # now comes after everything already folded into the cached context, and the fold
            # is the same whichever replica or cache state answers.
            history = sorted([*run_events, *decision_events], key=lambda e: e.position or 0)
            context = fold(base, history, prices=prices)
            self._runs.put(
                run_key,
                _RunEntry(
                    context=context,
                    run_version=run_events[-1].stream_version
                    if run_events
                    else (cached.run_version if cached else 0),
                    decisions_version=decision_events[-1].stream_version
                    if decision_events
                    else (cached.decisions_version if cached else 0),
                ),
            )

            input_doc = build_input(context, req, prices=prices, at=utcnow())
            eval_started = time.perf_counter()
            raw = self.bundle.evaluate(input_doc)
            self._evaluation.observe(time.perf_counter() - eval_started)
            decision = interpret(raw)

            decision_id = str(new_uuid7())
            traceparent = headers.get("traceparent")
            events = decide(
                context,
                req,
                decision,
                decision_id=decision_id,
                bundle_digest=self.bundle.digest,
                input_doc=input_doc,
                trace_id=trace_id_of(traceparent),
            )
            correlation_id = headers.get("Mc-Correlation-Id") or decision_id
            trace = TraceContext(traceparent=traceparent, tracestate=headers.get("tracestate"))
            envelopes: list[EventEnvelope] = []
            for event in events:
                envelopes.append(
                    envelope_for(
                        event,
                        tenant_id=tenant,
                        stream_id=decisions_sid,
                        correlation_id=correlation_id,
                        # The violation is a consequence of the decision recorded just before it.
                        causation_id=str(envelopes[0].event_id) if envelopes else None,
                        actor=ACTOR,
                        trace_context=trace,
                    )
                )
            await self.store.append(decisions_sid, envelopes, expected_version=None, conn=conn)

        self._latency.labels(outcome=decision.outcome).observe(time.perf_counter() - started)
        return {
            "decision_id": decision_id,
            "outcome": decision.outcome,
            "reasons": [r.model_dump(mode="json") for r in decision.reasons],
            "bundle_digest": self.bundle.digest,
            "context": decision_context(input_doc),
        }

    def _price_entry(
        self, tenant: str, cached: _PriceEntry | None, new_events: list[EventEnvelope]
    ) -> _PriceEntry:
        """The tenant's price table after ``new_events`` (each one carries the full list)."""
        if cached is not None and not new_events:
            return cached
        entry = cached or _PriceEntry(builtin_price_table(), 0, None)
        latest = latest_published(new_events)
        if latest is not None and (
            entry.published_version is None or latest.version >= entry.published_version
        ):
            entry = _PriceEntry(
                with_overrides(builtin_price_table(), latest.prices, latest.version),
                entry.stream_version,
                latest.version,
            )
        if new_events:
            entry = _PriceEntry(entry.table, new_events[-1].stream_version, entry.published_version)
        self._prices.put(tenant, entry)
        return entry

    def policies(self) -> dict[str, Any]:
        """``{bundle_digest, policies}``: the active bundle and every policy's metadata."""
        return {
            "bundle_digest": self.bundle.digest,
            "policies": [p.model_dump(mode="json") for p in self.bundle.policies],
        }


async def activate_bundle(store: EventStore, bundle: PolicyBundle) -> bool:
    """Append ``policy.bundle_activated`` to ``system/policy/bundle`` unless it is already the
    latest there; return whether an event was appended.

    Replicas starting together race on the append; the loser re-reads and finds the digest.
    """
    for _ in range(5):
        events = await store.read_stream(BUNDLE_STREAM)
        version = events[-1].stream_version if events else 0
        if events:
            last = decode(events[-1])
            if isinstance(last, PolicyBundleActivated) and last.bundle_digest == bundle.digest:
                return False
        event = PolicyBundleActivated(
            bundle_digest=bundle.digest, policies=list(bundle.policies), data=bundle.data
        )
        envelope = envelope_for(
            event,
            tenant_id=SYSTEM_TENANT,
            stream_id=BUNDLE_STREAM,
            correlation_id=bundle.digest,
            actor=ACTOR,
        )
        try:
            await store.append(BUNDLE_STREAM, [envelope], expected_version=version)
        except ConcurrencyError:
            continue
        return True
    raise Conflict(f"{BUNDLE_STREAM} kept changing while activating {bundle.digest}")
