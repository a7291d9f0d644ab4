"""Workflow benchmark of the whole system: step transition overhead and DAG throughput.

Starts a whole system (``mctl up --detach``) in a scratch data directory, as the other whole-system
benchmarks do, and serves its workflow steps with the worker SDK in this process.

* **Step transition overhead**: executions of a chain of ``--steps`` steps, one execution at a
  time, served by a worker whose handler returns at once. A transition runs from the moment the
  store records a step's end (``recorded_at`` of the attempt's ``run.completed``: the
  ``clock_timestamp()`` of its insert) to the moment the worker's handler receives the next
  step (wall clock, same machine). Between the two the system: commits the run's end, the relay
  publishes it, the engine's execution consumer takes it and appends the step's completion and
  the next dispatch in one transaction (``recorded_at`` of ``execution.step_dispatched``), the
  relay publishes that, the engine's dispatch consumer puts the work item on the agent's work
  queue, and the gateway hands it to the worker's long poll. A plain NATS subscriber of this
  benchmark stamps when each of ``run.completed``, ``execution.step_dispatched`` and the work
  item goes by on the bus, which splits the transition into those hops.
* **Floor**, measured in the same run: the least any dispatch mechanism with the log as the
  system of record needs after a step's end is recorded: learn of it over the bus and answer
  over it (one NATS request–reply round trip to an in-process responder, the two one-way hops
  of the end going to the engine and the work going to the worker), and make the dispatch
  durable (one ``INSERT`` + commit on the same PostgreSQL, ``fsync`` on).
* **Throughput**: ``--executions`` concurrent executions of a 10-step DAG (fan-out, fan-in,
  fan-out, fan-in) under a tenant budget, each step admitted and recorded (priced, so budgets
  settle) by the worker: executions and steps per second from the first start to the last end.
  Then checks from the store that every step was dispatched, taken and completed exactly once
  and that spend never passed the cap.

    python scripts/bench_workflow.py [--steps 20] [--chains 10] [--executions 100]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Iterable
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil
import psycopg

from libs.contracts.subjects import EVENTS_PREFIX, WORK_PREFIX
from services.gateway.worker import Step, Worker

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ingest import cpu_seconds
from benchkit import System, bare_nats_round_trip, bench_connect, pct, whole_system

TENANT = "bench-wf"
CAP = Decimal("50")
DAG = [
    ("a", ()), ("b1", ("a",)), ("b2", ("a",)), ("b3", ("a",)), ("c", ("b1", "b2", "b3")),
    ("d1", ("c",)), ("d2", ("c",)), ("d3", ("c",)), ("d4", ("c",)), ("e", ("d1", "d2", "d3", "d4")),
]  # fmt: skip


class Bus:
    """Wall-clock arrival on NATS of run ends, dispatches and work items (a plain subscriber)."""

    def __init__(self) -> None:
        self.ended: dict[str, float] = {}
        self.dispatched: dict[str, float] = {}
        self.work: dict[str, float] = {}
        self.completed: dict[str, asyncio.Event] = {}
        self._nc: Any = None

    async def start(self, system: System) -> None:
        self._nc = await bench_connect(system.data_dir, system.state["nats_url"])

        async def on_event(msg: Any) -> None:
            now = time.time()
            env = orjson.loads(msg.data)
            kind, payload = env["event_type"], env["payload"]
            if kind == "run.completed":
                self.ended.setdefault(payload["run_id"], now)
            elif kind == "execution.step_dispatched":
                self.dispatched.setdefault(payload["run_id"], now)
            elif kind in ("execution.completed", "execution.failed", "execution.budget_exceeded"):
                self.done(payload["execution_id"]).set()

        async def on_work(msg: Any) -> None:
            # The first publish: the dispatch consumer's later copy is a duplicate MC_WORK drops.
            self.work.setdefault(orjson.loads(msg.data)["run_id"], time.time())

        for kind in ("run.completed", "execution.step_dispatched", "execution.completed",
                     "execution.failed", "execution.budget_exceeded"):  # fmt: skip
            await self._nc.subscribe(f"{EVENTS_PREFIX}.{TENANT}.{kind}", cb=on_event)
        await self._nc.subscribe(f"{WORK_PREFIX}.{TENANT}.>", cb=on_work)
        await self._nc.flush()

    def done(self, execution_id: str) -> asyncio.Event:
        return self.completed.setdefault(execution_id, asyncio.Event())

    async def close(self) -> None:
        await self._nc.close()


def store_times(admin_url: str, kinds: Iterable[str]) -> dict[str, dict[str, float]]:
    """``recorded_at`` (epoch seconds) of each event of ``kinds`` in the tenant, by run id."""
    out: dict[str, dict[str, float]] = {k: {} for k in kinds}
    with psycopg.connect(admin_url) as conn:
        rows = conn.execute(
            "SELECT event_type, payload->>'run_id', extract(epoch FROM recorded_at)"
            " FROM eventstore.events WHERE tenant_id = %s AND event_type = ANY(%s)",
            (TENANT, list(kinds)),
        ).fetchall()
    for kind, run_id, at in rows:
        out[kind][run_id] = float(at)
    return out


def bare_commit(admin_url: str, n: int = 500) -> list[float]:
    """Seconds per one-row INSERT + commit on the system's PostgreSQL (fsync on)."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS public.bench_commit (id bigserial, body jsonb)")
        out = []
        body = orjson.dumps({"event_type": "execution.step_dispatched", "run_id": "x" * 40})
        for _ in range(n):
            t0 = time.perf_counter()
            with conn.transaction():
                conn.execute("INSERT INTO public.bench_commit (body) VALUES (%s)", (body.decode(),))
            out.append(time.perf_counter() - t0)
    return out


def _own_cpu() -> float:
    t = psutil.Process().cpu_times()
    return float(t.user + t.system)


def ms(xs: list[float]) -> str:
    return (f"p50 {statistics.median(xs) * 1e3:6.2f} ms  p95 {pct(xs, 95) * 1e3:6.2f} ms  "
            f"p99 {pct(xs, 99) * 1e3:6.2f} ms")  # fmt: skip


async def setup(c: httpx.AsyncClient, steps: int) -> None:
    for agent in ("fast", "dag"):
        (await c.post("/v1/agents", json={"agent_id": agent})).raise_for_status()
    chain = [{"id": "s1", "agent": "fast"}] + [
        {"id": f"s{i}", "agent": "fast", "depends_on": [f"s{i - 1}"]} for i in range(2, steps + 1)
    ]
    (await c.post("/v1/workflows", json={"name": "chain", "steps": chain})).raise_for_status()
    dag = [
        {"id": s, "agent": "dag", "depends_on": list(d), "estimate": {"cost_usd": "0.01"}}
        for s, d in DAG
    ]
    (await c.post("/v1/workflows", json={"name": "dag", "steps": dag})).raise_for_status()
    budget = {"scope": "tenant", "window": "day", "cap_usd": str(CAP)}
    (await c.put("/v1/budgets", json=budget)).raise_for_status()


async def run_one(c: httpx.AsyncClient, bus: Bus, workflow: str) -> str:
    got = (await c.post(f"/v1/workflows/{workflow}/executions", json={})).json()
    eid: str = got["execution_id"]
    await asyncio.wait_for(bus.done(eid).wait(), 120)
    return eid


async def transitions(
    system: System, c: httpx.AsyncClient, bus: Bus, received: dict[str, float], chains: int
) -> None:
    await run_one(c, bus, "chain")  # warm-up: work queues and consumers created, caches filled
    runs: list[list[str]] = []
    for _ in range(chains):
        eid = await run_one(c, bus, "chain")
        view = (await c.get(f"/v1/executions/{eid}")).json()
        assert view["status"] == "completed", view
        runs.append([s["run_id"] for s in view["steps"]])
    times = store_times(system.admin_url, ("run.completed", "execution.step_dispatched"))
    ended, dispatched = times["run.completed"], times["execution.step_dispatched"]
    hops: dict[str, list[float]] = {k: [] for k in (
        "total", "engine: run end recorded -> next dispatch appended",
        "engine: dispatch appended -> work item on the bus",
        "gateway + SDK: work item -> the worker's handler",
    )}  # fmt: skip
    relayed = []
    for chain in runs:
        for prev, nxt in itertools.pairwise(chain):
            t = [ended[prev], dispatched[nxt], bus.work[nxt], received[nxt]]
            hops["total"].append(t[-1] - t[0])
            for name, (a, b) in zip(list(hops)[1:], itertools.pairwise(t), strict=True):
                hops[name].append(b - a)
            relayed.append(bus.ended[prev] - ended[prev])
    print(f"Step transition overhead: {chains} chains of {len(runs[0])} steps, one at a time "
          f"({len(hops['total'])} transitions)")  # fmt: skip
    print(f"  {'step end recorded -> next step in the handler':<48} {ms(hops.pop('total'))}")
    for name, xs in hops.items():
        print(f"    {name:<46} {ms(xs)}")
    print(f"    {'(off the path) relay: run end on the bus':<46} {ms(relayed)}")
    rtt = await bare_nats_round_trip(system.data_dir, system.state["nats_url"], 1000)
    commit = bare_commit(system.admin_url)
    floor = [a + b for a, b in zip(sorted(rtt), sorted(commit), strict=False)]
    print(f"  {'floor: NATS request-reply + INSERT/commit':<48} {ms(floor)}")
    print(f"    {'NATS request-reply round trip':<46} {ms(rtt)}")
    print(f"    {'PostgreSQL one-row INSERT + commit':<46} {ms(commit)}")


async def throughput(system: System, c: httpx.AsyncClient, bus: Bus, n: int) -> None:
    async def start() -> str:
        # Overload is refused at once with a Retry-After (load shedding): a client waits and
        # tries again, as the SDK does.
        while True:
            r = await c.post("/v1/workflows/dag/executions", json={})
            if r.status_code != 429:
                r.raise_for_status()
                return str(r.json()["execution_id"])
            await asyncio.sleep(float(r.headers.get("Retry-After", "1")))

    cpu0, own0 = cpu_seconds(system.state), _own_cpu()
    t0 = time.perf_counter()
    ids = await asyncio.gather(*(start() for _ in range(n)))
    await asyncio.wait_for(asyncio.gather(*(bus.done(e).wait() for e in ids)), 900)
    seconds = time.perf_counter() - t0
    cpu1, own1 = cpu_seconds(system.state), _own_cpu()
    statuses = Counter([(await c.get(f"/v1/executions/{e}")).json()["status"] for e in ids])
    steps = n * len(DAG)
    print(f"Throughput: {n} concurrent executions of a {len(DAG)}-step DAG (fan-out/fan-in), "
          f"each step admitted and recorded, tenant budget ${CAP}/day")  # fmt: skip
    print(f"  {seconds:6.1f} s   {n / seconds:6.1f} executions/s   {steps / seconds:6.1f} steps/s"
          f"   {dict(statuses)}")  # fmt: skip
    used = {name: cpu1.get(name, 0.0) - cpu0.get(name, 0.0) for name in cpu1}
    used["worker (this process)"] = own1 - own0
    per_step = ", ".join(
        f"{name} {sec * 1e3 / steps:.1f}" for name, sec in sorted(used.items(), key=lambda x: -x[1])
    )
    print(f"  CPU ms per step: {sum(used.values()) * 1e3 / steps:.1f} ({per_step})")
    with psycopg.connect(system.admin_url) as conn:
        rows = conn.execute(
            "SELECT event_type, payload->>'execution_id', payload->>'step_id', count(*)"
            " FROM eventstore.events WHERE tenant_id = %s AND event_type IN"
            " ('execution.step_dispatched', 'execution.step_completed')"
            " AND payload->>'execution_id' = ANY(%s) GROUP BY 1, 2, 3",
            (TENANT, ids),
        ).fetchall()
        costs = conn.execute(
            "SELECT coalesce(sum((payload->>'total_cost_usd')::numeric), 0) FROM eventstore.events"
            " WHERE tenant_id = %s AND event_type = 'cost.recorded'",
            (TENANT,),
        ).fetchone()
    per = Counter((kind, e, s) for kind, e, s, k in rows for _ in range(k))
    expected = {(e, s) for e in ids for s, _ in DAG}
    for kind in ("execution.step_dispatched", "execution.step_completed"):
        got = {(e, s): k for (t, e, s), k in per.items() if t == kind}
        once = set(got) == expected and all(k == 1 for k in got.values())
        print(f"  {kind:<28} {sum(got.values()):5} for {len(expected)} steps: "
              f"{'each exactly once' if once else 'NOT exactly once'}")  # fmt: skip
    day = next(b for b in (await c.get("/v1/budgets")).json()["budgets"]
               if b["budget_id"] == "tenant:day")  # fmt: skip
    spent, reserved = Decimal(day["spent_usd"]), Decimal(day["reserved_usd"])
    recorded = costs[0] if costs else Decimal(0)
    print(f"  budget tenant:day: spent ${spent} of ${CAP} (cost.recorded sum ${recorded}), "
          f"reserved ${reserved}: overspend ${max(Decimal(0), spent - CAP)}")  # fmt: skip


async def bench(system: System, steps: int, chains: int, executions: int) -> None:
    received: dict[str, float] = {}
    worker = Worker(system.gateway, system.key, concurrency=32, poll_s=5)

    @worker.agent("fast")
    async def fast(step: Step) -> None:
        received[step.run_id] = time.time()

    @worker.agent("dag")
    async def dag(step: Step) -> None:
        received[step.run_id] = time.time()
        await step.admit(model="gpt-4o-mini", input_tokens=1000, max_output_tokens=100)
        await step.record(model="gpt-4o-mini", input_tokens=1000, output_tokens=100)

    bus = Bus()
    await bus.start(system)
    headers = {"Authorization": f"Bearer {system.key}"}
    running = asyncio.create_task(worker.run())
    try:
        async with httpx.AsyncClient(base_url=system.gateway, headers=headers, timeout=120) as c:
            await setup(c, steps)
            print("Mission Control workflows (whole system and worker on this box)")
            await transitions(system, c, bus, received, chains)
            await throughput(system, c, bus, executions)
    finally:
        worker.stop()
        await running
        await bus.close()


def main(steps: int, chains: int, executions: int) -> None:
    # The per-key and per-tenant rate limits would pace the worker's requests; this measures
    # the mechanism, so they are off (load shedding stays on; the SDK retries its 429s).
    os.environ.update({"MC_RATE_LIMIT_KEY_RPS": "0", "MC_RATE_LIMIT_TENANT_RPS": "0"})
    with whole_system(TENANT, prefix="mc-bench-wf-") as system:
        asyncio.run(bench(system, steps, chains, executions))


def _args() -> Any:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20, help="steps of the chain")
    ap.add_argument("--chains", type=int, default=10, help="chain executions, one at a time")
    ap.add_argument("--executions", type=int, default=100, help="concurrent DAG executions")
    return ap.parse_args()


if __name__ == "__main__":
    a = _args()
    main(a.steps, a.chains, a.executions)
