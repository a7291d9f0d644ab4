"""Benchmark of the console's panel APIs: p50/p95 of each panel's answer through the gateway, over
HTTP, with N events in the projections.

Loads ``--events`` events (1,000,000 by default) into the embedded chDB of a scratch system
before it starts (no row passes through Python): the search table from the generator of
``bench_audit_search.py`` (runs of 50 events of 10 tenants, ``t0`` holding 70 %; 1,000 agents;
2 % of decisions deny and 3 % warn, naming one of 50 policies; one run in twenty stopped with an
incident), and the same runs' rows in ``runs``, ``steps``, ``decisions``, ``costs`` (five
models, one of them unpriced) and ``incidents``, spread over the last ``--days`` days so that
the panels' windows hold them; then ``OPTIMIZE ... FINAL`` on each table.

Two floors are measured in the same run. Before the system starts: each call's own query
(audit-replay's handler on the same chDB, in process: no bus, no HTTP), the bare ClickHouse
time. After: ``GET /healthz`` of the gateway, through the same HTTP path and clients as the
panel calls. Each call is then sent by ``--clients`` processes at once, each ``--repeat``
times in a row after two warm-ups; p50 and p95 are over every request. The budget, execution,
approval, key and member calls read PostgreSQL tables this script does not fill.

Every client sends the same request, and nothing writes to the projections while they ask, so
audit-replay's answer cache (``services/audit_replay/answers.py``) computes each answer once and
serves the other requests from memory: those are the figures of shared answers.
``--no-answer-cache`` starts audit-replay with ``MC_ANSWER_CACHE_MB=0`` (nothing kept, nothing
shared), the figures of requests that each cost their own statements.

    python scripts/bench_console.py --events 1000000 --clients 4 --repeat 20 [--no-answer-cache]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from bench_audit_search import RUN_EVENTS, load_sql
from benchkit import pct, whole_system

from services.audit_replay import schema
from services.audit_replay.clickhouse import Clickhouse, embedded_dsn
from services.audit_replay.entrypoints import AuditQueries
from services.audit_replay.insights import ANALYTICS_VIEWS

TENANT_ID = "t0"
MODELS = "['gpt-4o', 'gpt-4o-mini', 'claude-sonnet', 'gemini-pro', 'in-house']"
DB = schema.DATABASE
TABLES = ("audit_events", "runs", "steps", "decisions", "costs", "incidents", "policies")


def _events(events: int) -> str:
    """Each generated event: n, its run, its place k in the run, a hash h (as in
    ``bench_audit_search.load_sql``)."""
    return (
        f"(SELECT number AS n, intDiv(number, {RUN_EVENTS}) AS run, number % {RUN_EVENTS} AS k, "
        f"cityHash64(number, 'h') AS h FROM numbers({events}))"
    )


TENANT = "if(run % 10 < 7, 't0', concat('t', toString(run % 10)))"


def rows_sql(events: int, first: str, spacing_us: int) -> list[str]:
    """The INSERTs of the runs, steps, decisions, costs, incidents and policies of the events
    ``load_sql`` generates (the same runs, at the same times)."""
    origin = f"toDateTime64('{first}', 6, 'UTC')"
    at = f"{origin} + toIntervalMicrosecond(n * {spacing_us})"
    runs = events // RUN_EVENTS
    run_at = f"{origin} + toIntervalMicrosecond(run * {RUN_EVENTS * spacing_us})"
    run_end = f"{run_at} + toIntervalMicrosecond({(RUN_EVENTS - 1) * spacing_us})"
    running = f"run >= {runs} - 30"
    return [
        f"""INSERT INTO {DB}.runs (tenant_id, run_id, agent_id, status, started_at, ended_at,
  stopped_at_step, violation_policy_id, stop_reason, last_step_index, version, workflow_id,
  execution_id)
SELECT {TENANT}, concat('r', toString(run)), concat('agent-', toString(run % 1000)),
  multiIf({running}, 'running', run % 20 = 0, 'stopped_by_policy', run % 50 = 7, 'failed',
          'completed'),
  {run_at}, if({running}, NULL, {run_end}),
  if(run % 20 = 0 AND NOT {running}, 47, NULL),
  if(run % 20 = 0 AND NOT {running}, concat('policy-', toString(run % 50)), NULL),
  if(run % 20 = 0 AND NOT {running}, 'token budget exceeded', NULL), 47, 1,
  if(run % 10 = 0, concat('wf-', toString(run % 200)), NULL),
  if(run % 10 = 0, concat('ex-', toString(run)), NULL)
FROM (SELECT number AS run FROM numbers({runs}))""",
        f"""INSERT INTO {DB}.steps (tenant_id, run_id, step_index, kind, model, status,
  input_tokens, output_tokens, duration_ms, input, output, occurred_at, event_id, version)
SELECT {TENANT}, concat('r', toString(run)), k, 'llm_call', arrayElement({MODELS}, h % 5 + 1),
  'succeeded', 500 + h % 1000, 100 + h % 300, toFloat64(h % 2000), '{{}}', '{{}}', {at},
  toString(generateUUIDv4(n)), 1
FROM {_events(events)} WHERE k % 3 = 2 AND k < {RUN_EVENTS - 1}""",
        f"""INSERT INTO {DB}.decisions (tenant_id, decision_id, run_id, step_index, outcome,
  policy_ids, reasons, bundle_digest, context, occurred_at, version)
SELECT {TENANT}, concat('d', toString(n)), concat('r', toString(run)), k + 1,
  multiIf(h % 100 < 2, 'deny', h % 100 < 5, 'warn', 'allow'),
  if(h % 100 < 5, [concat('policy-', toString(intDiv(h, 100) % 50))], []), '[]',
  'sha256:bench', '{{}}', {at}, 1
FROM {_events(events)} WHERE k % 3 = 1 AND k < {RUN_EVENTS - 1}""",
        # A cost follows its step: the step's model and tokens (its hash is the step's, n - 1).
        f"""INSERT INTO {DB}.costs (tenant_id, cost_id, run_id, agent_id, step_index, model,
  input_tokens, output_tokens, pricing_status, input_cost_usd, output_cost_usd, total_cost_usd,
  price_table_version, occurred_at, version)
SELECT {TENANT}, concat('c', toString(n)), concat('r', toString(run)),
  concat('agent-', toString(run % 1000)), k - 1, model, tin, tout,
  if(model = 'in-house', 'unpriced', 'priced'),
  if(model = 'in-house', NULL, tin * 0.0000025), if(model = 'in-house', NULL, tout * 0.00001),
  if(model = 'in-house', NULL, tin * 0.0000025 + tout * 0.00001), 'bench-1', {at}, 1
FROM (SELECT *, cityHash64(n - 1, 'h') AS sh, arrayElement({MODELS}, sh % 5 + 1) AS model,
             500 + sh % 1000 AS tin, 100 + sh % 300 AS tout FROM {_events(events)})
WHERE k % 3 = 0 AND k > 0 AND k < {RUN_EVENTS - 1}""",
        f"""INSERT INTO {DB}.incidents (tenant_id, incident_id, violation_id, run_id, policy_id,
  step_index, severity, status, title, opened_at, acknowledged_at, acknowledged_by, resolved_at,
  resolved_by, resolution, version)
SELECT {TENANT}, concat('inc-', toString(run)), concat('v', toString(run)),
  concat('r', toString(run)), concat('policy-', toString(run % 50)), 47,
  arrayElement(['low', 'medium', 'high', 'critical'], run % 4 + 1),
  multiIf(run % 3 = 0, 'open', run % 3 = 1, 'acknowledged', 'resolved'),
  'Token budget exceeded', {run_end},
  if(run % 3 = 0, NULL, {run_end} + toIntervalMinute(5)), if(run % 3 = 0, NULL, 'user:ops'),
  if(run % 3 = 2, {run_end} + toIntervalHour(1), NULL), if(run % 3 = 2, 'user:ops', NULL),
  if(run % 3 = 2, 'raised the cap', NULL), 1
FROM (SELECT number AS run FROM numbers({runs})) WHERE run % 20 = 0 AND NOT {running}""",
        f"""INSERT INTO {DB}.policies (tenant_id, bundle_digest, policy_id, title, severity,
  activated_at, version)
SELECT 't0', 'sha256:bench', concat('policy-', toString(number)),
  concat('Policy ', toString(number)), 'high', toDateTime64('{first}', 6, 'UTC'), 1
FROM numbers(50)""",
    ]


async def load(ch: Clickhouse, events: int, days: int) -> None:
    """The events and their rows, the last one about now."""
    spacing_us = max(1, days * 86_400_000_000 // events)
    start = datetime.now(UTC) - timedelta(microseconds=spacing_us * events)
    first = start.strftime("%Y-%m-%d %H:%M:%S")
    await schema.migrate(ch)
    t0 = time.perf_counter()
    await ch.command(load_sql(events, start, spacing_us))
    for sql in rows_sql(events, first, spacing_us):
        await ch.command(sql)
    for table in TABLES:
        await ch.command(f"OPTIMIZE TABLE {DB}.{table} FINAL")
    print(f"loaded {events:,} events over {days} days in {time.perf_counter() - t0:.1f} s")


def calls(period: str) -> dict[str, str]:
    """Each panel's call (name → path and query)."""
    out = {
        "runs running": "/v1/runs?status=live",
        "runs completed": "/v1/runs?status=completed",
        **{f"incidents {s}": f"/v1/incidents?status={s}" for s in ("open", "acknowledged",
                                                                     "resolved")},
        "policies": "/v1/policies",
        "audit search: decisions": "/v1/audit/search?event_type=admission.decided",
        "audit search: denials": "/v1/audit/search?outcome=deny",
        **{f"costs by {g}": f"/v1/costs?group_by={g}" for g in ("model", "agent", "day")},
        **{f"analytics {v}": f"/v1/analytics/{v}?days=30" for v in ANALYTICS_VIEWS},
        "statements": "/v1/statements",
        "statement of the month": f"/v1/statements/{period}",
        "budgets": "/v1/budgets",
        "api keys": "/v1/api-keys",
        "members": "/v1/members",
        "executions": "/v1/executions",
        "approvals": "/v1/approvals",
    }  # fmt: skip
    return out


def bare_queries(q: AuditQueries, period: str) -> dict[str, Callable[[], Awaitable[Any]]]:
    """The audit-replay handler behind each call, called in process."""
    t = {"tenant_id": TENANT_ID}
    out: dict[str, Callable[[], Awaitable[Any]]] = {
        "runs running": lambda: q.runs({**t, "status": "live"}),
        "runs completed": lambda: q.runs({**t, "status": "completed"}),
        "policies": lambda: q.policies(t),
        "audit search: decisions": lambda: q.search({**t, "event_type": "admission.decided"}),
        "audit search: denials": lambda: q.search({**t, "outcome": "deny"}),
        "statements": lambda: q.statements(t),
        "statement of the month": lambda: q.statement({**t, "period": period}),
    }
    for s in ("open", "acknowledged", "resolved"):
        out[f"incidents {s}"] = lambda s=s: q.incidents({**t, "status": s})  # type: ignore[misc]
    for g in ("model", "agent", "day"):
        out[f"costs by {g}"] = lambda g=g: q.costs({**t, "group_by": g})  # type: ignore[misc]
    for v in ANALYTICS_VIEWS:
        out[f"analytics {v}"] = lambda v=v: q.analytics({**t, "view": v, "days": 30})  # type: ignore[misc]
    return out


async def measure_bare(ch: Clickhouse, period: str, repeat: int) -> dict[str, list[float]]:
    """Milliseconds of each call's own query, in process, one at a time."""
    q = AuditQueries(ch, None, None, None)  # type: ignore[arg-type]  # reads only
    out: dict[str, list[float]] = {}
    for name, run in bare_queries(q, period).items():
        await run()
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            await run()
            times.append((time.perf_counter() - t0) * 1000)
        out[name] = times
    return out


def _client(job: tuple[str, str, str, int]) -> tuple[list[float], int]:
    """One client process's turn at a call: milliseconds per request, and how many failed."""
    base, key, path, repeat = job
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    times, failed = [], 0
    with httpx.Client(base_url=base, headers=headers, timeout=30) as http:
        for i in range(repeat + 2):
            t0 = time.perf_counter()
            resp = http.get(path)
            ms = (time.perf_counter() - t0) * 1000
            if resp.status_code != 200:
                failed += 1
            elif i >= 2:
                times.append(ms)
    return times, failed


def measure_http(
    pool: Any, base: str, key: str, paths: dict[str, str], clients: int, repeat: int
) -> dict[str, tuple[list[float], int]]:
    """Each call sent by ``clients`` processes at once, ``repeat`` times each."""
    out: dict[str, tuple[list[float], int]] = {}
    for name, path in paths.items():
        results = pool.map(_client, [(base, key, path, repeat)] * clients)
        out[name] = ([t for r in results for t in r[0]], sum(r[1] for r in results))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--days", type=int, default=30, help="the span of the generated events")
    ap.add_argument("--clients", type=int, default=4, help="client processes at once")
    ap.add_argument("--repeat", type=int, default=20, help="requests per client per call")
    ap.add_argument(
        "--no-answer-cache",
        action="store_true",
        help="audit-replay keeps and shares no answer (MC_ANSWER_CACHE_MB=0): every request "
        "runs its own statements",
    )
    args = ap.parse_args()
    period = datetime.now(UTC).strftime("%Y-%m")
    paths = calls(period)
    bare: dict[str, list[float]] = {}

    def prepare(data_dir: Path) -> None:
        async def fill() -> None:
            ch = Clickhouse(embedded_dsn(data_dir / "clickhouse"))
            try:
                await load(ch, args.events, args.days)
                bare.update(await measure_bare(ch, period, args.repeat))
            finally:
                await ch.close()

        asyncio.run(fill())

    # The panels' reads are not rate limited here: the benchmark is one key's burst.
    os.environ.update({"MC_RATE_LIMIT_KEY_RPS": "0", "MC_RATE_LIMIT_TENANT_RPS": "0"})
    if args.no_answer_cache:
        os.environ["MC_ANSWER_CACHE_MB"] = "0"
    with (
        whole_system(TENANT_ID, prefix="mc-bench-console-", prepare=prepare) as system,
        multiprocessing.get_context("spawn").Pool(args.clients) as pool,
    ):
        health = measure_http(
            pool, system.gateway, "", {"healthz": "/healthz"}, args.clients, args.repeat
        )["healthz"][0]
        print(
            f"{args.events:,} events, {args.clients} client processes x {args.repeat} requests "
            f"per call; floor GET /healthz p50 {pct(health, 50):.1f} ms, "
            f"p95 {pct(health, 95):.1f} ms; answer cache "
            f"{'off' if args.no_answer_cache else 'on (shared answers)'}"
        )
        # The projections were filled before the system started: the first answers warm it.
        measure_http(pool, system.gateway, system.key, paths, args.clients, 2)
        print(f"{'call':36} {'p50 ms':>8} {'p95 ms':>8} {'bare p50':>9} {'bare p95':>9} "
              f"{'fail':>5}")  # fmt: skip
        for name, path in paths.items():
            measured = measure_http(
                pool, system.gateway, system.key, {name: path}, args.clients, args.repeat
            )
            times, failed = measured[name]
            floor = bare.get(name)
            b50 = f"{pct(floor, 50):9.1f}" if floor else f"{'-':>9}"
            b95 = f"{pct(floor, 95):9.1f}" if floor else f"{'-':>9}"
            p50 = pct(times, 50) if times else float("nan")
            p95 = pct(times, 95) if times else float("nan")
            print(f"{name:36} {p50:8.1f} {p95:8.1f} {b50} {b95} {failed:5}", flush=True)


if __name__ == "__main__":
    main()
