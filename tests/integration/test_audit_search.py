"""Audit search end to end: store → relay → JetStream → projector → chDB → the ``search`` RPC."""

# ruff: noqa: F811  (the tests name the imported ``audit`` fixture as their parameter)

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from libs.contracts import envelope_for, stream_id_for
from libs.contracts.envelope import EventEnvelope
from libs.contracts.events import (
    DomainEvent,
    ExecutionCompleted,
    ExecutionStarted,
    IncidentResolved,
    RunStarted,
    StepRecorded,
)
from libs.errors import InvalidInput
from services.audit_replay import schema
from services.audit_replay.clickhouse import Clickhouse, embedded_dsn, tenant_filter
from services.audit_replay.domain import project
from services.audit_replay.domain.search import page, parse_search, search_sql
from tests.integration.test_projections import Audit, audit  # noqa: F401
from tests.unit.test_audit_domain import POLICY, bundle_event, flow, stored

pytestmark = pytest.mark.integration


def _env(tenant: str, event: DomainEvent, category: str, entity: str, actor: str) -> EventEnvelope:
    return envelope_for(
        event,
        tenant_id=tenant,
        stream_id=stream_id_for(tenant, category, entity),
        correlation_id=f"corr-{entity}",
        actor=actor,
    )


def workflow_events(tenant: str, workflow: str, execution: str, run: str) -> list[EventEnvelope]:
    """An execution of ``workflow`` whose step ran as ``run`` (labelled as the engine does)."""
    labels = {"workflow_id": workflow, "execution_id": execution, "step_id": "s1"}
    return [
        _env(
            tenant,
            ExecutionStarted(
                execution_id=execution,
                workflow_id=workflow,
                workflow_version=1,
                document_hash="sha256:doc",
                document={},
                started_at=datetime(2026, 1, 1, tzinfo=UTC),
            ),
            "execution",
            execution,
            "user:wendy",
        ),
        _env(tenant, RunStarted(run_id=run, agent_id="agent-wf", labels=labels), "run", run, "w"),
        _env(
            tenant,
            StepRecorded(
                run_id=run,
                agent_id="agent-wf",
                step_index=1,
                kind="tool_call",
                tool="search",
                input={"query": "Quarterly Revenue for ZEPHYR"},
                output={"hits": 3},
                error="upstream returned HTTP 503",
            ),
            "run",
            run,
            "w",
        ),
        _env(
            tenant,
            ExecutionCompleted(
                execution_id=execution, finished_at=datetime(2026, 1, 1, tzinfo=UTC)
            ),
            "execution",
            execution,
            "service:workflow-engine",
        ),
    ]


async def search(a: Audit, tenant: str, **params: Any) -> list[dict[str, Any]]:
    """Every matching event, following cursors (pages of 2, so paging is exercised)."""
    events: list[dict[str, Any]] = []
    cursor = None
    while True:
        extra = {"cursor": cursor} if cursor else {}
        answer = await a.call("search", tenant, limit=2, **params, **extra)
        events += answer["events"]
        cursor = answer["next_cursor"]
        if cursor is None:
            return events


def types(events: list[dict[str, Any]]) -> list[str]:
    return sorted(e["event_type"] for e in events)


async def test_every_filter_and_full_text_find_exactly_their_events(
    audit: Audit, unique: Any
) -> None:
    tenant, other = unique("acme"), unique("globex")
    run, run2, wf_run = unique("run"), unique("runb"), unique("wfrun")
    workflow, execution = unique("wf"), unique("ex")
    incident = f"{run}-i1"
    resolved = _env(
        tenant,
        IncidentResolved(incident_id=incident, by="user:alice", resolution="Raised the BUDGET"),
        "incident",
        incident,
        "user:alice",
    )
    envs = [
        bundle_event(),
        *flow(tenant, run),
        *flow(tenant, run2, agent="agent-2")[:4],
        *workflow_events(tenant, workflow, execution, wf_run),
        resolved,
        *flow(other, run),
        *workflow_events(other, workflow, execution, wf_run),
    ]
    last = await audit.append(envs)
    await audit.projected(last)

    mine = sorted(
        (e for e in envs if e.tenant_id == tenant),
        key=lambda e: (e.occurred_at, str(e.event_id)),
        reverse=True,
    )
    everything = await search(audit, tenant)
    # Newest first, each event once, none of the other tenant's (same run and workflow ids).
    assert [e["event_id"] for e in everything] == [str(e.event_id) for e in mine]
    assert len(await search(audit, other)) == len([e for e in envs if e.tenant_id == other])

    by_run = await search(audit, tenant, run_id=run)
    assert len(by_run) == len(flow(tenant, run))
    assert {e["run_id"] for e in by_run} == {run}
    assert {e["run_id"] for e in await search(audit, tenant, agent_id="agent-2")} == {run2}
    assert types(await search(audit, tenant, workflow_id=workflow)) == [
        "execution.completed",
        "execution.started",
        "run.started",
        "run.step_recorded",
    ]
    assert types(await search(audit, tenant, execution_id=execution)) == [
        "execution.completed",
        "execution.started",
        "run.started",
    ]
    assert types(await search(audit, tenant, policy_id=POLICY)) == [
        "admission.decided",
        "incident.opened",
        "policy.violation_detected",
        "run.stopped_by_policy",
    ]
    denied = await search(audit, tenant, outcome="deny")
    assert [(e["run_id"], e["policy_ids"]) for e in denied] == [(run, [POLICY])]
    assert len(await search(audit, tenant, outcome="allow")) == 3  # 2 of run, 1 of run2
    assert types(await search(audit, tenant, incident_id=incident)) == [
        "incident.opened",
        "incident.resolved",
    ]
    assert types(await search(audit, tenant, actor="user:alice")) == ["incident.resolved"]
    assert len(await search(audit, tenant, event_type="cost.recorded")) == 3

    # Full text: reasons and messages, titles, resolutions, a step's input, output and error;
    # any case, every word.
    assert types(await search(audit, tenant, q="Budget EXCEEDED")) == [
        "admission.decided",
        "incident.opened",
        "policy.violation_detected",
        "run.stopped_by_policy",
    ]
    assert types(await search(audit, tenant, q="budget")) == [
        "admission.decided",
        "incident.opened",
        "incident.resolved",
        "policy.violation_detected",
        "run.stopped_by_policy",
    ]
    (step,) = await search(audit, tenant, q="zephyr revenue")
    assert step["run_id"] == wf_run and "quarterly revenue for zephyr" in step["excerpt"]
    assert [e["run_id"] for e in await search(audit, tenant, q="503")] == [wf_run]
    assert len(await search(audit, tenant, q="p1")) == 2  # step 1's input of both runs
    assert await search(audit, tenant, q="zephyr budget") == []
    assert await search(audit, other, q="raised") == []

    # Filters combine; a time range bounds occurred_at.
    assert types(await search(audit, tenant, run_id=run, q="budget", outcome="deny")) == [
        "admission.decided"
    ]
    middle = everything[len(everything) // 2]["occurred_at"]
    older = await search(audit, tenant, until=middle)
    newer = await search(audit, tenant, since=middle)
    assert [e["event_id"] for e in newer + older] == [e["event_id"] for e in everything]


async def test_pages_neither_repeat_nor_skip_while_events_arrive(audit: Audit, unique: Any) -> None:
    tenant = unique("acme")
    runs = [unique(f"r{i}-") for i in range(4)]
    first = [e for r in runs[:2] for e in flow(tenant, r)]
    await audit.projected(await audit.append(first))
    before = {str(e.event_id) for e in first}

    seen: list[str] = []
    answer = await audit.call("search", tenant, limit=3)
    arriving = arrived = [e for r in runs[2:] for e in flow(tenant, r)]
    while True:
        seen += [e["event_id"] for e in answer["events"]]
        if arriving:  # more events land between pages
            batch, arriving = arriving[:5], arriving[5:]
            await audit.projected(await audit.append(batch))
        if answer["next_cursor"] is None:
            break
        answer = await audit.call("search", tenant, limit=3, cursor=answer["next_cursor"])
    assert len(seen) == len(set(seen))
    assert set(seen) == before  # all that existed when paging began, none newer

    # An unmerged copy of an event (a redelivery ClickHouse has not merged away yet) shows once.
    ch = audit.ch
    await ch.command(
        f"INSERT INTO {schema.DATABASE}.audit_events SELECT * FROM {schema.DATABASE}.audit_events "
        "WHERE tenant_id = {t:String}",
        {"t": tenant},
    )
    again: list[str] = []
    cursor = None
    while True:
        answer = await audit.call(
            "search", tenant, limit=4, **({"cursor": cursor} if cursor else {})
        )
        again += [e["event_id"] for e in answer["events"]]
        cursor = answer["next_cursor"]
        if cursor is None:
            break
    assert len(again) == len(set(again)) == len(first) + len(arrived)


async def test_bad_input_is_refused_naming_it(audit: Audit, unique: Any) -> None:
    tenant = unique("acme")
    for params, named in (
        ({"cursor": "bm90IGEgY3Vyc29y"}, "cursor"),
        ({"outcome": "perhaps"}, "outcome"),
        ({"q": "!!!"}, "q"),
        ({"since": "2026-02-01T00:00:00Z", "until": "2026-01-01T00:00:00Z"}, "since"),
        ({"limit": 1000}, "limit"),
    ):
        with pytest.raises(InvalidInput, match=named):
            await audit.call("search", tenant, **params)
    # The widest times are answered, not refused by ClickHouse.
    wide = {"since": "0001-01-01T00:00:00Z", "until": "9999-12-31T00:00:00Z"}
    assert (await audit.call("search", tenant, **wide))["events"] == []


async def test_a_rebuild_gives_the_same_answers(audit: Audit, unique: Any) -> None:
    tenant, run = unique("acme"), unique("run")
    await audit.projected(await audit.append([bundle_event(), *flow(tenant, run)]))
    before = await search(audit, tenant)
    denied = await search(audit, tenant, policy_id=POLICY, q="budget")
    assert before and denied
    assert audit.service.projector is not None
    await audit.service.projector.rebuild(audit.store)
    assert await search(audit, tenant) == before
    assert await search(audit, tenant, policy_id=POLICY, q="budget") == denied


async def test_the_migration_fills_the_search_table_from_the_raw_log(tmp_path: Path) -> None:
    """A store projected before audit search gets its events searchable on upgrade."""
    ch = Clickhouse(embedded_dsn(tmp_path / "ch"))
    try:
        await schema.migrate(ch)
        envs = stored([bundle_event(), *flow("acme", "r1")])
        rows = project(envs, {}, {}).rows["events"]
        # As before migration 23: no search table, no feed; the raw log holds the events.
        await ch.command("DROP TABLE mc.audit_events_feed SYNC")
        await ch.command("DROP TABLE mc.audit_events SYNC")
        await ch.command("DELETE FROM mc.schema_migrations WHERE version >= 23")
        await ch.insert("mc.events", list(rows[0]), rows)
        assert await schema.migrate(ch) == [23, 24, 25, 26, 27, 28, 29]
        q = parse_search("acme", {"run_id": "r1"})
        found = page(q, await ch.select(tenant_filter("acme"), *search_sql(q)))
        assert len(found["events"]) == len(envs) - 1
        assert await schema.migrate(ch) == []
    finally:
        await ch.close()
