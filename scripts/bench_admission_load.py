"""Admission under load: one at a time, a sustained open loop, and a flood of clients.

Starts a whole system (``mctl up --detach``) in a scratch data directory and drives admissions
through the public HTTP API. Each figure is printed beside floors measured in the same run:

* one request at a time (wrk, one connection): p50/p99, beside bare regopy evaluation plus a bare
  NATS request round trip, and beside a bare uvicorn round trip (target p50 <= 3 ms);
* a sustained open loop at ``--rate`` requests/s (400 by default): requests leave on schedule
  whether or not earlier ones were answered, and latency counts from the scheduled time, so
  queueing shows instead of a politely slower client (target: the rate achieved, p99 <= 25 ms,
  only 200s);
* ``--clients`` concurrent clients (250) for ``--flood-seconds`` (4) with wrk: p99 of every
  answer, the count of 200/429/5xx, and a check that every 200 decision is in the event store
  (target: the excess refused with 429, p99 <= 250 ms, no 5xx, every 200 durable).

wrk drives the closed-loop phases (install it with ``sudo apt-get install -y wrk``); the open loop
runs in this process on a minimal HTTP/1.1 client, whose lag behind its schedule is printed so a
load generator that falls behind cannot pass for a slow system.

    python scripts/bench_admission_load.py [--rate 400] [--seconds 5] [--clients 250]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil

from libs.contracts.events import AdmissionDecided
from libs.contracts.registry import decode
from libs.eventbus.db import open_pool
from libs.eventbus.store import EventStore
from services.policy_admission.bundle import bench_bare_evaluation

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from benchkit import bare_nats_round_trip, pct, whole_system  # noqa: E402

LUA = HERE / "bench_admission.lua"
BODY = (
    b'{"step_index":1,"kind":"llm_call","model":"gpt-4o-mini",'
    b'"estimate":{"input_tokens":1,"max_output_tokens":1}}'
)
BARE_ANSWER = b'{"decision_id":"0","outcome":"allow","reasons":[]}'


# --- floors ---------------------------------------------------------------------------------------


async def bare_asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The least an HTTP answer costs under uvicorn: read the body, answer a fixed JSON."""
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": BARE_ANSWER})


def serve_bare(port: int) -> None:
    """Run :func:`bare_asgi` under uvicorn with the gateway's server settings."""
    import uvicorn

    uvicorn.run(bare_asgi, host="127.0.0.1", port=port, log_level="warning", access_log=False)


@contextmanager
def terminating(argv: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    """A child process, terminated on exit."""
    proc = subprocess.Popen(argv)
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on port {port} after {timeout}s")


# --- CPU per decision -----------------------------------------------------------------------------


def process_groups(state: dict[str, Any], data_dir: Path) -> dict[str, list[psutil.Process]]:
    """The processes of each service, of PostgreSQL (the server and its backends) and of NATS."""
    groups = {c["name"]: [psutil.Process(int(c["pid"]))] for c in state["children"] if c.get("pid")}
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or ())
        if str(data_dir) not in cmd:
            continue
        if "nats-server" in cmd:
            groups["nats"] = [proc]
        elif "postgres" in cmd and "-D" in cmd:
            groups["postgres"] = [proc, *proc.children()]
    return groups


def cpu_seconds(procs: list[psutil.Process]) -> float:
    """User plus system CPU seconds the processes have used so far."""
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def cpu_per_request(
    groups: dict[str, list[psutil.Process]], work: Callable[[], dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, float]]:
    """Run ``work`` (a wrk phase) and return its result and the CPU ms per request by group."""
    before = {name: cpu_seconds(ps) for name, ps in groups.items()}
    result = work()
    n = max(1, int(result["requests"]))
    used = {name: (cpu_seconds(ps) - before[name]) * 1000 / n for name, ps in groups.items()}
    return result, used


# --- wrk ------------------------------------------------------------------------------------------


def wrk(
    url: str,
    *,
    connections: int,
    seconds: float,
    env: dict[str, str],
    threads: int = 1,
) -> dict[str, Any]:
    """Run wrk with :data:`LUA` and return the JSON summary the script writes."""
    with tempfile.TemporaryDirectory(prefix="mc-wrk-") as d:
        out = Path(d) / "out.json"
        subprocess.run(
            [
                "wrk",
                f"-t{threads}",
                f"-c{connections}",
                # wrk takes whole seconds ("3s"), not "3.0s".
                f"-d{max(1, round(seconds))}s",
                "--timeout",
                "10s",
                "-s",
                str(LUA),
                url,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            env={**os.environ, **env, "MC_BENCH_OUT": str(out)},
        )
        result: dict[str, Any] = json.loads(out.read_text())
    return result


def ms(us: float) -> float:
    return us / 1000


# --- the open loop --------------------------------------------------------------------------------


class RawConnection:
    """One keep-alive HTTP/1.1 connection: the cheapest client Python can be, so the load
    generator costs little next to the system it measures."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, host: str, port: int) -> RawConnection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def round_trip(self, request: bytes) -> tuple[int, bytes]:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        body = await self.reader.readexactly(length) if length else b""
        return status, body

    def close(self) -> None:
        self.writer.close()


async def open_loop(
    url: str, key: str, runs: list[str], rate: int, seconds: float
) -> tuple[float, list[float], Counter[int], float, list[str]]:
    """Send ``rate`` admissions a second for ``seconds``, on schedule.

    Returns (achieved rate, latencies from each request's scheduled time, statuses, the largest
    lag of a send behind its schedule, decision ids of the 200 answers).
    """
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    idle = [await RawConnection.open(host, port) for _ in range(64)]
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    ids: list[str] = []
    total = int(rate * seconds)
    finished_at = 0.0

    def request(i: int) -> bytes:
        run = runs[i % len(runs)]
        return (
            f"POST /v1/runs/{run}/admissions HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(BODY)}\r\n\r\n"
        ).encode() + BODY

    async def one(i: int, scheduled: float) -> None:
        nonlocal finished_at
        conn = idle.pop() if idle else await RawConnection.open(host, port)
        status, body = await conn.round_trip(request(i))
        finished_at = time.perf_counter()
        latencies.append(finished_at - scheduled)
        statuses[status] += 1
        if status == 200:
            ids.append(json.loads(body)["decision_id"])
        idle.append(conn)

    tasks: list[asyncio.Task[None]] = []
    lag = 0.0
    start = time.perf_counter() + 0.05
    for i in range(total):
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        lag = max(lag, time.perf_counter() - scheduled)
        tasks.append(asyncio.create_task(one(i, scheduled)))
    await asyncio.gather(*tasks)
    for conn in idle:
        conn.close()
    return sum(statuses.values()) / (finished_at - start), latencies, statuses, lag, ids


# --- the system -----------------------------------------------------------------------------------


def create_runs(base: str, key: str, n: int) -> list[str]:
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=base, headers=headers, timeout=60) as c:
        runs = []
        for i in range(n):
            r = c.post("/v1/runs", json={"agent_id": f"load-{i % 10}"})
            r.raise_for_status()
            runs.append(r.json()["run_id"])
    return runs


def missing_decisions(database_url: str, tenant: str, ids: list[str]) -> int:
    """How many of ``ids`` have no ``admission.decided`` event in the store."""

    async def read(pool: Any) -> set[str]:
        store = EventStore(pool)
        found: set[str] = set()
        after = 0
        while True:
            batch = await store.read_all(after, 5000, tenant_id=tenant)
            if not batch:
                return found
            for env in batch:
                if env.event_type == "admission.decided":
                    event = decode(env)
                    assert isinstance(event, AdmissionDecided)
                    found.add(event.decision_id)
            after = batch[-1].position or after

    async def main() -> set[str]:
        pool = await open_pool(database_url, min_size=1, max_size=2)
        try:
            return await read(pool)
        finally:
            await pool.close()

    stored = asyncio.run(main())
    return sum(1 for i in ids if i not in stored)


def status_line(statuses: dict[Any, int]) -> str:
    counts = {int(k): v for k, v in statuses.items()}
    five = sum(v for k, v in counts.items() if k >= 500)
    other = sum(v for k, v in counts.items() if k not in (200, 429) and k < 500)
    return f"200: {counts.get(200, 0)}, 429: {counts.get(429, 0)}, 5xx: {five}, other: {other}"


def run_bench(args: argparse.Namespace) -> None:
    """Start the system, measure the floors and the three phases, stop the system."""
    bare_port = free_port()
    tenant = "bench-load"
    with (
        terminating([sys.executable, __file__, "--serve-bare", str(bare_port)]) as bare,
        whole_system(tenant, prefix="mc-bench-load-") as system,
    ):
        wait_for_port(bare_port)
        state, data_dir, base, key = system.state, system.data_dir, system.gateway, system.key
        runs = create_runs(base, key, args.runs)
        print("Mission Control admission under load (whole system and load generator on this box)")

        rego = bench_bare_evaluation(3000)
        rtt = asyncio.run(bare_nats_round_trip(data_dir, state["nats_url"]))
        floor50 = (statistics.median(rego) + statistics.median(rtt)) * 1000
        floor99 = (pct(rego, 99) + pct(rtt, 99)) * 1000
        bare_env = {"MC_BENCH_PATH": "/bare"}
        bare_http, bare_cpu = cpu_per_request(
            {"bare": [psutil.Process(bare.pid)]},
            lambda: wrk(f"http://127.0.0.1:{bare_port}", connections=1, seconds=3, env=bare_env),
        )

        runs_file = data_dir.parent / "runs.txt"  # removed with the data directory
        runs_file.write_text("\n".join(runs))
        env = {"MC_BENCH_KEY": key, "MC_BENCH_RUNS": str(runs_file)}
        wrk(base, connections=4, seconds=2, env=env)  # warm caches, connections, the JIT of regopy
        single, cpu = cpu_per_request(
            process_groups(state, data_dir),
            lambda: wrk(base, connections=1, seconds=args.seconds, env=env),
        )
        print("floors (same run)")
        print(f"  bare regopy evaluation    p50 {statistics.median(rego) * 1000:6.3f} ms  "
              f"p99 {pct(rego, 99) * 1000:6.3f} ms")  # fmt: skip
        print(f"  bare NATS round trip      p50 {statistics.median(rtt) * 1000:6.3f} ms  "
              f"p99 {pct(rtt, 99) * 1000:6.3f} ms")  # fmt: skip
        print(f"  regopy + NATS             p50 {floor50:6.3f} ms  p99 {floor99:6.3f} ms")
        print(f"  bare uvicorn round trip   p50 {ms(bare_http['p50_us']):6.3f} ms  "
              f"p99 {ms(bare_http['p99_us']):6.3f} ms  (wrk, one connection), "
              f"CPU {bare_cpu['bare']:.3f} ms a request")  # fmt: skip
        print("admission, one request at a time (wrk, one connection)")
        p50 = ms(single["p50_us"])
        print(f"  {single['requests']} requests  p50 {p50:6.2f} ms  "
              f"p99 {ms(single['p99_us']):6.2f} ms  "
              f"p50 / (regopy + NATS) {p50 / floor50:4.1f}  "
              f"p50 / (regopy + NATS + uvicorn) {p50 / (floor50 + ms(bare_http['p50_us'])):4.1f}  "
              f"[{status_line(single['statuses'])}]  target p50 <= 3 ms")  # fmt: skip
        print("  CPU per decision: " + ", ".join(
            f"{name} {value:.2f} ms" for name, value in sorted(cpu.items(), key=lambda x: -x[1])
        ) + f"; total {sum(cpu.values()):.2f} ms")  # fmt: skip

        if "open" not in args.phases:
            return
        achieved, lat, statuses, lag, ids = asyncio.run(
            open_loop(base, key, runs, args.rate, args.seconds)
        )
        lat_ms = [x * 1000 for x in lat]
        print(f"admission, open loop at {args.rate}/s for {args.seconds:g} s")
        print(f"  achieved {achieved:6.0f}/s  p50 {statistics.median(lat_ms):7.2f} ms  "
              f"p99 {pct(lat_ms, 99):7.2f} ms  max {max(lat_ms):7.2f} ms  "
              f"[{status_line(statuses)}]  generator lag max {lag * 1000:.1f} ms  "
              "target p99 <= 25 ms, only 200s")  # fmt: skip
        lost = missing_decisions(system.admin_url, tenant, ids)
        print(f"  {len(ids)} decisions answered 200, {lost} of them missing from the store")

        flood = wrk(base, connections=args.clients, seconds=args.flood_seconds, env=env, threads=2)
        flood_ids: list[str] = flood["decision_ids"]
        lost = missing_decisions(system.admin_url, tenant, flood_ids)
        errors = {k: v for k, v in flood["errors"].items() if v and k != "status"}
        print(f"admission, {args.clients} concurrent clients for {args.flood_seconds:g} s (wrk)")
        print(f"  {flood['requests']} answers  p50 {ms(flood['p50_us']):7.2f} ms  "
              f"p99 {ms(flood['p99_us']):7.2f} ms  max {ms(flood['max_us']):7.2f} ms  "
              f"[{status_line(flood['statuses'])}]  socket errors {errors or 'none'}")  # fmt: skip
        print(f"  {len(flood_ids)} decisions answered 200, {lost} of them missing from the store;"
              " target: excess refused with 429, p99 <= 250 ms, 0 5xx")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=int, default=400, help="open-loop requests per second")
    ap.add_argument("--seconds", type=float, default=5, help="length of the first two phases")
    ap.add_argument("--clients", type=int, default=250, help="concurrent clients of the flood")
    ap.add_argument("--flood-seconds", type=float, default=4)
    ap.add_argument("--runs", type=int, default=200, help="runs the admissions are spread over")
    ap.add_argument(
        "--phases",
        default="single,open,flood",
        help="which phases to run after the floors (comma-separated: single, open, flood)",
    )
    ap.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_bare:
        serve_bare(args.serve_bare)
        return
    if shutil.which("wrk") is None:
        raise SystemExit(
            "wrk is not installed; it drives the closed-loop phases of this benchmark. "
            "Install it with `sudo apt-get install -y wrk` (Debian, Ubuntu) and run again."
        )
    run_bench(args)


if __name__ == "__main__":
    main()
