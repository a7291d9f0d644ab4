"""The console's analytics and statements end to end: store → relay → JetStream → projector →
chDB → the ``analytics``, ``statements`` and ``statement`` requests of audit-replay."""

# ruff: noqa: F811  (the tests name the imported ``audit`` fixture as their parameter)

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from libs.contracts import envelope_for, stream_id_for
from libs.contracts.envelope import EventEnvelope
from libs.contracts.events import IncidentResolved, RunCompleted, RunStarted
from libs.errors import InvalidInput, NotFound, TransientError
from services.audit_replay.answers import AnswerCache
from services.audit_replay.insights import ANALYTICS_VIEWS, OTHER_AGENTS, TOP_AGENTS
from tests.conftest import wait_until
from tests.integration.test_projections import Audit, audit  # noqa: F401
from tests.unit.test_audit_domain import POLICY, bundle_event, flow

pytestmark = pytest.mark.integration


def _at(envs: list[EventEnvelope], when: datetime) -> list[EventEnvelope]:
    """The events as if they had happened at ``when`` (a microsecond apart, in order)."""
    return [
        e.model_copy(update={"occurred_at": when + timedelta(microseconds=i)})
        for i, e in enumerate(envs)
    ]


def _completed(tenant: str, run: str, agent: str) -> list[EventEnvelope]:
    def env(event: Any) -> EventEnvelope:
        return envelope_for(
            event,
            tenant_id=tenant,
            stream_id=stream_id_for(tenant, "run", run),
            correlation_id=f"corr-{run}",
            actor="test",
        )

    return [
        env(RunStarted(run_id=run, agent_id=agent)),
        env(RunCompleted(run_id=run, status="completed")),
    ]


def _table(answer: dict[str, Any]) -> list[dict[str, Any]]:
    return [dict(zip(answer["columns"], row, strict=True)) for row in answer["rows"]]


async def test_each_analytics_view_answers_the_tenants_own_figures_in_its_window(
    audit: Audit, unique: Any
) -> None:
    tenant, other = unique("acme"), unique("globex")
    run, old_run, done = unique("run"), unique("old"), unique("done")
    now = datetime.now(UTC)
    today = now.date().isoformat()
    incident = f"{run}-i1"
    resolved = envelope_for(
        IncidentResolved(incident_id=incident, by="user:alice", resolution="raised the cap"),
        tenant_id=tenant,
        stream_id=stream_id_for(tenant, "incident", incident),
        correlation_id="c",
        actor="user:alice",
    )
    envs = [
        bundle_event(),
        *flow(tenant, run),
        resolved,
        *_completed(tenant, done, "agent-2"),
        # Forty days ago: outside a 30-day window, inside a 60-day one.
        *_at(flow(tenant, old_run), now - timedelta(days=40)),
        *flow(other, run, agent="agent-x"),
    ]
    await audit.projected(await audit.append(envs))

    async def view(name: str, **params: Any) -> list[dict[str, Any]]:
        answer = await audit.call("analytics", tenant, view=name, **params)
        assert answer["view"] == name and answer["truncated"] is False
        return _table(answer)

    assert await view("cost_by_model_day") == [
        {"day": today, "model": "gpt-4o", "cost_usd": "0.0007500000", "tokens": 150},
        {"day": today, "model": "in-house-model", "cost_usd": None, "tokens": 280},
    ]
    assert len(await view("cost_by_model_day", days=60)) == 4
    assert await view("cost_by_agent_day") == [
        {"day": today, "agent_id": "agent-1", "cost_usd": "0.0007500000", "tokens": 430}
    ]
    (denials,) = await view("denials_by_policy")
    assert denials["policy_id"] == POLICY and denials["denials"] == 1
    assert denials["last_at"].startswith(today)
    assert (await view("denials_by_policy", days=60))[0]["denials"] == 2
    assert await view("incidents_by_day") == [
        {"day": today, "severity": "high", "opened": 1, "resolved": 1}
    ]
    assert await view("decisions_by_day") == [
        {"day": today, "outcome": "allow", "decisions": 2},
        {"day": today, "outcome": "deny", "decisions": 1},
    ]
    productivity = {r["agent_id"]: r for r in await view("productivity")}
    assert productivity["agent-1"] == {
        "agent_id": "agent-1",
        "runs": 1,
        "completed": 0,
        "stopped": 1,
        "failed": 0,
        "mean_duration_s": productivity["agent-1"]["mean_duration_s"],
        "tokens": 430,
        "cost_usd": "0.0007500000",
    }
    assert productivity["agent-1"]["mean_duration_s"] >= 0
    assert productivity["agent-2"]["runs"] == productivity["agent-2"]["completed"] == 1
    assert productivity["agent-2"]["cost_usd"] is None
    assert (await view("productivity", days=60))[0] == {
        **productivity["agent-1"],
        "runs": 2,
        "stopped": 2,
        "tokens": 860,
        "cost_usd": "0.0015000000",
        "mean_duration_s": (await view("productivity", days=60))[0]["mean_duration_s"],
    }

    # The other tenant's agent never shows.
    for name in ANALYTICS_VIEWS:
        answer = await audit.call("analytics", tenant, view=name, days=366)
        assert "agent-x" not in str(answer["rows"])

    with pytest.raises(NotFound, match="cost_by_model_day, cost_by_agent_day"):
        await audit.call("analytics", tenant, view="nope")
    for days in (0, 367, "7"):
        with pytest.raises(InvalidInput, match="between 1 and 366"):
            await audit.call("analytics", tenant, view="productivity", days=days)


async def test_cost_by_agent_day_shows_the_top_spenders_and_sums_the_rest(
    audit: Audit, unique: Any
) -> None:
    """Two agents more than the chart's series: the 20 that spent most (equal spend: by tokens,
    then by id) each on their own, the other two summed as one series."""
    tenant = unique("acme")
    agents = [f"agent-{i:02d}" for i in range(TOP_AGENTS + 2)]
    envs = [bundle_event()]
    for agent in agents:
        envs += flow(tenant, unique(f"run-{agent}-"), agent=agent)
    await audit.projected(await audit.append(envs))
    answer = await audit.call("analytics", tenant, view="cost_by_agent_day")
    rows = _table(answer)
    today = datetime.now(UTC).date().isoformat()
    assert [r["agent_id"] for r in rows] == [OTHER_AGENTS, *agents[:TOP_AGENTS]]
    assert rows[0] == {
        "day": today,
        "agent_id": OTHER_AGENTS,
        "cost_usd": "0.0015000000",
        "tokens": 860,
    }
    assert {r["cost_usd"] for r in rows[1:]} == {"0.0007500000"}


async def test_statements_sum_each_month_and_charge_back_by_agent_and_model(
    audit: Audit, unique: Any
) -> None:
    tenant, other = unique("acme"), unique("globex")
    jan = datetime(2026, 1, 31, 23, 59, tzinfo=UTC)
    feb = datetime(2026, 2, 1, 0, 0, tzinfo=UTC)
    envs = [
        bundle_event(),
        *_at(flow(tenant, unique("a")), jan),
        *_at(flow(tenant, unique("b"), agent="agent-2"), jan),
        *_at(flow(tenant, unique("c")), feb),
        *_at(flow(other, unique("d")), jan),
    ]
    await audit.projected(await audit.append(envs))

    listing = await audit.call("statements", tenant)
    assert listing["statements"] == [
        {"period": "2026-02", "runs": 1, "tokens": 430, "cost_usd": "0.0007500000",
         "unpriced_calls": 1},
        {"period": "2026-01", "runs": 2, "tokens": 860, "cost_usd": "0.0015000000",
         "unpriced_calls": 2},
    ]  # fmt: skip

    january = await audit.call("statement", tenant, period="2026-01")
    assert january["period"] == "2026-01"
    assert (january["runs"], january["tokens"], january["total_usd"]) == (
        2,
        860,
        "0.0015000000",
    )
    assert january["unpriced_calls"] == 2 and january["truncated"] is False
    assert [(x["agent_id"], x["model"], x["runs"], x["tokens"], x["cost_usd"])
            for x in january["lines"]] == [
        ("agent-1", "gpt-4o", 1, 150, "0.0007500000"),
        ("agent-1", "in-house-model", 1, 280, None),
        ("agent-2", "gpt-4o", 1, 150, "0.0007500000"),
        ("agent-2", "in-house-model", 1, 280, None),
    ]  # fmt: skip
    empty = await audit.call("statement", tenant, period="2025-12")
    assert (empty["lines"], empty["total_usd"], empty["runs"]) == ([], None, 0)
    for bad in ("2026-13", "2026-1", "january"):
        with pytest.raises(InvalidInput, match="YYYY-MM"):
            await audit.call("statement", tenant, period=bad)


def _incident_count(policies: dict[str, Any]) -> int:
    (policy,) = [p for p in policies["policies"] if p["policy_id"] == POLICY]
    return int(policy["incident_count"])


async def _with_answer_cache(audit: Audit, **settings: Any) -> AnswerCache[bytes]:
    """Restart the service with the answer cache on (the default settings, and ``settings``)."""
    update = {"answer_cache_mb": 64, **settings}
    await audit.service.stop()
    audit.ctx = replace(audit.ctx, settings=audit.ctx.settings.model_copy(update=update))
    await audit.start_service()
    queries = audit.service.queries
    assert queries is not None and queries.answers is not None
    return queries.answers


async def test_a_kept_listing_never_outlives_a_write_the_lanes_flushed(
    audit: Audit, unique: Any
) -> None:
    """The listings are kept while the projections do not move, per tenant, and the first
    answer after a flush holds what it wrote (services/audit_replay/answers.py)."""
    tenant, other = unique("acme"), unique("globex")
    done, stopped = unique("done"), unique("stopped")
    answers = await _with_answer_cache(audit)
    await audit.projected(await audit.append([bundle_event(), *_completed(tenant, done, "a1")]))

    listing = await audit.call("runs", tenant)
    assert [r["run_id"] for r in listing["runs"]] == [done]
    incidents = await audit.call("incidents", tenant)
    assert incidents["incidents"] == []
    policies = await audit.call("policies", tenant)
    assert _incident_count(policies) == 0
    hits = answers.stats.hits
    assert await audit.call("runs", tenant) == listing
    assert await audit.call("incidents", tenant) == incidents
    assert await audit.call("policies", tenant) == policies
    assert answers.stats.hits == hits + 3  # the repeats cost no statement
    # Same method and parameters, another tenant: its own answer, not the kept one.
    assert (await audit.call("runs", other))["runs"] == []

    await audit.projected(await audit.append(flow(tenant, stopped)))
    after = {r["run_id"]: r["status"] for r in (await audit.call("runs", tenant))["runs"]}
    assert after == {done: "completed", stopped: "stopped_by_policy"}
    (incident,) = (await audit.call("incidents", tenant))["incidents"]
    assert incident["run_id"] == stopped
    assert _incident_count(await audit.call("policies", tenant)) == 1

    # While a rebuild runs a kept answer is refused like any other read, and none kept before
    # it is served after it.
    projector = audit.service.projector
    assert projector is not None
    listing = await audit.call("runs", tenant)
    async with projector._lock:  # holds the rebuild at its start
        rebuild = asyncio.create_task(audit.call("rebuild", tenant))
        await wait_until(lambda: projector.rebuilding, what="the rebuild to start")
        with pytest.raises(TransientError, match="projections are being rebuilt"):
            await audit.call("runs", tenant)
    await rebuild
    computed = answers.stats.computed
    assert await audit.call("runs", tenant) == listing
    assert answers.stats.computed == computed + 1


async def test_without_staleness_an_aggregate_holds_every_flushed_write(
    audit: Audit, unique: Any
) -> None:
    """With ``MC_ANALYTICS_MAX_STALENESS_MS=0`` the aggregates are exact too."""
    answers = await _with_answer_cache(audit, analytics_max_staleness_ms=0)
    tenant = unique("acme")
    await audit.projected(await audit.append([bundle_event(), *flow(tenant, unique("a"))]))

    async def runs_by_agent() -> dict[str, int]:
        rows = _table(await audit.call("analytics", tenant, view="productivity"))
        return {r["agent_id"]: r["runs"] for r in rows}

    assert await runs_by_agent() == {"agent-1": 1}
    hits = answers.stats.hits
    assert await runs_by_agent() == {"agent-1": 1}
    assert answers.stats.hits == hits + 1
    await audit.projected(await audit.append(flow(tenant, unique("b"), agent="agent-2")))
    assert await runs_by_agent() == {"agent-1": 1, "agent-2": 1}
    statements = (await audit.call("statements", tenant))["statements"]
    assert [s["runs"] for s in statements] == [2]
