"""Ingest and stop-latency benchmark of the whole system, with where the CPU goes per step.

Starts a whole system (``mctl up --detach``) in a scratch data directory and drives it through the
public HTTP API. Each figure is printed beside its floor, measured in the same run:

* ingest: step events per second from the first ``POST /v1/steps:batch`` until every step is
  queryable (``GET /v1/runs``), beside a bare batched chDB insert of the same number of step rows
  (target >= 10,000 steps/s);
* stop latency right behind a 20,000-step burst: from the deny answer to the incident being
  visible in ``GET /v1/incidents``, with the burst still flowing through the relay and the
  projections, beside the same measurement on a quiet system (target p99 <= 1 s). Each stop is
  split in three legs: the deny travelling (through the relay) to the incident service until
  the incident is appended; the relay publishing the incident; audit-replay making it
  queryable.
* CPU seconds per 1,000 steps of every process (services, relay, PostgreSQL, NATS) during the
  ingest, so the slowest hop is named by measurement.

    python scripts/bench_ingest.py [--steps 20000] [--stops 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg

from libs.contracts.subjects import EVENTS_PREFIX

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchkit import bare_chdb_insert, bench_connect, pct, whole_system

PER_RUN = 500


def cpu_seconds(state: dict[str, Any]) -> dict[str, float]:
    """CPU seconds used so far by each process of the system (with its child processes)."""
    out: dict[str, float] = {}
    for child in state["children"]:
        try:
            proc = psutil.Process(int(child["pid"]))
            t = proc.cpu_times()
            total = t.user + t.system + t.children_user + t.children_system
            for sub in proc.children(recursive=True):
                with_sub = sub.cpu_times()
                total += with_sub.user + with_sub.system
        except (psutil.Error, KeyError, TypeError, ValueError):
            continue
        out[child["name"]] = out.get(child["name"], 0.0) + total
    return out


def post_burst(c: httpx.Client, steps: int, agent: str) -> list[str]:
    """Start runs and record ``steps`` steps in batches of :data:`PER_RUN`; return the runs."""
    runs = [
        c.post("/v1/runs", json={"agent_id": agent}).json()["run_id"]
        for _ in range(steps // PER_RUN)
    ]
    for run in runs:
        items = [
            {"run_id": run, "step_index": i, "kind": "llm_call", "model": "gpt-4o-mini",
             "input_tokens": 10, "output_tokens": 5, "duration_ms": 10}
            for i in range(1, PER_RUN + 1)
        ]  # fmt: skip
        c.post("/v1/steps:batch", json={"items": items}).raise_for_status()
    return runs


def steps_queryable(c: httpx.Client, agent: str) -> int:
    got = c.get("/v1/runs", params={"agent_id": agent, "limit": 500}).json()["runs"]
    return sum(r["last_step_index"] or 0 for r in got)


def ingest(c: httpx.Client, state: dict[str, Any], steps: int) -> tuple[float, dict[str, float]]:
    """Steps per second until all are queryable, and CPU seconds per process meanwhile."""
    # Runs are started before the clock starts: only the steps are measured.
    before = cpu_seconds(state)
    t0 = time.perf_counter()
    runs = post_burst(c, steps, "ingest")
    accepted = time.perf_counter() - t0
    # Every poll is a query over all the steps: poll gently, or the polling is what is measured.
    deadline = t0 + 600
    while steps_queryable(c, "ingest") < len(runs) * PER_RUN:
        if time.perf_counter() > deadline:
            raise SystemExit("steps not queryable after 600 s: is audit-replay running?")
        time.sleep(0.25)
    elapsed = time.perf_counter() - t0
    after = cpu_seconds(state)
    print(f"  {len(runs) * PER_RUN:,} steps accepted by the API in {accepted:.2f}s, "
          f"queryable after {elapsed:.2f}s")  # fmt: skip
    return len(runs) * PER_RUN / elapsed, {k: after[k] - before.get(k, 0.0) for k in after}


def wait_drained(audit_url: str, timeout: float = 600) -> float:
    """Seconds until audit-replay reports no projection lag."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        text = httpx.get(audit_url + "/metrics", timeout=10).text
        lag = [ln for ln in text.splitlines() if ln.startswith("mc_projection_lag_events ")]
        if lag and float(lag[0].split()[1]) == 0:
            return time.perf_counter() - t0
        time.sleep(0.2)
    return time.perf_counter() - t0


class BusWatch:
    """Wall-clock arrival on NATS of every ``incident.opened``, by run id (a plain subscriber)."""

    def __init__(self, data_dir: Path, nats_url: str) -> None:
        self.seen: dict[str, float] = {}
        self._nc: Any = None
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._run, args=(data_dir, nats_url), daemon=True).start()
        self._ready.wait(30)

    def _run(self, data_dir: Path, nats_url: str) -> None:
        asyncio.set_event_loop(self._loop)

        async def on_msg(msg: Any) -> None:
            self.seen[json.loads(msg.data)["payload"]["run_id"]] = time.time()

        async def start() -> None:
            self._nc = await bench_connect(data_dir, nats_url)
            await self._nc.subscribe(f"{EVENTS_PREFIX}.*.incident.opened", cb=on_msg)
            await self._nc.flush()
            self._ready.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()

    def close(self) -> None:
        """Disconnect (before the servers stop, so the client does not try to reconnect)."""
        asyncio.run_coroutine_threadsafe(self._nc.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)


def stops(c: httpx.Client, admin_url: str, bus: BusWatch, n: int) -> list[tuple[float, ...]]:
    """``n`` denied runs: seconds from deny to incident queryable, and the three legs of it.

    Legs: deny -> incident appended to the store (the violation through the relay to the
    incident service), store -> on the bus (the relay), bus -> queryable (audit-replay).
    """
    timings: list[tuple[str, float, float]] = []
    for _ in range(n):
        run = c.post("/v1/runs", json={"agent_id": "stopper"}).json()["run_id"]
        body = {"step_index": 1, "estimate": {"input_tokens": 20000, "max_output_tokens": 1}}
        r = c.post(f"/v1/runs/{run}/admissions", json=body)
        denied_wall, t0 = time.time(), time.perf_counter()
        assert r.json()["outcome"] == "deny", r.text
        deadline = t0 + 60
        while not c.get("/v1/incidents", params={"run_id": run}).json()["incidents"]:
            if time.perf_counter() > deadline:
                raise SystemExit(f"no incident for denied run {run} after 60 s")
            time.sleep(0.02)
        timings.append((run, denied_wall, time.perf_counter() - t0))
    out: list[tuple[float, ...]] = []
    with psycopg.connect(admin_url) as conn:
        for run, denied_wall, total in timings:
            row = conn.execute(
                "SELECT recorded_at FROM eventstore.events WHERE event_type = 'incident.opened' "
                "AND payload->>'run_id' = %s",
                (run,),
            ).fetchone()
            assert row is not None, f"no incident.opened for {run}"
            stored = row[0].timestamp() - denied_wall
            on_bus = bus.seen.get(run, denied_wall + total) - denied_wall
            out.append((total, stored, on_bus - stored, total - on_bus))
    return out


def report_stops(label: str, measured: list[tuple[float, ...]]) -> float:
    def ms(i: int) -> list[float]:
        return [m[i] * 1000 for m in measured]

    total = ms(0)
    print(f"  {label:<28} p50 {statistics.median(total):7.1f} ms  p99 {pct(total, 99):8.1f} ms")
    for i, leg in enumerate(("deny -> incident stored", "  relay: stored -> on the bus",
                             "  audit: bus -> queryable"), start=1):  # fmt: skip
        print(f"    {leg:<28} p50 {statistics.median(ms(i)):7.1f} ms  p99 {pct(ms(i), 99):8.1f} ms")
    return pct(total, 99)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--stops", type=int, default=30)
    args = ap.parse_args()
    with whole_system("bench") as system:
        state, admin_url = system.state, system.admin_url
        audit = system.url_of("audit-replay")
        headers = {"Authorization": f"Bearer {system.key}"}
        print("Mission Control ingest and stop-latency benchmark (whole system on this machine)")
        with httpx.Client(base_url=system.gateway, headers=headers, timeout=120) as c:
            rate, cpu = ingest(c, state, args.steps)
            floor = bare_chdb_insert(args.steps, PER_RUN)
            print("ingest (HTTP batch -> event store -> relay -> JetStream -> ClickHouse)")
            print(f"  {rate:,.0f} step events/s   floor (bare chDB batched insert) {floor:,.0f}/s"
                  f"   ratio {rate / floor:.3f}   target >= 10,000/s")  # fmt: skip
            print("  CPU per 1,000 steps while ingesting (seconds, every process):")
            per_k = {k: v * 1000 / args.steps for k, v in cpu.items()}
            for name, v in sorted(per_k.items(), key=lambda kv: -kv[1]):
                print(f"    {name:<18} {v:6.3f}")
            print(f"    {'total':<18} {sum(per_k.values()):6.3f}")
            drained = wait_drained(audit)
            print(f"  (cost events and the rest drained {drained:.1f}s after the steps)")

            bus = BusWatch(system.data_dir, state["nats_url"])
            quiet = stops(c, admin_url, bus, args.stops)
            post_burst(c, args.steps, "burst")
            busy = stops(c, admin_url, bus, args.stops)
            bus.close()
            print(
                f"stop latency (deny answered -> incident visible in a query), {args.stops} stops"
            )
            floor_p99 = report_stops("quiet system (floor)", quiet)
            busy_p99 = report_stops(f"behind a {args.steps:,}-step burst", busy)
            print(
                f"  behind the burst / quiet p99 {busy_p99 / floor_p99:.1f}   target p99 <= 1000 ms"
            )
            print(f"  (burst drained {wait_drained(audit):.1f}s after the last stop)")


if __name__ == "__main__":
    main()
