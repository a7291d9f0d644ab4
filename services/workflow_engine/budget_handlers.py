"""Budgets as the engine uses them: set and list them, reserve at dispatch, settle on cost.

* :meth:`BudgetHandlers.set_budget` and :meth:`set_timezone` append ``budget.set`` /
  ``budget.timezone_set`` and write the engine's copy in the same transaction.
* :meth:`check_start` says whether an execution's whole estimate exceeds a cap (it is then
  halted before its first step).
* :meth:`reserve` runs inside the dispatch's transaction: it reserves each dispatched step's
  estimate in every window that applies (raising :class:`BudgetRefused` when one would go over
  its cap, so the dispatch is rolled back and decided again without that step) and releases the
  holds of attempts that ended.
* :meth:`on_cost` is the handler of the ``cost.recorded`` consumer: an attempt's recorded step
  was costed, so that much moves from reserved to spent.

Every change that reaches a threshold appends ``budget.threshold_crossed`` in the same
transaction (the window row remembers which thresholds were announced).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import structlog

from libs.contracts.envelope import DomainEvent, EventEnvelope, stream_id_for, utcnow
from libs.contracts.events import (
    BudgetSet,
    BudgetThresholdCrossed,
    BudgetTimezoneSet,
    CostRecorded,
    StepDispatched,
)
from libs.contracts.registry import decode
from libs.eventbus.db import AsyncConn, transaction
from libs.eventbus.repository import (
    Aggregate,
    EventMeta,
    Repository,
    Store,
    envelopes_for,
    fold_with,
)
from libs.eventbus.store import Append, EventStore
from libs.eventbus.uow import UnitOfWork, join
from services.workflow_engine.budget_ledger import (
    BudgetLedger,
    Movement,
    WindowKey,
    WindowRow,
)
from services.workflow_engine.budgets import (
    BUDGET_CATEGORY,
    Budget,
    BudgetRefusal,
    applicable,
    check_timezone,
    estimate_under,
)
from services.workflow_engine.definitions import WorkflowDocument
from services.workflow_engine.executions import parse_attempt_run_id

log = structlog.get_logger("workflow_engine.budgets")

ENGINE_ACTOR = "service:workflow-engine"
SETTINGS_ID = "settings"


class BudgetRefused(Exception):
    """Reserving a step's estimate would take a budget window over its cap."""

    def __init__(self, refusal: BudgetRefusal) -> None:
        super().__init__(refusal.reason)
        self.refusal = refusal


@dataclass(frozen=True)
class _Set:
    """The last value set on a budget (or the settings) stream."""

    value: Any = None


def _evolve(state: _Set, event: DomainEvent) -> _Set:
    if isinstance(event, BudgetSet):
        return _Set(event.cap_usd)
    if isinstance(event, BudgetTimezoneSet):
        return _Set(event.timezone)
    return state


BUDGET = Aggregate[_Set](
    category=BUDGET_CATEGORY, initial=lambda _t, _i: _Set(), fold=fold_with(_evolve)
)
"""A budget's stream ``<tenant>/budget/<budget_id>`` (and the tenant's settings stream)."""


class BudgetHandlers:
    """Budget commands, queries, reservation and settlement."""

    def __init__(self, store: Store, ledger: BudgetLedger | None = None) -> None:
        self.store = store
        self.ledger = ledger or BudgetLedger()
        self.streams = Repository(store, BUDGET, max_retries=5)

    # --- setting -------------------------------------------------------------------------------

    async def set_budget(
        self, uow: UnitOfWork, tenant_id: str, budget: Budget, meta: EventMeta
    ) -> dict[str, Any]:
        """Set a budget's cap (setting the same cap again changes nothing)."""

        def decide(state: _Set) -> list[DomainEvent]:
            if state.value == budget.cap_usd:
                return []
            return [
                BudgetSet(
                    budget_id=budget.budget_id, scope=budget.scope, subject=budget.subject,
                    window=budget.window, cap_usd=budget.cap_usd,
                )
            ]  # fmt: skip

        _, stored = await self.streams.execute(tenant_id, budget.budget_id, decide, meta, uow=uow)
        if stored:
            await self.ledger.save_budget(_conn(uow), tenant_id, budget)
        return {"budget_id": budget.budget_id, "changed": bool(stored)}

    async def set_timezone(
        self, uow: UnitOfWork, tenant_id: str, timezone: str, meta: EventMeta
    ) -> dict[str, Any]:
        """Set the time zone of the tenant's day and month windows."""
        tz = check_timezone(timezone)

        def decide(state: _Set) -> list[DomainEvent]:
            return [] if state.value == tz else [BudgetTimezoneSet(timezone=tz)]

        _, stored = await self.streams.execute(tenant_id, SETTINGS_ID, decide, meta, uow=uow)
        if stored:
            await self.ledger.save_timezone(_conn(uow), tenant_id, tz)
        return {"timezone": tz, "changed": bool(stored)}

    # --- queries -------------------------------------------------------------------------------

    async def list_budgets(
        self, pool: Any, tenant_id: str, scope: str | None, execution_id: str | None
    ) -> dict[str, Any]:
        """Each budget with its current window's spent, reserved and remaining.

        A budget per execution has a window per execution: its figures are those of
        ``execution_id`` when given, else null.
        """
        async with transaction(pool) as conn:
            budgets, tz = await self.ledger.budgets(conn, tenant_id, scope)
            now = utcnow()
            keys = {}
            for b in budgets:
                execution = b.subject if b.scope == "execution" else execution_id or ""
                keys[b.budget_id] = b.window_key(now, tz, execution)
            report = await self.ledger.report(conn, tenant_id, budgets, keys)
        for item, b in zip(report, budgets, strict=True):
            if b.window == "execution" and b.scope != "execution" and not execution_id:
                item.update(window_key=None, spent_usd=None, reserved_usd=None, remaining_usd=None)
        return {"timezone": tz, "budgets": report}

    # --- before the first step -----------------------------------------------------------------

    async def check_start(
        self, uow: UnitOfWork, tenant_id: str, execution_id: str, document: WorkflowDocument,
        now: datetime,
    ) -> BudgetRefusal | None:  # fmt: skip
        """The first budget whose cap the execution's whole estimate exceeds, if any."""
        budgets, tz = await self.ledger.budgets(_conn(uow), tenant_id)
        for b in applicable(budgets, document.name, execution_id):
            estimate = estimate_under(b, document)
            if estimate > b.cap_usd:
                key = b.window_key(now, tz, execution_id)
                window = await self.ledger.window(_conn(uow), tenant_id, (b.budget_id, key))
                committed = window.committed if window else Decimal(0)
                return BudgetRefusal(b, key, committed, estimate)
        return None

    # --- at dispatch ---------------------------------------------------------------------------

    async def reserve(
        self,
        uow: UnitOfWork,
        tenant_id: str,
        workflow_id: str,
        execution_id: str,
        dispatched: Sequence[tuple[StepDispatched, Decimal]],
        ended: Mapping[str, int],
        meta: EventMeta,
    ) -> None:
        """Reserve each dispatched attempt's estimate and release the holds of ``ended``
        attempts (run id → recorded steps), in the dispatch's transaction.

        Raises :class:`BudgetRefused` naming the first step that does not fit; the caller rolls
        back and decides again with that step refused.
        """
        conn = _conn(uow)
        movement = await self.ledger.end_attempts(conn, tenant_id, ended) if ended else Movement()
        if dispatched:
            budgets, tz = await self.ledger.budgets(conn, tenant_id)
            budgets = applicable(budgets, workflow_id, execution_id)
            if budgets:
                now = dispatched[0][0].dispatched_at
                await self._reserve(conn, tenant_id, execution_id, budgets, tz, now, dispatched,
                                    movement)  # fmt: skip
                rows, refused = await self.ledger.move(conn, tenant_id, movement)
                if refused:
                    raise BudgetRefused(
                        await self._blame(conn, tenant_id, budgets, refused, dispatched, movement)
                    )
                await self._alert(uow, tenant_id, rows, budgets, meta, None)
                return
        rows = await self.ledger.release(conn, tenant_id, movement)
        await self._alert(uow, tenant_id, rows, None, meta, None)

    async def _reserve(
        self, conn: AsyncConn, tenant_id: str, execution_id: str, budgets: list[Budget], tz: str,
        now: datetime, dispatched: Sequence[tuple[StepDispatched, Decimal]], m: Movement,
    ) -> None:  # fmt: skip
        for event, estimate in dispatched:
            keys: list[WindowKey] = []
            for b in budgets:
                if not b.covers(event.agent_id):
                    continue
                key = (b.budget_id, b.window_key(now, tz, execution_id))
                if estimate > b.cap_usd:  # a window it does not fit even empty
                    window = await self.ledger.window(conn, tenant_id, key)
                    committed = window.committed if window else Decimal(0)
                    raise BudgetRefused(BudgetRefusal(b, key[1], committed, estimate,
                                                      event.step_id))  # fmt: skip
                keys.append(key)
                m.reserve[key] = m.reserve.get(key, Decimal(0)) + estimate
                m.caps[key] = b.cap_usd
            if keys:
                m.holds.append((event.run_id, sorted(keys), estimate))

    async def _blame(
        self, conn: AsyncConn, tenant_id: str, budgets: list[Budget], refused: list[WindowKey],
        dispatched: Sequence[tuple[StepDispatched, Decimal]], m: Movement,
    ) -> BudgetRefusal:  # fmt: skip
        """The first dispatched step that does not fit, with the window it does not fit in.

        The refused windows were left as they were, so their rows show what was committed.
        """
        found = await self.ledger.windows(conn, tenant_id, refused)
        by_id = {b.budget_id: b for b in budgets}
        taken: dict[WindowKey, Decimal] = {}
        for event, estimate in dispatched:
            for key in sorted(refused):
                b = by_id[key[0]]
                if not b.covers(event.agent_id):
                    continue
                w = found.get(key)
                committed = (w.committed if w else Decimal(0)) - m.release.get(key, Decimal(0))
                committed += taken.get(key, Decimal(0))
                if committed + estimate > b.cap_usd:
                    return BudgetRefusal(b, key[1], committed, estimate, event.step_id)
                taken[key] = taken.get(key, Decimal(0)) + estimate
        # Unreachable while the statement and this account agree; name the first step anyway.
        event, estimate = dispatched[0]
        key = min(refused)
        return BudgetRefusal(by_id[key[0]], key[1], Decimal(0), estimate, event.step_id)

    # --- settling ------------------------------------------------------------------------------

    async def on_cost(self, conn: AsyncConn, env: EventEnvelope) -> None:
        """``EventConsumer`` handler: a recorded step of an attempt's run was costed."""
        event = decode(env)
        if not isinstance(event, CostRecorded) or parse_attempt_run_id(event.run_id) is None:
            return
        if not isinstance(self.store, EventStore):  # pragma: no cover - wiring error
            raise TypeError("the cost consumer needs the PostgreSQL event store")
        uow = join(self.store, conn)
        cost = event.total_cost_usd or Decimal(0)
        rows = await self.ledger.settle(conn, env.tenant_id, event.run_id, cost)
        await self._alert(uow, env.tenant_id, rows, None, EventMeta.caused_by(env, ENGINE_ACTOR),
                          event.run_id)  # fmt: skip

    # --- alerts --------------------------------------------------------------------------------

    async def _alert(
        self,
        uow: UnitOfWork,
        tenant_id: str,
        rows: Iterable[WindowRow],
        budgets: Iterable[Budget] | None,
        meta: EventMeta,
        run_id: str | None,
    ) -> None:
        due = [(r, r.alerts()) for r in rows]
        due = [(r, pcts) for r, pcts in due if pcts]
        if not due:
            return
        conn = _conn(uow)
        known = {b.budget_id: b for b in budgets or ()}
        if any(r.budget_id not in known for r, _ in due):
            found, _ = await self.ledger.budgets(conn, tenant_id)
            known.update({b.budget_id: b for b in found})
        appends = []
        for row, pcts in due:
            b = known.get(row.budget_id)
            if b is None:  # pragma: no cover - a window outlived its budget row
                continue
            await self.ledger.mark_alerted(conn, tenant_id, row, max(pcts))
            events = [
                BudgetThresholdCrossed(
                    budget_id=b.budget_id, scope=b.scope, subject=b.subject, window=b.window,
                    window_key=row.window_key, threshold_pct=pct, cap_usd=row.cap_usd,
                    spent_usd=row.spent_usd, reserved_usd=row.reserved_usd, run_id=run_id,
                )
                for pct in pcts
            ]  # fmt: skip
            sid = stream_id_for(tenant_id, BUDGET_CATEGORY, b.budget_id)
            appends.append(
                Append(sid, envelopes_for(events, tenant_id=tenant_id, stream_id=sid, meta=meta))
            )
            log.info("budget.threshold_crossed", budget_id=b.budget_id,
                     window_key=row.window_key, threshold_pct=max(pcts))  # fmt: skip
        if appends:
            await uow.append_many(appends)


def _conn(uow: UnitOfWork) -> AsyncConn:
    if uow.conn is None:  # pragma: no cover - wiring error
        raise TypeError("budgets need a PostgreSQL unit of work")
    return uow.conn
