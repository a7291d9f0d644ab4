"""Exact cost end to end: recorded provider usage → step → cost → ClickHouse → cost queries.

The steps carry usage mapped from the recorded OpenAI, Anthropic and Gemini payloads of
``tests/fixtures/usage/``; they are costed by the cost domain, stored, relayed and projected by
the audit service on real PostgreSQL, NATS and chDB, and read back by workflow, day and model.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from libs.contracts import envelope_for, stream_id_for
from libs.contracts.envelope import DomainEvent, EventEnvelope
from libs.contracts.events import RunStarted, StepRecorded
from libs.pricing import builtin_price_table
from services.cost.domain import decide_cost
from tests.integration.test_projections import Audit, audit
from tests.unit.test_usage import _load, _usage

__all__ = ["audit"]

pytestmark = pytest.mark.integration

DAY1 = datetime(2026, 11, 28, 9, 30, tzinfo=UTC)
DAY2 = datetime(2026, 11, 29, 23, 59, tzinfo=UTC)


def _env(
    tenant: str, event: DomainEvent, category: str, entity: str, at: datetime
) -> EventEnvelope:
    env = envelope_for(
        event,
        tenant_id=tenant,
        stream_id=stream_id_for(tenant, category, entity),
        correlation_id=f"corr-{entity}",
        actor="test",
    )
    return env.model_copy(update={"occurred_at": at})


def _run(
    tenant: str,
    run_id: str,
    workflow: str | None,
    steps: list[tuple[str, datetime, Decimal | None]],
    labels: dict[str, str] | None = None,
) -> list[EventEnvelope]:
    """A run whose steps use the fixtures' usage, each with its cost.recorded (v2)."""
    if labels is None:
        labels = {"workflow_id": workflow, "execution_id": f"ex-{run_id}"} if workflow else {}
    out = [_env(tenant, RunStarted(run_id=run_id, agent_id="writer", labels=labels), "run",
                run_id, DAY1)]  # fmt: skip
    for index, (fixture_name, at, provider_cost) in enumerate(steps, start=1):
        fixture = _load(fixture_name)
        step = StepRecorded(
            run_id=run_id,
            agent_id="writer",
            step_index=index,
            model=fixture["model"],
            provider_cost_usd=provider_cost,
            **_usage(fixture).fields(),
        )
        step_env = _env(tenant, step, "run", run_id, at)
        cost = decide_cost(step, at, builtin_price_table(), step_event_id=step_env.event_id)
        out += [step_env, _env(tenant, cost, "cost", run_id, at)]
    return out


def _v1_cost(tenant: str, run_id: str) -> EventEnvelope:
    """A cost.recorded as version 1 wrote it (no components): read through the upcaster."""
    payload: dict[str, Any] = {
        "cost_id": str(uuid.uuid4()), "run_id": run_id, "agent_id": "writer", "step_index": 9,
        "model": "gpt-4o", "input_tokens": 1000, "output_tokens": 100,
        "pricing_status": "priced", "input_cost_usd": "0.0025000000",
        "output_cost_usd": "0.0010000000", "total_cost_usd": "0.0035000000",
        "price_table_version": "builtin-2026.11",
    }  # fmt: skip
    env = _env(tenant, RunStarted(run_id=run_id, agent_id="writer"), "cost", run_id, DAY2)
    return env.model_copy(
        update={"event_type": "cost.recorded", "schema_version": 1, "payload": payload}
    )


async def test_costs_by_workflow_day_and_model_carry_every_usage_component(
    audit: Audit, unique: Any
) -> None:
    tenant = unique("acme")
    notes, other, lone = unique("notes"), unique("other"), unique("lone")
    wf = unique("release-notes")
    events = [
        # The Anthropic step reports its own cost 10 % above ours: flagged.
        *_run(tenant, notes, wf, [("anthropic_cache_write.json", DAY1, Decimal("0.015")),
                                  ("anthropic_cache_read.json", DAY1, Decimal("0.0068394"))]),
        *_run(tenant, other, wf, [("openai_chat_cached_reasoning.json", DAY2, None)]),
        *_run(tenant, lone, None, [("gemini_cached_thoughts.json", DAY2, None)]),
        _v1_cost(tenant, lone),
    ]  # fmt: skip
    await audit.projected(await audit.append(events))

    by_workflow = await audit.call("costs", tenant, group_by="workflow")
    rows = {r["key"]: r for r in by_workflow["rows"]}
    assert set(rows) == {wf, None}
    flow = rows[wf]
    assert flow["steps"] == 3
    # Anthropic write + read, OpenAI cached + reasoning: every component summed, none dropped.
    assert flow["input_tokens"] == 2069 + 2073 + 2006
    assert flow["cached_input_tokens"] == 2048 + 1920
    assert flow["cache_write_tokens"] == 2048
    assert flow["output_tokens"] == 393 + 410 + 300
    assert flow["reasoning_tokens"] == 192
    assert flow["total_cost_usd"] == "0.0224200000"  # 0.013638 + 0.0068394 + 0.0019426
    assert flow["cost_components"] == {
        "input": "0.0002326000",  # (21 + 25) x $3/M + 86 x $1.10/M
        "cached_input": "0.0011424000",  # 2048 x $0.30/M + 1920 x $0.275/M
        "cache_write": "0.0076800000",  # 2048 x $3.75/M
        "output": "0.0125202000",  # 803 x $15/M + 108 x $4.40/M
        "reasoning": "0.0008448000",  # 192 x $4.40/M
    }
    assert flow["provider_cost_usd"] == "0.0218394000"
    assert flow["provider_reported_steps"] == 2
    assert flow["cost_mismatches"] == 1
    # The run outside any workflow: the Gemini step and the cost recorded as version 1.
    assert rows[None]["steps"] == 2
    assert rows[None]["cached_input_tokens"] == 4096
    assert rows[None]["reasoning_tokens"] == 812
    assert rows[None]["total_cost_usd"] == "0.0063120800"  # 0.00281208 + 0.0035
    assert rows[None]["cost_components"]["reasoning"] == "0.0020300000"

    by_day = await audit.call("costs", tenant, group_by="day")
    days = {r["key"]: (r["steps"], r["total_cost_usd"]) for r in by_day["rows"]}
    assert days == {
        "2026-11-28": (2, "0.0204774000"),
        "2026-11-29": (3, "0.0082546800"),
    }
    assert by_day["totals"]["total_cost_usd"] == "0.0287320800"
    assert by_day["totals"] == by_workflow["totals"]
    assert by_day["totals"]["cost_mismatches"] == 1

    by_model = await audit.call("costs", tenant, group_by="model")
    models = {r["key"]: r["cost_components"]["cached_input"] for r in by_model["rows"]}
    assert models == {
        "claude-sonnet-4-20250514": "0.0006144000",
        "o4-mini-2025-04-16": "0.0005280000",
        "gemini-2.5-flash": "0.0001228800",
        "gpt-4o": "0.0000000000",
    }

    # A filter on one run still applies with the workflow join.
    one = await audit.call("costs", tenant, group_by="workflow", run_id=other)
    assert [(r["key"], r["steps"]) for r in one["rows"]] == [(wf, 1)]


def _attempt(tenant: str, execution: str, step: str, attempt: int, fixture: str) -> list[Any]:
    """An attempt's run as the workflow-engine starts it (labelled with its execution and step),
    with one step of ``fixture``'s usage and its cost."""
    labels = {"workflow_id": "wf", "execution_id": execution, "step_id": step,
              "attempt": str(attempt)}  # fmt: skip
    run_id = f"{execution}:{step}:{attempt}"
    return _run(tenant, run_id, "wf", [(fixture, DAY1, None)], labels=labels)


async def test_one_executions_cost_by_step_agent_and_model_and_after_a_rebuild(
    audit: Audit, unique: Any
) -> None:
    tenant = unique("acme")
    ex, other = unique("ex-a"), unique("ex-b")
    events = [
        *_attempt(tenant, ex, "gather", 1, "openai_chat_cached_reasoning.json"),  # failed, retried
        *_attempt(tenant, ex, "gather", 2, "openai_chat_cached_reasoning.json"),
        *_attempt(tenant, ex, "review", 1, "anthropic_cache_read.json"),
        *_attempt(tenant, other, "gather", 1, "gemini_cached_thoughts.json"),
        *_run(tenant, unique("lone"), None, [("gemini_cached_thoughts.json", DAY2, None)]),
    ]
    await audit.projected(await audit.append(events))

    async def by(group_by: str, **extra: Any) -> dict[str, Any]:
        return dict(await audit.call("costs", tenant, group_by=group_by, **extra))

    steps = await by("step", execution_id=ex)
    rows = {r["key"]: r for r in steps["rows"]}
    assert set(rows) == {"gather", "review"}  # the other execution and the lone run left out
    assert rows["gather"]["steps"] == 2  # both attempts of the step count
    assert rows["gather"]["total_cost_usd"] == "0.0038852000"  # 2 x 0.0019426
    assert rows["review"]["total_cost_usd"] == "0.0068394000"
    assert steps["totals"]["total_cost_usd"] == "0.0107246000"
    for group_by in ("agent", "model", "run", "day", "workflow"):
        assert (await by(group_by, execution_id=ex))["totals"] == steps["totals"], group_by
    models = {r["key"]: r["steps"] for r in (await by("model", execution_id=ex))["rows"]}
    assert models == {"o4-mini-2025-04-16": 2, "claude-sonnet-4-20250514": 1}
    # Without the filter, every cost of the tenant, steps outside executions under null.
    everything = await by("step")
    assert {r["key"]: r["steps"] for r in everything["rows"]} == {
        "gather": 3, "review": 1, None: 1,
    }  # fmt: skip
    assert (await by("step", execution_id=unique("nothing")))["rows"] == []

    # The execution and step come from the runs' labels, so a rebuild gives the same answers.
    await audit.call("rebuild", tenant)
    assert await by("step", execution_id=ex) == steps
