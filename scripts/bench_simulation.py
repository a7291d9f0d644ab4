"""Benchmark of counterfactual simulation: past decisions per second.

Builds recorded decisions as admission records them (runs of ten steps of several agents and
models, their token counts growing), then, in one run:

* **floor**: reads them as the job does (rebuilds every Rego input, reads the recorded
  outcome and counts it) without evaluating anything;
* **simulation**: the same, plus the candidate (the repository bundle with a token limit
  of 4,000) evaluated by the worker processes, exceptions applied and the report built.

Prints both figures, the share of inputs evaluated (the rest were identical to one already
evaluated), and the workers' CPU per evaluated decision, which does not depend on what else the
machine is doing (the rate does). ``--decisions`` sets how many (10,000 by default),
``--workers`` the processes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psutil

from services.policy_admission.bundle import DEFAULT_BUNDLE_DIR, bundle_files
from services.policy_admission.simulation import (
    RecordedDecision,
    Tally,
    rebuild_input,
    simulated_decision,
)
from services.policy_admission.simulation_eval import BatchEvaluator, default_workers

PAGE = 2000
MODELS = ("gpt-4o", "gpt-4o-mini", "claude-sonnet-4")
START = datetime(2026, 11, 1, tzinfo=UTC)


def recorded(n: int) -> list[RecordedDecision]:
    """``n`` decisions of runs of ten steps (each step's estimate repeats across runs)."""
    out = []
    for i in range(n):
        run, step = divmod(i, 10)
        used = step * 900
        context: dict[str, Any] = {
            "run_id": f"run-{run}",
            "agent_id": f"agent-{run % 7}",
            "status": "running",
            "steps_recorded": step,
            "last_step_index": step,
            "tokens_used": used,
            "cost_usd": round(used * 0.00001, 6),
            "unpriced_steps": 0,
            "violated": [],
            "tokens_reserved": 0,
            "cost_reserved_usd": 0.0,
            "step": {"kind": "llm_call", "model": MODELS[run % 3], "tool": None},
            "estimate": {
                "input_tokens": 400,
                "max_output_tokens": 500,
                "cost_usd": 0.009,
                "pricing_status": "priced",
            },
            "environment": "production",
        }
        out.append(
            RecordedDecision(
                decision_id=f"d-{i}",
                run_id=f"run-{run}",
                step_index=step + 1,
                outcome="allow",
                reasons=(),
                context=context,
                occurred_at=START + timedelta(milliseconds=i),
            )
        )
    return out


def candidate() -> list[tuple[str, str]]:
    """The repository bundle with a token limit of 4,000 (data.json last, as content_of
    lists it)."""
    files = [(n, s) for n, s in bundle_files(DEFAULT_BUNDLE_DIR) if not n.endswith("_test.rego")]
    data = json.loads(next(s for n, s in files if n == "data.json"))
    data["missioncontrol"]["config"]["defaults"]["max_tokens_per_run"] = 4000
    modules = [(n, s) for n, s in files if n.endswith(".rego")]
    return [*modules, ("data.json", json.dumps(data))]


def floor(records: list[RecordedDecision]) -> float:
    """Decisions per second read without evaluation."""
    started = time.perf_counter()
    counts: dict[str, int] = {}
    for r in records:
        rebuild_input("bench", r.step_index, r.context, environment="production")
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
    return len(records) / (time.perf_counter() - started)


def _workers_cpu_s() -> float:
    """CPU seconds the worker processes (this process's children) have used."""
    total = 0.0
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            times = child.cpu_times()
            total += times.user + times.system
    return total


async def simulate(
    records: list[RecordedDecision], workers: int
) -> tuple[float, float, float, Tally]:
    """Decisions per second simulated (after the workers started), the workers' CPU seconds per
    evaluated decision, the share evaluated, and the tally."""
    with BatchEvaluator("sha256:bench", candidate(), workers=workers) as evaluator:
        # Start the workers and compile the candidate in each before the clock starts.
        await evaluator.evaluate(
            [rebuild_input("warm", 1, records[0].context, environment="production")] * 1
        )
        evaluator.evaluated = evaluator.reused = 0
        tally = Tally()
        cpu_before = _workers_cpu_s()
        started = time.perf_counter()
        for i in range(0, len(records), PAGE):
            page = records[i : i + PAGE]
            inputs = [
                rebuild_input("bench", r.step_index, r.context, environment="production")
                for r in page
            ]
            for r, raw in zip(page, await evaluator.evaluate(inputs), strict=True):
                if raw is None:
                    tally.errors += 1
                    continue
                tally.add(r, simulated_decision(raw, r, ()))
        tally.report({})
        rate = len(records) / (time.perf_counter() - started)
        cpu = (_workers_cpu_s() - cpu_before) / max(1, evaluator.evaluated)
        return rate, cpu, evaluator.evaluated / max(1, len(records)), tally


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--decisions", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=default_workers())
    args = parser.parse_args()
    records = recorded(args.decisions)
    floor_rate = floor(records)
    rate, cpu, share, tally = asyncio.run(simulate(records, args.workers))
    print(f"decisions:            {len(records):,}")
    print(f"floor (read only):    {floor_rate:,.0f} decisions/s")
    print(f"simulation:           {rate:,.0f} decisions/s ({args.workers} workers)")
    print(f"evaluated (distinct): {share:.1%} of the decisions")
    print(
        f"worker CPU:           {cpu * 1000:.2f} ms per evaluated decision "
        f"(an idle machine's {os.cpu_count()} cores: {(os.cpu_count() or 1) / cpu:,.0f}/s at most)"
    )
    print(f"load average:         {os.getloadavg()[0]:.1f} (1 min) on {os.cpu_count()} cores")
    print(f"flipped: {tally.flipped:,}  runs stopped: {len(tally.stops):,}  errors: {tally.errors}")


if __name__ == "__main__":
    main()
