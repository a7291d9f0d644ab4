"""Thin adapters around the cost domain: read the store, decide, append.

* :meth:`CostHandlers.on_step_recorded` is the handler of the ``cost-steps`` consumer: it runs in
  the consumer's transaction, so the ``cost.recorded`` append and the applied-event record commit
  together and a redelivered step can never be costed twice.
* :meth:`CostHandlers.set_prices` and :meth:`CostHandlers.prices` serve the RPC routes.
"""

from __future__ import annotations

from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter

from libs.contracts import DomainEvent, EventEnvelope, TraceContext, decode, stream_id_for
from libs.contracts.events import CostRecorded, StepRecorded
from libs.contracts.subjects import events_filter
from libs.domain.prices import PRICE_TABLE_ID, PRICES, TenantPrices
from libs.errors import PermanentError
from libs.eventbus.db import AsyncConn
from libs.eventbus.jetstream import ConsumerSpec
from libs.eventbus.repository import EventMeta, Repository, Store, envelopes_for
from libs.eventbus.store import Append, EventStore
from libs.eventbus.uow import UnitOfWork, join
from libs.pricing import PriceTable
from services.cost.domain import decide_cost, decide_publish, parse_prices, price_listing

log = structlog.get_logger("cost")

ACTOR = "cost"
STEP_EVENT = "run.step_recorded"
CONSUMER = "cost-steps"
APPLIED_TABLE = "cost.applied_events"
# Tenants whose price tables are kept in memory; the least recently used one is dropped beyond it.
TABLE_CACHE_SIZE = 10_000


def steps_consumer_spec(durable: str = CONSUMER) -> ConsumerSpec:
    """The durable consumer of every tenant's ``run.step_recorded`` events."""
    return ConsumerSpec(durable=durable, filter_subjects=(events_filter(STEP_EVENT),))


def cost_stream(tenant_id: str, run_id: str) -> str:
    """The stream of a run's ``cost.recorded`` events."""
    return stream_id_for(tenant_id, "cost", run_id)


class CostHandlers:
    """Cost's effects on the event store, with the tenants' price tables cached."""

    def __init__(self, store: Store, registry: CollectorRegistry | None = None) -> None:
        self.store = store
        self.prices_repo = Repository(store, PRICES, cache_size=TABLE_CACHE_SIZE)
        self._steps = Counter(
            "mc_cost_steps",
            "Steps costed, by pricing status (unpriced means a model without a price).",
            ["pricing_status"],
            registry=registry,
        )

    async def price_table(self, tenant_id: str, *, uow: UnitOfWork | None = None) -> PriceTable:
        """The tenant's current price table.

        Only the price events after the cached version are read, so a step costs one indexed
        query when prices have not changed, and a ``set_prices`` committed before the step's
        transaction started is always seen, whichever process appended it.
        """
        return (await self.prices_repo.load(tenant_id, PRICE_TABLE_ID, uow=uow)).table

    async def on_step_recorded(self, conn: AsyncConn, env: EventEnvelope) -> None:
        """``EventConsumer`` handler: cost one step in the consumer's transaction ``conn``."""
        await self.on_steps_recorded(conn, [env])

    async def on_steps_recorded(self, conn: AsyncConn, envs: list[EventEnvelope]) -> None:
        """``EventConsumer`` batch handler: cost a batch of steps in the consumer's transaction."""
        if not isinstance(self.store, EventStore):  # pragma: no cover - wiring error
            raise TypeError("the steps consumer needs the PostgreSQL event store")
        await self.cost_steps(join(self.store, conn), envs)

    async def cost_steps(self, uow: UnitOfWork, envs: list[EventEnvelope]) -> None:
        """Append each recorded step's ``cost.recorded``, all with one append, in ``uow``.

        Cost events need no expected version: the consumer's applied-event record, committed
        with them, is what keeps a redelivered step from being costed twice.
        """
        tables: dict[str, PriceTable] = {}
        by_stream: dict[str, list[EventEnvelope]] = {}
        costs: list[tuple[EventEnvelope, StepRecorded, CostRecorded]] = []
        for env in envs:
            if env.event_type != STEP_EVENT:
                continue
            step = decode(env)
            if not isinstance(step, StepRecorded):  # pragma: no cover - registry guarantees it
                raise PermanentError(f"{env.event_id} is not a run.step_recorded event")
            if env.tenant_id not in tables:
                tables[env.tenant_id] = await self.price_table(env.tenant_id, uow=uow)
            cost = decide_cost(
                step, env.occurred_at, tables[env.tenant_id], step_event_id=env.event_id
            )
            sid = cost_stream(env.tenant_id, step.run_id)
            by_stream.setdefault(sid, []).extend(
                envelopes_for(
                    [cost],
                    tenant_id=env.tenant_id,
                    stream_id=sid,
                    meta=EventMeta.caused_by(env, ACTOR),
                )
            )
            costs.append((env, step, cost))
        await uow.append_many([Append(sid, outs) for sid, outs in by_stream.items()])
        # Counted before commit: a failed commit is redelivered and counted again, which only
        # over-counts under failures and keeps the metric off the critical path.
        for env, step, cost in costs:
            self._steps.labels(cost.pricing_status).inc()
            if cost.pricing_status == "unpriced":
                log.warning(
                    "cost.unpriced_model",
                    tenant_id=env.tenant_id,
                    run_id=step.run_id,
                    model=step.model,
                    price_table_version=cost.price_table_version,
                )

    async def set_prices(
        self,
        tenant_id: str,
        raw_prices: Any,
        *,
        correlation_id: str,
        actor: str,
        trace_context: TraceContext | None = None,
    ) -> dict[str, Any]:
        """Publish ``raw_prices`` as the tenant's complete override list; return the new version.

        The append expects the stream version it decided on, so two concurrent calls cannot
        both become version n+1; the loser re-reads and publishes version n+2.
        """
        prices = parse_prices(raw_prices)

        def publish(state: TenantPrices) -> list[DomainEvent]:
            return [decide_publish(state.version, prices)]

        state, _ = await self.prices_repo.execute(
            tenant_id,
            PRICE_TABLE_ID,
            publish,
            EventMeta(
                correlation_id=correlation_id,
                actor=actor,
                trace_context=trace_context or TraceContext(),
            ),
        )
        log.info("cost.prices_published", tenant_id=tenant_id, version=state.version)
        return {"version": state.version, "price_table_version": state.table.version}

    async def prices(self, tenant_id: str) -> dict[str, Any]:
        """The tenant's current table: ``{version, price_table_version, prices}``."""
        state = await self.prices_repo.load(tenant_id, PRICE_TABLE_ID)
        return price_listing(state.published)
