"""Budget reservation benchmark: reservations per second beside a floor, on embedded PostgreSQL.

Every figure runs ``--workers`` concurrent transactions for ``--seconds`` against the *same*
budget windows (one tenant's day and one agent's day), which is the worst case: every
reservation of a tenant queues on the same rows.

* floor: a bare ``UPDATE`` of one hot row and its commit, the least a guarded counter costs;
* reservations: :meth:`BudgetHandlers.reserve` as dispatch calls it (read the budgets, then one
  statement that inserts the attempt's hold and upserts both windows, guarded) and its commit,
  from this process and from ``--processes`` processes at once (engine replicas);
* the alternative weighed against it: each window an event-sourced aggregate, a reservation an
  event appended under the window stream's expected version (conflicts retried);
* a whole dispatch (``start_execution`` of a one-step workflow, one at a time) with and without
  budgets, to show what reserving adds to it.

    python scripts/bench_budgets.py [--seconds 5] [--workers 8] [--processes 2]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import secrets
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
from benchkit import pct
from psycopg_pool import AsyncConnectionPool
from pydantic import SecretStr

from libs.contracts.envelope import DomainEvent, utcnow
from libs.contracts.events import BudgetSet, StepDispatched
from libs.eventbus.db import open_pool, transaction
from libs.eventbus.migrate import apply_all
from libs.eventbus.repository import Aggregate, EventMeta, Repository, fold_with
from libs.eventbus.rpc import RequestMeta
from libs.eventbus.store import EventStore
from libs.eventbus.uow import begin
from libs.runtime.embedded import start_postgres
from services.workflow_engine.budget_handlers import BudgetHandlers
from services.workflow_engine.budgets import Budget
from services.workflow_engine.definitions import document_from
from services.workflow_engine.execution_handlers import ExecutionHandlers
from services.workflow_engine.handlers import DefinitionHandlers, WorkflowHandlers
from services.workflow_engine.registration import REGISTRATION as ENGINE

META = EventMeta(correlation_id="bench", actor="bench")
REQ = RequestMeta.from_headers({})
BIG = Decimal(10_000_000)

ENGINE_ROLE = ENGINE.db_role or "mc_workflow_engine"


@dataclass
class Rate:
    """Operations done in a timed run."""

    done: int
    seconds: float
    conflicts: int = 0

    @property
    def per_s(self) -> float:
        return self.done / self.seconds


async def run_for(seconds: float, workers: int, one: Callable[[int, int], Awaitable[int]]) -> Rate:
    """``one(worker, i)`` in ``workers`` loops for ``seconds``; it returns conflicts seen."""
    stop = time.perf_counter() + seconds
    counts = [0] * workers
    conflicts = [0] * workers

    async def loop(w: int) -> None:
        i = 0
        while time.perf_counter() < stop:
            conflicts[w] += await one(w, i)
            counts[w] += 1
            i += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(loop(w) for w in range(workers)))
    return Rate(sum(counts), time.perf_counter() - t0, sum(conflicts))


def make_floor_table(admin_url: str, rows: int) -> None:
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute("CREATE TABLE public.bench_hot (id int PRIMARY KEY, n bigint)")
        admin.execute("INSERT INTO public.bench_hot SELECT g, 0 FROM generate_series(0, %s) g",
                      (rows,))  # fmt: skip
        admin.execute(f"GRANT SELECT, UPDATE ON public.bench_hot TO {ENGINE_ROLE}")


async def floor(pool: AsyncConnectionPool, seconds: float, workers: int, spread: bool) -> Rate:
    """A bare UPDATE + commit: all workers on one row, or (``spread``) each on its own."""

    async def one(w: int, i: int) -> int:
        async with transaction(pool) as conn:
            await conn.execute(
                "UPDATE public.bench_hot SET n = n + 1 WHERE id = %s", (w if spread else 0,)
            )
        return 0

    return await run_for(seconds, workers, one)


def dispatched(tenant: str, run_id: str) -> StepDispatched:
    now = utcnow()
    return StepDispatched(
        execution_id="e", step_id="s", attempt=1, run_id=run_id, agent_id="writer",
        workflow_id="wf", risk_tier="read_only", dispatched_at=now,
        deadline_at=now + timedelta(seconds=60),
    )  # fmt: skip


async def set_budgets(store: EventStore, budgets: BudgetHandlers, tenant: str) -> None:
    async with begin(store) as uow:
        for b in (Budget.of("tenant", "", "day", BIG), Budget.of("agent", "writer", "day", BIG)):
            await budgets.set_budget(uow, tenant, b, META)


async def reservations(
    store: EventStore, seconds: float, workers: int, spread: bool, prefix: str = "r"
) -> Rate:
    """Reservations all in one tenant's windows, or (``spread``) each worker in its tenant's."""
    budgets = BudgetHandlers(store)
    tenants = [f"bench-r{w}" if spread else "bench-r" for w in range(workers)]
    for tenant in set(tenants):
        await set_budgets(store, budgets, tenant)

    async def one(w: int, i: int) -> int:
        step = dispatched(tenants[w], f"{prefix}{w}-{i}")
        async with begin(store) as uow:
            await budgets.reserve(uow, tenants[w], "wf", "e", [(step, Decimal("0.01"))], {}, META)
        return 0

    return await run_for(seconds, workers, one)


def _replica(url: str, seconds: float, workers: int, index: int, start: Any, out: Any) -> None:
    """One engine-like process reserving in the shared tenant's windows."""

    async def go() -> Rate:
        pool = await open_pool(url, max_size=workers + 1)
        try:
            store = EventStore(pool)
            await set_budgets(store, BudgetHandlers(store), "bench-r")  # idempotent
            start.wait()
            return await reservations(store, seconds, workers, False, prefix=f"p{index}-")
        finally:
            await pool.close()

    rate = asyncio.run(go())
    out.put((rate.done, rate.seconds))


def replicas(url: str, seconds: float, workers: int, processes: int) -> Rate:
    """Reservations from ``processes`` processes at once (as engine replicas would)."""
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_replica, args=(url, seconds, workers, i, start, out))
        for i in range(processes)
    ]
    for p in procs:
        p.start()
    time.sleep(3)  # the children import and connect; the timed part starts together below
    start.set()
    results = [out.get(timeout=seconds + 60) for _ in procs]
    for p in procs:
        p.join()
    return Rate(sum(d for d, _ in results), max(t for _, t in results))


def _evolve(total: Decimal, event: DomainEvent) -> Decimal:
    return total + event.cap_usd if isinstance(event, BudgetSet) else total


WINDOW = Aggregate[Decimal](
    # A category the engine's role may append to; the stream ids are the benchmark's own.
    category="budget",
    initial=lambda _t, _i: Decimal(0),
    fold=fold_with(_evolve),
)


async def event_sourced(store: EventStore, seconds: float, workers: int) -> Rate:
    """Each reservation an event on the window's stream under its expected version."""
    repo = Repository(store, WINDOW, max_retries=1_000)
    tries = [0] * workers

    def decide(w: int, total: Decimal) -> list[DomainEvent]:
        tries[w] += 1
        if total + Decimal("0.01") > BIG:
            return []
        # The amount travels as a budget.set payload only to reuse a registered event type.
        return [BudgetSet(budget_id="w", scope="tenant", window="day", cap_usd=Decimal("0.01"))]

    async def one(w: int, i: int) -> int:
        before = tries[w]
        for key in ("bench-agent:writer:day", "bench-tenant:day"):
            async with begin(store) as uow:
                await repo.execute("bench-e", key, partial(decide, w), META, uow=uow)
        return tries[w] - before - 2

    return await run_for(seconds, workers, one)


async def dispatch_latency(store: EventStore, with_budgets: bool, n: int) -> list[float]:
    tenant = "bench-d1" if with_budgets else "bench-d0"
    runs, defs = WorkflowHandlers(store), DefinitionHandlers(store)
    budgets = BudgetHandlers(store)
    execs = ExecutionHandlers(store, runs, defs, budgets)
    await defs.register_agent(tenant, "writer", "", REQ)
    doc = document_from(
        {"name": "wf", "steps": [{"id": "s", "agent": "writer", "estimate": {"cost_usd": "0.01"}}]}
    )
    await defs.save(tenant, doc, None, REQ)
    if with_budgets:
        await set_budgets(store, budgets, tenant)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await execs.start(tenant, "wf", None, {}, REQ)
        out.append(time.perf_counter() - t0)
    return out


def rate_line(name: str, r: Rate, f: Rate) -> None:
    extra = f"  ({r.conflicts:,} conflicts retried)" if r.conflicts else ""
    print(f"  {name:<52} {r.per_s:8,.0f}/s   floor {f.per_s:8,.0f}/s   "
          f"ratio {r.per_s / f.per_s:4.2f}{extra}")  # fmt: skip


async def main(seconds: float, workers: int, n: int, processes: int) -> None:
    base = Path(tempfile.mkdtemp(prefix="mc-bench-budgets-"))
    pg = start_postgres(base)
    # The engine's own role, as the workflow-engine reserves: what its grants and the event
    # store's row-level checks cost is part of the figure.
    password = secrets.token_urlsafe(24)
    apply_all(pg.dsn(), role_passwords={ENGINE_ROLE: SecretStr(password)})
    url = f"postgresql://{ENGINE_ROLE}:{password}@127.0.0.1:{pg.port}/missioncontrol"
    pool = await open_pool(url, max_size=workers + 2)
    try:
        store = EventStore(pool)
        make_floor_table(pg.dsn(), workers)
        print(f"Budget reservations, {workers} concurrent transactions, {seconds:g} s each")
        print(" one tenant: every reservation in the same two windows")
        f = await floor(pool, seconds, workers, spread=False)
        print(f"  {'floor: bare UPDATE of one hot row + commit':<52} {f.per_s:8,.0f}/s")
        reserved = await reservations(store, seconds, workers, spread=False)
        rate_line("reserve (2 windows, hold row) + commit", reserved, f)
        per = max(1, workers // processes)
        rate_line(f"the same from {processes} processes x {per} transactions",
                  replicas(url, seconds, per, processes), f)  # fmt: skip
        rate_line("alternative: event-sourced windows, expected version",
                  await event_sourced(store, seconds, workers), f)  # fmt: skip
        print(f" {workers} tenants: each worker reserves in its own tenant's windows")
        f = await floor(pool, seconds, workers, spread=True)
        print(f"  {'floor: bare UPDATE of a row per worker + commit':<52} {f.per_s:8,.0f}/s")
        rate_line("reserve (2 windows, hold row) + commit",
                  await reservations(store, seconds, workers, spread=True), f)  # fmt: skip
        print(f"Dispatch of a one-step workflow (start_execution in process), {n} one at a time")
        without = await dispatch_latency(store, False, n)
        with_ = await dispatch_latency(store, True, n)
        for name, xs in (("without budgets", without), ("with 2 budgets", with_)):
            print(f"  {name:<52} p50 {statistics.median(xs) * 1e3:6.2f} ms  "
                  f"p99 {pct(xs, 99) * 1e3:6.2f} ms")  # fmt: skip
    finally:
        await pool.close()
        pg.stop()
        shutil.rmtree(base, ignore_errors=True)


def _args() -> Any:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--dispatches", type=int, default=300)
    ap.add_argument("--processes", type=int, default=2, help="engine-like processes")
    return ap.parse_args()


if __name__ == "__main__":
    a = _args()
    asyncio.run(main(a.seconds, a.workers, a.dispatches, a.processes))
