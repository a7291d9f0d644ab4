"""Evidence benchmark: SOC2 evidence of a one-month period in a tenant of N events, through the
API, beside a floor measured in the same run.

Starts a whole system (``mctl up`` in a scratch directory), appends ``--events`` events to the
benchmark tenant straight into the event store (runs of 10: ``run.started``, eight
``admission.decided`` of which 2 % deny and 3 % warn, ``run.completed``), spread evenly over
three months, then times, ``--repeat`` times each:

* ``GET /v1/evidence/soc2?format=json`` for the middle month (a third of the events);
* with ``--jobs``: the same document as a job (``POST /v1/evidence/soc2/jobs``, polled until
  done, then downloaded);
* the floor: a ``count(*)`` of the month's events of the tenant in PostgreSQL, and a read of all
  of them (``SELECT`` of the rows the document is made from).

    python scripts/bench_evidence.py [--events 100000] [--repeat 3] [--jobs]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from benchkit import System, pct, whole_system

from libs.contracts.envelope import EventEnvelope, stream_id_for
from libs.eventbus.db import open_pool, transaction
from libs.eventbus.store import Append, EventStore

TENANT = "bench-evidence"
START = datetime(2026, 1, 1, tzinfo=UTC)
SPAN = timedelta(days=90)
PERIOD = {"from": "2026-01-31T00:00:00+00:00", "to": "2026-03-02T00:00:00+00:00"}
RUN_EVENTS = 10
BATCH_RUNS = 200


def _run(i: int, at: datetime, step: timedelta) -> tuple[str, list[EventEnvelope]]:
    run_id = str(uuid.uuid4())
    stream = stream_id_for(TENANT, "run", run_id)
    rnd = random.Random(i)

    def env(n: int, event_type: str, payload: dict[str, Any]) -> EventEnvelope:
        return EventEnvelope(
            event_type=event_type,
            schema_version=1,
            tenant_id=TENANT,
            stream_id=stream,
            occurred_at=at + step * n,
            correlation_id=run_id,
            actor="agent:bench",
            payload=payload,
        )

    out = [env(0, "run.started", {"run_id": run_id, "agent_id": f"a{i % 100}"})]
    for n in range(1, RUN_EVENTS - 1):
        r = rnd.random()
        outcome = "deny" if r < 0.02 else "warn" if r < 0.05 else "allow"
        reasons = [{"policy_id": f"p{rnd.randrange(20)}"}] if outcome != "allow" else []
        out.append(
            env(
                n,
                "admission.decided",
                {"run_id": run_id, "outcome": outcome, "reasons": reasons, "tool": "search"},
            )
        )
    out.append(env(RUN_EVENTS - 1, "run.completed", {"run_id": run_id}))
    return stream, out


async def fill(system: System, events: int) -> float:
    """Append ``events`` events to the tenant; the seconds it took."""
    pool = await open_pool(system.admin_url, max_size=2)
    started = time.perf_counter()
    try:
        store = EventStore(pool)
        runs = events // RUN_EVENTS
        step = SPAN / max(events, 1)
        for first in range(0, runs, BATCH_RUNS):
            appends = []
            for i in range(first, min(first + BATCH_RUNS, runs)):
                stream, envs = _run(i, START + step * i * RUN_EVENTS, step)
                appends.append(Append(stream, envs))
            await store.append_many(appends)
    finally:
        await pool.close()
    return time.perf_counter() - started


async def floors(system: System) -> tuple[float, float, int]:
    """Seconds to count the period's events, to read them all, and how many there are."""
    pool = await open_pool(system.admin_url, max_size=1)
    try:
        q = (
            "FROM eventstore.events WHERE tenant_id = %s "
            "AND occurred_at >= %s::timestamptz AND occurred_at < %s::timestamptz"
        )
        args = (TENANT, PERIOD["from"], PERIOD["to"])
        async with transaction(pool) as c:
            t0 = time.perf_counter()
            cur = await c.execute(f"SELECT count(*) AS n {q}", args)
            row = await cur.fetchone()
            t1 = time.perf_counter()
            cur = await c.execute(f"SELECT * {q}", args)
            await cur.fetchall()
            t2 = time.perf_counter()
        assert row is not None
        return t1 - t0, t2 - t1, int(row["n"])
    finally:
        await pool.close()


def timed(fn: Callable[[], Any], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        out.append(time.perf_counter() - started)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--jobs", action="store_true", help="also time the document as a job")
    args = ap.parse_args()
    with whole_system(TENANT, prefix="mc-bench-evidence-") as system:
        took = asyncio.run(fill(system, args.events))
        print(f"filled {args.events:,} events in {took:.1f} s")
        headers = {"Authorization": f"Bearer {system.key}"}
        with httpx.Client(base_url=system.gateway, headers=headers, timeout=600) as http:

            def sync() -> None:
                r = http.get("/v1/evidence/soc2", params={**PERIOD, "format": "json"})
                r.raise_for_status()

            def job() -> None:
                r = http.post("/v1/evidence/soc2/jobs", json={**PERIOD, "format": "json"})
                r.raise_for_status()
                path = f"/v1/evidence/soc2/jobs/{r.json()['job_id']}"
                while (status := http.get(path).json()["status"]) in ("queued", "running"):
                    time.sleep(0.05)
                assert status == "done", status
                http.get(f"{path}/download").raise_for_status()

            results = {"GET /v1/evidence/soc2 (json)": timed(sync, args.repeat)}
            if args.jobs:
                results["job: create, poll, download (json)"] = timed(job, args.repeat)
        counts, reads = [], []
        for _ in range(args.repeat):
            c, r, n = asyncio.run(floors(system))
            counts.append(c)
            reads.append(r)
    print(f"tenant: {args.events:,} events; period {PERIOD['from']}..{PERIOD['to']}: {n:,} events")
    for name, values in results.items():
        print(f"{name:40} p50 {pct(values, 50):8.3f} s   max {max(values):8.3f} s")
    print(f"{'floor: count(*) of the period':40} p50 {pct(counts, 50):8.3f} s")
    print(f"{'floor: SELECT * of the period':40} p50 {pct(reads, 50):8.3f} s")


if __name__ == "__main__":
    main()
