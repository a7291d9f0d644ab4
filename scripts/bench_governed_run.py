"""Governed-run benchmark: admission latency, ingest throughput, stop latency.

Starts a whole system (``mctl up --detach``) in a scratch data directory and drives it through the
public HTTP API. Each figure is printed beside its floor, measured in the same run:

* admission p50/p99 one request at a time (and, with ``--rates``, at open-loop rates from this
  Python client), beside bare regopy evaluation plus a bare NATS request round trip. Above about
  100/s this single Python client queues requests itself and stops measuring the system: use
  ``scripts/bench_admission_load.py`` (wrk) for sustained and overload figures;
* ingest throughput from POST /v1/steps:batch until every step is queryable in ClickHouse, beside
  a bare batched chDB insert of the same rows (target >= 5,000 step events/s);
* stop latency from the deny answer to the incident being visible in a query (target p99 <= 1 s).

    python scripts/bench_governed_run.py [--rates 50 100] [--seconds 5] [--steps 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import nats

from services.gateway.keys import provision_tenant, run_with_pool
from services.policy_admission.bundle import bench_bare_evaluation


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def mctl(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "libs.runtime.cli", *args], check=True)


async def bare_nats_round_trip(url: str, n: int = 2000) -> list[float]:
    """Seconds per request–reply round trip to an in-process echo responder."""
    nc = await nats.connect(url)

    async def echo(msg: Any) -> None:
        await msg.respond(msg.data)

    await nc.subscribe("bench.echo", cb=echo)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await nc.request("bench.echo", b"{}", timeout=2)
        out.append(time.perf_counter() - t0)
    await nc.close()
    return out


async def admission_load(
    base: str, key: str, rates: list[int], seconds: float
) -> list[tuple[int, float, list[float], int]]:
    """Closed-loop (rate 0: one request at a time) then open-loop steps at each offered rate.

    Open loop: requests leave on schedule whether or not earlier ones finished, so a rate above
    the system's knee shows up as queueing in p50/p99 instead of a politely slower client.
    Returns (offered rate, achieved rate, latencies, non-200 answers) per step.
    """
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=120) as c:
        runs = []
        for i in range(50):
            r = await c.post("/v1/runs", json={"agent_id": f"bench-{i}"})
            runs.append(r.json()["run_id"])
        body = {"step_index": 1, "model": "gpt-4o-mini",
                "estimate": {"input_tokens": 50, "max_output_tokens": 50}}  # fmt: skip
        for run in runs:  # warm caches and connections
            await c.post(f"/v1/runs/{run}/admissions", json=body)
        out = []
        for rate in [0, *rates]:
            latencies: list[float] = []
            errors = 0

            async def one(i: int, latencies: list[float] = latencies) -> None:
                nonlocal errors
                t0 = time.perf_counter()
                r = await c.post(f"/v1/runs/{runs[i % len(runs)]}/admissions", json=body)
                if r.status_code != 200:
                    errors += 1
                latencies.append(time.perf_counter() - t0)

            start = time.perf_counter()
            if rate == 0:
                total = 300
                for i in range(total):
                    await one(i)
            else:
                total = int(rate * seconds)
                tasks = []
                for i in range(total):
                    delay = start + i / rate - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    tasks.append(asyncio.create_task(one(i)))
                await asyncio.gather(*tasks)
            out.append((rate, total / (time.perf_counter() - start), latencies, errors))
        return out


def ingest(base: str, key: str, steps: int) -> float:
    """Steps per second from the first batch POST until ClickHouse shows every step."""
    headers = {"Authorization": f"Bearer {key}"}
    per_run = 500
    with httpx.Client(base_url=base, headers=headers, timeout=120) as c:
        n_runs = steps // per_run
        runs = [c.post("/v1/runs", json={"agent_id": "ingest"}).json()["run_id"]
                for _ in range(n_runs)]  # fmt: skip
        t0 = time.perf_counter()
        for run in runs:
            items = [
                {"run_id": run, "step_index": i, "kind": "llm_call", "model": "gpt-4o-mini",
                 "input_tokens": 10, "output_tokens": 5, "duration_ms": 10}
                for i in range(1, per_run + 1)
            ]  # fmt: skip
            r = c.post("/v1/steps:batch", json={"items": items})
            r.raise_for_status()
        accepted = time.perf_counter() - t0
        while True:
            got = c.get("/v1/runs", params={"agent_id": "ingest", "limit": 500}).json()["runs"]
            if sum(r["last_step_index"] or 0 for r in got) >= n_runs * per_run:
                break
            time.sleep(0.05)
        elapsed = time.perf_counter() - t0
        print(f"  {n_runs * per_run:,} steps accepted by the API in {accepted:.2f}s, "
              f"queryable after {elapsed:.2f}s")  # fmt: skip
        return n_runs * per_run / elapsed


def bare_chdb_insert(rows: int) -> float:
    import chdb.session

    d = tempfile.mkdtemp(prefix="mc-bench-ch-")
    s: Any = chdb.session.Session(d)  # type: ignore[no-untyped-call]
    s.query("CREATE DATABASE b")
    s.query(
        "CREATE TABLE b.steps (tenant_id String, run_id String, step_index UInt32, "
        "input_tokens UInt64, output_tokens UInt64, version UInt64) "
        "ENGINE = ReplacingMergeTree(version) ORDER BY (tenant_id, run_id, step_index)"
    )
    data = [
        {"tenant_id": "t", "run_id": f"r{i // 500}", "step_index": i % 500, "input_tokens": 10,
         "output_tokens": 5, "version": i}
        for i in range(rows)
    ]  # fmt: skip
    t0 = time.perf_counter()
    for start in range(0, rows, 5000):
        body = "\n".join(json.dumps(r) for r in data[start : start + 5000])
        s.query(f"INSERT INTO b.steps FORMAT JSONEachRow {body}")
    rate = rows / (time.perf_counter() - t0)
    s.close()
    shutil.rmtree(d, ignore_errors=True)
    return rate


def wait_until_idle(metrics_url: str, timeout: float = 300) -> float:
    """Seconds until audit-replay reports no projection lag (the backlog is drained)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        text = httpx.get(metrics_url, timeout=10).text
        lag = [ln for ln in text.splitlines() if ln.startswith("mc_projection_lag_events ")]
        if lag and float(lag[0].split()[1]) == 0:
            return time.perf_counter() - t0
        time.sleep(0.2)
    return time.perf_counter() - t0


def stop_latency(base: str, key: str, n: int) -> list[float]:
    headers = {"Authorization": f"Bearer {key}"}
    out = []
    with httpx.Client(base_url=base, headers=headers, timeout=30) as c:
        for _ in range(n):
            run = c.post("/v1/runs", json={"agent_id": "stopper"}).json()["run_id"]
            body = {"step_index": 1, "estimate": {"input_tokens": 20000, "max_output_tokens": 1}}
            r = c.post(f"/v1/runs/{run}/admissions", json=body)
            t0 = time.perf_counter()
            assert r.json()["outcome"] == "deny", r.text
            while not c.get("/v1/incidents", params={"run_id": run}).json()["incidents"]:
                time.sleep(0.005)
            out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    # Higher rates measure this client's own queue, not the system: see bench_admission_load.py.
    ap.add_argument("--rates", type=int, nargs="*", default=[50, 100])
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--stops", type=int, default=50)
    args = ap.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="mc-bench-")) / "mc"
    mctl("up", "--detach", "--data-dir", str(data_dir))
    try:
        state = json.loads((data_dir / "state.json").read_text())
        base = next(c["url"] for c in state["children"] if c["name"] == "gateway")
        _, key = run_with_pool(state["postgres_admin_url"], lambda p: provision_tenant(p, "bench"))
        print("Mission Control governed-run benchmark (whole system on this machine)")

        rego = bench_bare_evaluation(3000)
        rtt = asyncio.run(bare_nats_round_trip(state["nats_url"]))
        floor50 = (statistics.median(rego) + statistics.median(rtt)) * 1000
        floor99 = (pct(rego, 99) + pct(rtt, 99)) * 1000
        steps = asyncio.run(admission_load(base, key, args.rates, args.seconds))
        print("admission through the HTTP API (gateway -> NATS -> policy-admission -> store)")
        print(f"  floor p50 {floor50:6.2f} ms, p99 {floor99:6.2f} ms "
              f"(bare regopy evaluation p50 {statistics.median(rego) * 1000:.3f} ms "
              f"+ bare NATS round trip p50 {statistics.median(rtt) * 1000:.3f} ms); "
              "target p50 <= 2 ms, p99 <= 10 ms at 500/s")  # fmt: skip
        for offered, achieved, lat, errs in steps:
            ms = [x * 1000 for x in lat]
            label = "one at a time" if offered == 0 else f"offered {offered:>4}/s"
            print(f"  {label:<16} achieved {achieved:6.0f}/s  p50 {statistics.median(ms):9.2f} ms"
                  f"  p99 {pct(ms, 99):9.2f} ms  p50/floor {statistics.median(ms) / floor50:6.1f}"
                  f"  non-200 {errs}")  # fmt: skip

        rate = ingest(base, key, args.steps)
        floor = bare_chdb_insert(args.steps)
        print("ingest (HTTP batch -> event store -> relay -> JetStream -> ClickHouse)")
        print(
            f"  {rate:,.0f} step events/s   floor (bare chDB batched insert) {floor:,.0f}/s   "
            "target >= 5,000/s"
        )

        # Right after the ingest burst the relay and projections still work through the cost
        # events it caused; measure the stop path both behind that backlog and on a quiet system.
        audit = next(c["url"] for c in state["children"] if c["name"] == "audit-replay")
        busy = [x * 1000 for x in stop_latency(base, key, args.stops // 2)]
        drained = wait_until_idle(audit + "/metrics")
        quiet = [x * 1000 for x in stop_latency(base, key, args.stops)]
        print("stop latency (deny answered -> incident visible in a query)")
        print(f"  behind the ingest backlog: p50 {statistics.median(busy):7.1f} ms   "
              f"p99 {pct(busy, 99):7.1f} ms   (backlog drained {drained:.1f}s later)")  # fmt: skip
        print(f"  quiet system:              p50 {statistics.median(quiet):7.1f} ms   "
              f"p99 {pct(quiet, 99):7.1f} ms   target p99 <= 1000 ms")  # fmt: skip
    finally:
        mctl("down", "--data-dir", str(data_dir))
        shutil.rmtree(data_dir.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
