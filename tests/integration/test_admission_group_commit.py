"""Admission's group commit on PostgreSQL: two replicas, overlapping batches, budgets intact."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool

from libs.contracts import envelope_for, stream_id_for
from libs.contracts.events import RunStarted
from libs.eventbus.store import EventStore
from services.policy_admission.bundle import load_bundle
from services.policy_admission.handlers import AdmissionHandler

pytestmark = pytest.mark.integration


async def test_two_replicas_group_committing_overlapping_runs_keep_every_budget(
    pool: AsyncConnectionPool, tenant: str, unique: Callable[[str], str]
) -> None:
    store = EventStore(pool)
    bundle = load_bundle()
    replicas = [AdmissionHandler(store, bundle), AdmissionHandler(store, bundle)]
    runs = [unique(f"run{i}-") for i in range(4)]
    for run in runs:
        sid = stream_id_for(tenant, "run", run)
        started = RunStarted(run_id=run, agent_id="agent-1")
        await store.append(
            sid,
            [envelope_for(started, tenant_id=tenant, stream_id=sid, correlation_id="c", actor="t")],
        )

    def ask(run: str, step: int) -> dict[str, Any]:
        return {
            "run_id": run,
            "step_index": step,
            "estimate": {"input_tokens": 1000, "max_output_tokens": 1000},
        }

    # Ten steps per run, 2,000 tokens each, against a 10,000-token limit, spread over both
    # replicas in opposite run orders, so their batches overlap in both directions.
    calls = [
        replicas[0].admit(tenant, ask(run, step), {})
        for step in range(1, 11)
        for run in (runs if step % 2 else runs[::-1])
    ] + [
        replicas[1].admit(tenant, ask(run, step), {})
        for step in range(11, 21)
        for run in (runs[::-1] if step % 2 else runs)
    ]
    answers = await asyncio.gather(*calls)
    allowed_per_run = {
        run: sum(
            1
            for e in await store.read_stream(stream_id_for(tenant, "decisions", run))
            if e.event_type == "admission.decided" and e.payload["outcome"] == "allow"
        )
        for run in runs
    }
    assert allowed_per_run == dict.fromkeys(runs, 5)
    assert sum(a["outcome"] == "allow" for a in answers) == 20
