"""Benchmark of audit search: latency of each kind of search over N events in embedded chDB.

Creates the projections' schema (``services.audit_replay.schema``) in a scratch chDB, loads
``--events`` events (10,000,000 by default) into ``mc.audit_events`` with one ``INSERT ...
SELECT`` over ``numbers()`` (no row passes through Python), then runs each kind of search
``--repeat`` times with varied values through the service's own query builder
(``services.audit_replay.domain.search``) and client, and prints p50/p95 per kind beside two
floors measured in the same run: a tenant's ``count()`` and a primary-key point lookup.

The data: runs of 50 events (run.started, then decisions, steps and costs, then the run's end)
of 10 tenants, one holding 70 % of the events (every search is that tenant's); 1,000 agents;
one run in ten is a workflow's (its run.started names the workflow and its execution, and so
does its row in ``mc.runs``); 2 % of
decisions deny and 3 % warn, each naming one of 50 policies; one run in twenty ends with an
incident. Step inputs and outputs hold twelve words from a vocabulary of 20,000, so a word
is in about 6,000 events; each run holds one word of its own (a rare word, in one event) and
one step in 1,000 holds one of 30 words, each in about 110 events of 10 M (a middling word).

Also measured, not served: full text by ``positionCaseInsensitive`` (a scan no skip index
helps), against ``hasToken`` with the text index that the search uses.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from services.audit_replay import schema
from services.audit_replay.clickhouse import TENANT, Clickhouse, embedded_dsn, tenant_filter
from services.audit_replay.domain.search import (
    Cursor,
    SearchQuery,
    encode_cursor,
    parse_search,
    search_sql,
)

TENANT_ID = "t0"
RUN_EVENTS = 50
AGENTS = 1000
WORDS = 20_000
POLICIES = 50
START = datetime(2026, 1, 1, tzinfo=UTC)
Query = Callable[[], tuple[str, dict[str, Any]]]
"""Makes one query to time: its SQL and parameters."""


EVENT_SPACING_US = 300_000
"""Time between two generated events."""


def load_sql(events: int, start: datetime = START, spacing_us: int = EVENT_SPACING_US) -> str:
    """One INSERT of ``events`` generated events (see the module docstring), the first at
    ``start``, one every ``spacing_us`` microseconds."""
    first = start.strftime("%Y-%m-%d %H:%M:%S")
    # run: the run's number; k: the event's place in its run; h: a hash for the random choices.
    return f"""
INSERT INTO {schema.DATABASE}.audit_events
SELECT
  if(run % 10 < 7, 't0', concat('t', toString(run % 10))) AS tenant_id,
  toDateTime64('{first}', 6, 'UTC') + toIntervalMicrosecond(n * {spacing_us}) AS occurred_at,
  toString(generateUUIDv4(n)) AS event_id,
  n + 1 AS position,
  multiIf(k = 0, 'run.started', k = 49 AND run % 20 = 0, 'incident.opened',
          k = 49, 'run.completed', k % 3 = 1, 'admission.decided',
          k % 3 = 2, 'run.step_recorded', 'cost.recorded') AS event_type,
  concat(tenant_id, '/run/r', toString(run)) AS stream_id,
  if(k = 0, concat('user:u', toString(run % 100)), 'service:workflow') AS actor,
  concat('r', toString(run)) AS run_id,
  concat('agent-', toString(run % {AGENTS})) AS agent_id,
  if(k = 0 AND run % 10 = 0, concat('wf-', toString(run % 200)), '') AS workflow_id,
  if(k = 0 AND run % 10 = 0, concat('ex-', toString(run)), '') AS execution_id,
  if(event_type = 'admission.decided' AND h % 100 < 5
       OR event_type = 'incident.opened',
     [concat('policy-', toString(intDiv(h, 100) % {POLICIES}))], []) AS policy_ids,
  if(event_type = 'admission.decided',
     multiIf(h % 100 < 2, 'deny', h % 100 < 5, 'warn', 'allow'), '') AS outcome,
  if(event_type = 'incident.opened', concat('inc-', toString(run)), '') AS incident_id,
  multiIf(
    event_type = 'run.step_recorded',
    concat('{{"prompt":"', arrayStringConcat(
      arrayMap(i -> concat('w', toString(cityHash64(n, i) % {WORDS})), range(6)), ' '),
      if(k = 2, concat(' unique', toString(run)), ''),
      if(h % 1000 = 0, concat(' middling', toString(intDiv(h, 1000) % 30)), ''),
      '"}} {{"text":"', arrayStringConcat(
      arrayMap(i -> concat('w', toString(cityHash64(n, i + 6) % {WORDS})), range(6)), ' '),
      '"}}'),
    outcome IN ('deny', 'warn'),
    concat('[{{"message":"token budget ', toString(h % 1000), ' exceeded","policy_id":"policy-',
           toString(intDiv(h, 100) % {POLICIES}), '"}}]'),
    event_type = 'incident.opened', 'token budget exceeded',
    '') AS text
FROM (
  SELECT number AS n, intDiv(number, {RUN_EVENTS}) AS run, number % {RUN_EVENTS} AS k,
         cityHash64(number, 'h') AS h
  FROM numbers({events})
)
"""


def runs_sql(events: int) -> str:
    """The runs of those events (the workflow filter finds a workflow's runs there)."""
    return f"""
INSERT INTO {schema.DATABASE}.runs
  (tenant_id, run_id, agent_id, status, last_step_index, version, workflow_id, execution_id)
SELECT
  if(run % 10 < 7, 't0', concat('t', toString(run % 10))), concat('r', toString(run)),
  concat('agent-', toString(run % {AGENTS})), 'completed', {RUN_EVENTS - 2}, run + 1,
  if(run % 10 = 0, concat('wf-', toString(run % 200)), NULL),
  if(run % 10 = 0, concat('ex-', toString(run)), NULL)
FROM (SELECT number AS run FROM numbers({events // RUN_EVENTS}))
"""


async def timed(ch: Clickhouse, sql: str, params: dict[str, Any]) -> tuple[float, int]:
    start = time.perf_counter()
    rows = await ch.select(tenant_filter(TENANT_ID), sql, params)
    return (time.perf_counter() - start) * 1000, len(rows)


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--keep", type=Path, help="load into this directory and keep it")
    args = ap.parse_args()
    events: int = args.events
    runs = events // RUN_EVENTS
    base = args.keep or Path(tempfile.mkdtemp(prefix="bench-audit-search-"))
    ch = Clickhouse(embedded_dsn(base / "clickhouse"))
    rng = random.Random(7)
    try:
        await schema.migrate(ch)
        have = await ch.select(
            tenant_filter(*(f"t{i}" for i in range(10))),
            f"SELECT count() AS n FROM {schema.DATABASE}.audit_events WHERE {TENANT}",
        )
        if int(have[0]["n"]) == 0:
            start = time.perf_counter()
            await ch.command(load_sql(events))
            await ch.command(runs_sql(events))
            await ch.command(f"OPTIMIZE TABLE {schema.DATABASE}.audit_events FINAL")
            print(f"loaded {events:,} events in {time.perf_counter() - start:.1f} s")
        (info,) = await ch.query_all_tenants(
            "SELECT sum(rows) AS rows, sum(bytes_on_disk) AS bytes, count() AS parts "
            "FROM system.parts WHERE database = 'mc' AND table = 'audit_events' AND active"
        )
        print(f"table: {int(info['rows']):,} rows, {int(info['bytes']) / 2**20:.0f} MiB, "
              f"{info['parts']} parts")  # fmt: skip
        t0_runs = [r for r in range(runs) if r % 10 < 7]

        incident_runs = [r for r in t0_runs if r % 20 == 0] or [0]

        def run_id() -> str:
            return f"r{rng.choice(t0_runs)}"

        def deep_cursor() -> str:
            # A cursor from anywhere in the tenant's history (as after many pages).
            at = START + timedelta(microseconds=rng.randrange(events) * 300_000)
            stamp = at.strftime("%Y-%m-%d %H:%M:%S.%f")
            return encode_cursor(Cursor(stamp, "ffffffff-ffff-ffff-ffff-ffffffffffff"))

        def window() -> dict[str, str]:
            day = rng.randrange(1, max(2, min(28, int(events * 0.3 / 86400))))
            hour = rng.randrange(24)
            return {
                "since": f"2026-01-{day:02d}T{hour:02d}:00:00Z",
                "until": f"2026-01-{day:02d}T{hour:02d}:59:59Z",
            }

        kinds: dict[str, Callable[[], dict[str, Any]]] = {
            "latest page (no filter)": lambda: {},
            "run": lambda: {"run_id": run_id()},
            "agent": lambda: {"agent_id": f"agent-{rng.randrange(AGENTS)}"},
            "workflow": lambda: {"workflow_id": f"wf-{rng.randrange(0, 200, 10)}"},
            "policy": lambda: {"policy_id": f"policy-{rng.randrange(POLICIES)}"},
            "outcome=deny": lambda: {"outcome": "deny"},
            "incident": lambda: {"incident_id": f"inc-{rng.choice(incident_runs)}"},
            "actor": lambda: {"actor": f"user:u{rng.randrange(100)}"},
            "time range (1 h)": window,
            "text: common word": lambda: {"q": f"w{rng.randrange(WORDS)}"},
            "text: middling word": lambda: {"q": f"middling{rng.randrange(30)}"},
            "text: rare word": lambda: {"q": f"unique{rng.choice(t0_runs)}"},
            "text: two words": lambda: {"q": "token budget exceeded"},
            "agent+deny+text": lambda: {
                "agent_id": f"agent-{rng.randrange(AGENTS)}",
                "outcome": "deny",
                "q": "budget",
            },
            "deep cursor page": lambda: {"cursor": deep_cursor()},
            "deep cursor + agent": lambda: {
                "cursor": deep_cursor(),
                "agent_id": f"agent-{rng.randrange(AGENTS)}",
            },
        }

        async def measure(
            make: Callable[[], tuple[str, dict[str, Any]]],
        ) -> list[tuple[float, int]]:
            await timed(ch, *make())  # warm
            return [await timed(ch, *make()) for _ in range(args.repeat)]

        def search(
            params: Callable[[], dict[str, Any]],
        ) -> Callable[[], tuple[str, dict[str, Any]]]:
            def make() -> tuple[str, dict[str, Any]]:
                q: SearchQuery = parse_search(TENANT_ID, params())
                return search_sql(q)

            return make

        floors: dict[str, Query] = {
            "floor: count() of the tenant": lambda: (
                f"SELECT count() AS n FROM {schema.DATABASE}.audit_events WHERE {TENANT}",
                {},
            ),
            "floor: primary-key point lookup": lambda: (
                f"SELECT event_id FROM {schema.DATABASE}.audit_events WHERE {TENANT} "
                "AND occurred_at = {at:DateTime64(6, 'UTC')} LIMIT 1",
                {"at": "2026-01-02 00:00:00.000000"},
            ),
            "not served: text by positionCaseInsensitive": lambda: (
                f"SELECT event_id FROM {schema.DATABASE}.audit_events FINAL WHERE {TENANT} "
                "AND positionCaseInsensitive(text, {w:String}) > 0 "
                "ORDER BY occurred_at DESC, event_id DESC LIMIT 51",
                {"w": f"middling{rng.randrange(30)}"},
            ),
        }
        print(f"{'kind':46} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8} {'rows':>6}")
        for name, make in [*floors.items(), *((k, search(v)) for k, v in kinds.items())]:
            results = await measure(make)
            ms = [r[0] for r in results]
            rows = sum(r[1] for r in results) / len(results)
            print(f"{name:46} {pct(ms, 50):8.1f} {pct(ms, 95):8.1f} {max(ms):8.1f} {rows:6.0f}")
    finally:
        await ch.close()
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
