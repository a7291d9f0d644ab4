"""Thin adapters around the cost domain: read the store, decide, append.

* :meth:`CostHandlers.on_step_recorded` is the handler of the ``cost-steps`` consumer: it runs in
  the consumer's transaction, so the ``cost.recorded`` append and the applied-event record commit
  together and a redelivered step can never be costed twice.
* :meth:`CostHandlers.set_prices` and :meth:`CostHandlers.prices` serve the RPC routes.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter

from libs.contracts import EventEnvelope, TraceContext, decode, envelope_for, stream_id_for
from libs.contracts.events import CostRecorded, StepRecorded
from libs.contracts.subjects import events_filter
from libs.errors import ConcurrencyError, Conflict, PermanentError
from libs.eventbus.db import AsyncConn
from libs.eventbus.jetstream import ConsumerSpec
from libs.eventbus.store import Append, EventStore
from libs.pricing import PriceTable, builtin_price_table, latest_published, with_overrides
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


def prices_stream(tenant_id: str) -> str:
    """The stream of a tenant's ``cost.price_table_published`` events."""
    return stream_id_for(tenant_id, "prices", "table")


def cost_stream(tenant_id: str, run_id: str) -> str:
    """The stream of a run's ``cost.recorded`` events."""
    return stream_id_for(tenant_id, "cost", run_id)


class CostHandlers:
    """Cost's effects on the event store, with a per-tenant price-table cache."""

    def __init__(self, store: EventStore, registry: CollectorRegistry | None = None) -> None:
        self.store = store
        # tenant -> (stream version the table was built from, table)
        self._tables: OrderedDict[str, tuple[int, PriceTable]] = OrderedDict()
        self._steps = Counter(
            "mc_cost_steps",
            "Steps costed, by pricing status (unpriced means a model without a price).",
            ["pricing_status"],
            registry=registry,
        )

    async def price_table(self, tenant_id: str, *, conn: AsyncConn | None = None) -> PriceTable:
        """The tenant's current price table.

        Only the price events after the cached version are read, so a step costs one indexed
        query when prices have not changed, and a ``set_prices`` committed before the step's
        transaction started is always seen, whichever process appended it.
        """
        cached_version, table = self._tables.get(tenant_id, (0, builtin_price_table()))
        events = await self.store.read_stream(
            prices_stream(tenant_id), cached_version + 1, conn=conn
        )
        if events:
            latest = latest_published(events)
            if latest is not None:
                # Every published event carries the full override list: the newest replaces all.
                table = with_overrides(builtin_price_table(), latest.prices, latest.version)
            cached_version = events[-1].stream_version
        self._tables[tenant_id] = (cached_version, table)
        self._tables.move_to_end(tenant_id)
        while len(self._tables) > TABLE_CACHE_SIZE:
            self._tables.popitem(last=False)
        return table

    async def on_step_recorded(self, conn: AsyncConn, env: EventEnvelope) -> None:
        """Append the step's ``cost.recorded`` in the consumer's transaction ``conn``."""
        await self.on_steps_recorded(conn, [env])

    async def on_steps_recorded(self, conn: AsyncConn, envs: list[EventEnvelope]) -> None:
        """Cost a batch of recorded steps with one append, in the consumer's transaction."""
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
                tables[env.tenant_id] = await self.price_table(env.tenant_id, conn=conn)
            cost = decide_cost(
                step, env.occurred_at, tables[env.tenant_id], step_event_id=env.event_id
            )
            out = envelope_for(
                cost,
                tenant_id=env.tenant_id,
                stream_id=cost_stream(env.tenant_id, step.run_id),
                correlation_id=env.correlation_id,
                actor=ACTOR,
                causation_id=str(env.event_id),
                trace_context=env.trace_context,
            )
            by_stream.setdefault(out.stream_id, []).append(out)
            costs.append((env, step, cost))
        await self.store.append_many(
            [Append(sid, outs) for sid, outs in by_stream.items()], conn=conn
        )
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

        The append expects the stream version it read, so two concurrent calls cannot both
        become version n+1; the loser re-reads and retries once, then reports a conflict.
        """
        prices = parse_prices(raw_prices)
        sid = prices_stream(tenant_id)
        for attempt in (1, 2):
            events = await self.store.read_stream(sid)
            latest = latest_published(events)
            event = decide_publish(latest.version if latest is not None else 0, prices)
            env = envelope_for(
                event,
                tenant_id=tenant_id,
                stream_id=sid,
                correlation_id=correlation_id,
                actor=actor,
                trace_context=trace_context,
            )
            expected = events[-1].stream_version if events else 0
            try:
                await self.store.append(sid, [env], expected_version=expected)
            except ConcurrencyError:
                if attempt == 2:
                    raise Conflict(
                        "prices were changed concurrently twice in a row; read them and retry"
                    ) from None
                continue
            table = with_overrides(builtin_price_table(), prices, event.version)
            log.info("cost.prices_published", tenant_id=tenant_id, version=event.version)
            return {"version": event.version, "price_table_version": table.version}
        raise AssertionError("unreachable")  # pragma: no cover

    async def prices(self, tenant_id: str) -> dict[str, Any]:
        """The tenant's current table: ``{version, price_table_version, prices}``."""
        events = await self.store.read_stream(prices_stream(tenant_id))
        return price_listing(latest_published(events))
