"""Application-layer benchmark: what the repository adds to a command, beside a bare append.

Each figure is printed beside its floor measured in the same run on the same embedded
PostgreSQL: a bare single-event append with its expected version (what a hand-written handler
would do at best) and, for admission, that plus a bare regopy evaluation. The same on the
in-memory twin shows the layer's pure-Python cost.

    python scripts/bench_applayer.py [--commands 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from libs.contracts import envelope_for, stream_id_for
from libs.contracts.events import RunStarted, StepRecorded
from libs.eventbus.db import open_pool
from libs.eventbus.memory import InMemoryEventStore
from libs.eventbus.migrate import apply_all
from libs.eventbus.repository import Store
from libs.eventbus.rpc import RequestMeta
from libs.eventbus.store import EventStore
from libs.runtime.embedded import start_postgres
from services.policy_admission.bundle import load_bundle
from services.policy_admission.handlers import AdmissionHandler
from services.workflow_engine.domain import RecordStep
from services.workflow_engine.handlers import WorkflowHandlers

META = RequestMeta.from_headers({})


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


async def timed(n: int, one: Callable[[int], Awaitable[object]]) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        await one(i)
        out.append(time.perf_counter() - t0)
    return out


def line(name: str, values: list[float], floor: list[float]) -> None:
    p50, f50 = statistics.median(values) * 1e3, statistics.median(floor) * 1e3
    print(
        f"  {name:<40} p50 {p50:6.3f} ms  p99 {pct(values, 99) * 1e3:6.3f} ms   "
        f"floor p50 {f50:6.3f} ms  ratio {p50 / f50:5.2f}"
    )


async def bare_appends(store: Store, tenant: str, n: int) -> list[float]:
    sid = stream_id_for(tenant, "run", "bare")

    async def one(i: int) -> object:
        env = envelope_for(
            StepRecorded(run_id="bare", agent_id="a", step_index=i + 1),
            tenant_id=tenant,
            stream_id=sid,
            correlation_id="bench",
            actor="bench",
        )
        return await store.append(sid, [env], expected_version=i)

    return await timed(n, one)


async def record_steps(store: Store, tenant: str, n: int) -> list[float]:
    wf = WorkflowHandlers(store)
    await wf.start_run(tenant, "wf", "agent", {}, META)

    async def one(i: int) -> object:
        return await wf.record_steps(tenant, [RecordStep(run_id="wf", step_index=i + 1)], META)

    return await timed(n, one)


async def admissions(store: Store, tenant: str, n: int) -> tuple[list[float], list[float]]:
    bundle = load_bundle()
    sid = stream_id_for(tenant, "run", "adm")
    await store.append(
        sid,
        [
            envelope_for(
                RunStarted(run_id="adm", agent_id="agent"),
                tenant_id=tenant,
                stream_id=sid,
                correlation_id="bench",
                actor="bench",
            )
        ],
    )
    handler = AdmissionHandler(store, bundle)
    ask = {
        "run_id": "adm",
        "model": "gpt-4o",
        "estimate": {"input_tokens": 5, "max_output_tokens": 5},
    }
    figure: list[float] = []
    for i in range(n):
        t0 = time.perf_counter()
        await handler.admit(tenant, {**ask, "step_index": i + 1}, {})
        figure.append(time.perf_counter() - t0)
        # The step runs and reports (untimed), as an agent's would, releasing its reservation.
        step = StepRecorded(run_id="adm", agent_id="agent", step_index=i + 1, input_tokens=1)
        await store.append(
            sid,
            [envelope_for(step, tenant_id=tenant, stream_id=sid, correlation_id="b", actor="b")],
        )
    doc = {
        "tenant_id": tenant,
        "run": handler.runs.cached(tenant, "adm").as_input(),  # type: ignore[union-attr]
        "step": {
            "index": n + 1,
            "kind": "llm_call",
            "model": "gpt-4o",
            "tool": None,
            "estimate": {"input_tokens": 5, "max_output_tokens": 5, "cost_usd": 0.0},
        },
    }

    async def bare(i: int) -> object:
        return bundle.evaluate(doc)

    return figure, await timed(n, bare)


def sum_p50(*samples: list[float]) -> list[float]:
    """A one-value sample holding the sum of the samples' medians (a composite floor)."""
    return [sum(statistics.median(s) for s in samples)]


async def main(n: int) -> None:
    base = Path(tempfile.mkdtemp(prefix="mc-bench-app-"))
    pg = start_postgres(base)
    apply_all(pg.dsn())
    pool = await open_pool(pg.dsn())
    try:
        print(f"Mission Control application-layer benchmark ({n:,} commands, one at a time)")
        pg_store, twin = EventStore(pool), InMemoryEventStore()
        print(" PostgreSQL")
        floor = await bare_appends(pg_store, "bench", n)
        line("record_steps (one step, cached run)", await record_steps(pg_store, "bench", n), floor)
        adm, regopy = await admissions(pg_store, "bench", n)
        print(f"  {'(bare regopy evaluation':<40} p50 {statistics.median(regopy) * 1e3:6.3f} ms)")
        line("admit, in process (no NATS)", adm, sum_p50(floor, regopy))
        print(" in-memory twin (the layer's own Python cost)")
        floor = await bare_appends(twin, "bench", n)
        line("record_steps (one step, cached run)", await record_steps(twin, "bench", n), floor)
        adm, regopy = await admissions(twin, "bench", n)
        line("admit, in process (no NATS)", adm, sum_p50(floor, regopy))
    finally:
        await pool.close()
        pg.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--commands", type=int, default=1000)
    asyncio.run(main(ap.parse_args().commands))
